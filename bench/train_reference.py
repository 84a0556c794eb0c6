"""Training speed: the `train` stage versus a loop like diffusers' train_text_to_image.py, same model and data.

    .venv/bin/python bench/train_reference.py [--images 512] [--epochs 3] [--batch-size 32] [--repeats 2]

Renders --images synthetic shapes at 128 px and runs ingest, validate and preprocess (to 64 px) in a
temporary folder. For each VAE in VAES it saves a randomly initialised tiny Stable Diffusion pipeline (the
repo's `tiny` UNet and text encoder, that VAE) as the "pretrained" model and trains its UNet two ways, one
after the other, each in a fresh process, --repeats times:

- ours: `vae` and `encode` once (timed: a one-time cost), then the `train` stage in finetune mode, full
  UNet, with what the script does not do turned off (sample grids, EMA, caption dropout; the validation
  loss and checkpoint it always does come after the last timed step);
- reference: what train_text_to_image.py does with its defaults (centre crop, no flip, no loader workers):
  per item decode the source file, RGB, resize, crop, normalise, tokenize; per step VAE-encode and sample,
  text-encode, UNet forward and backward, clip, AdamW and LR schedule steps, two `.item()` host syncs.

Both start from the same saved UNet with the same optimiser, LR schedule, batch size and steps (1 + --epochs
epochs). Both leave out the same warm-up steps (pipeline.training.throughput: at most 10); for ours images/s is the
steady-state figure of metrics/train.json, which also leaves out validation and saving.
Prints images/s of each (median over the repeats), the ratio, the one-time cost of encoding, each loop's
peak RSS, and the models' sizes and forward FLOPs next to Stable Diffusion 1.5's.
"""

from __future__ import annotations

import os

# The bench's MLflow runs belong in its temporary folder, never in a tracking server the user points at.
os.environ.pop("MLFLOW_TRACKING_URI", None)
for _name in ("DVC_NO_ANALYTICS", "DO_NOT_TRACK", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")
for _name in ("GX_ANALYTICS_ENABLED", "MLFLOW_ENABLE_TELEMETRY"):
    os.environ.setdefault(_name, "false")

import argparse  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.contracts.data import MANIFEST  # noqa: E402
from pipeline.contracts.paths import Paths  # noqa: E402
from pipeline.contracts.shards import image_bytes  # noqa: E402
from pipeline.core.config import Params, TrainParams, VaeParams  # noqa: E402
from pipeline.core.params_file import parse_params, read_params_file  # noqa: E402
from pipeline.diffusion.families import family_named, random_pipeline  # noqa: E402
from pipeline.diffusion.families.sd import PRESETS, build_unet  # noqa: E402
from pipeline.diffusion.tokenizer import tokenize  # noqa: E402
from pipeline.training.throughput import peak_memory_mb, warmup_steps  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RAW_SIDE = 128  # the reference decodes and downsizes every image, as it would real photos
RESOLUTION = 64
# An 8x VAE with SD's channel ratios (128, 256, 512, 512 divided by ~5): its encoder costs 1.6x a UNet forward
# pass here against 1.4x in SD 1.5 at 512 px (the bench prints both); and the repo's default 4x VAE.
VAES = {"8x VAE (24, 48, 96, 96)": (24, 48, 96, 96), "4x VAE (16, 32, 32)": (16, 32, 32)}


def data_params(images: int) -> dict:
    """params.yaml with the bench's source and resolution."""
    raw = read_params_file(REPO / "params.yaml")
    raw["ingest"]["synthetic"].update(count=images, resolution=RAW_SIDE)
    # plain shapes on a plain background look alike to dHash from 64 px up: most would be near-duplicates
    raw["validate"]["max_near_duplicate_distance"] = -1
    raw["preprocess"]["resolution"] = RESOLUTION
    return raw


def finetune_params(pretrained: Path, vae: tuple[int, ...], *, images: int, steps: int, batch_size: int,
                    log_every: int) -> Params:
    """A full fine-tune of `pretrained` as users run the stage, less what the reference does not do."""
    raw = data_params(images)
    raw["vae"]["block_out_channels"] = list(vae)
    raw["model"].update(mode="finetune", pretrained=str(pretrained), finetune="full")
    raw["train"].update(steps=steps, batch_size=batch_size, log_every=log_every, mixed_precision="no",
                        ema_decay=None, sample_every=0, caption_dropout=0.0, random_flip=False,
                        validate_every=steps, checkpoint_every=steps)
    return parse_params(raw)


def prepared_data(root: Path, images: int) -> Paths:
    """data/raw (128 px PNGs) and data/processed (64 px) through the real stages."""
    from pipeline.stages.ingest import ingest
    from pipeline.stages.preprocess import preprocess
    from pipeline.stages.validate import validate

    params, paths = parse_params(data_params(images)), Paths(root)
    ingest(params.ingest, paths)
    validate(params.validate_, paths)
    preprocess(params.preprocess, paths)
    return paths


def saved_random_model(data: Paths, folder: Path, vae: tuple[int, ...]) -> None:
    """A random tiny SD pipeline in diffusers format: the stand-in for pretrained weights."""
    captions = pd.read_parquet(data.processed / "train" / MANIFEST)["caption"].tolist()
    torch.manual_seed(0)
    pipeline = random_pipeline(family_named("sd"), captions, vae=VaeParams(block_out_channels=vae), resolution=RESOLUTION)
    pipeline.save_pretrained(folder, safe_serialization=True)


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def in_fresh_process(function, *args):
    """Run in a new interpreter: each loop's peak RSS is its own, and no loop inherits another's allocator."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# ---------------------------------------------------------------- ours


def our_loop(params: Params, paths: Paths) -> dict:
    """The stage's own steady-state images/s (train.json: after its warm-up steps, validation and saving left out)."""
    from pipeline.stages.train import train

    metrics = train(params, paths)
    return dict(images_per_second=metrics["images_per_second"], peak_memory_mb=peak_memory_mb(torch.device("cpu")))


# ---------------------------------------------------------------- reference: train_text_to_image.py


def script_transform(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize(resolution, BILINEAR), CenterCrop(resolution), ToTensor(), Normalize([0.5], [0.5])."""
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    left, top = round((image.width - resolution) / 2), round((image.height - resolution) / 2)
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


class SourceImages(torch.utils.data.Dataset):
    """The training samples' source files, decoded and tokenized per item as the script's `with_transform`
    (`preprocess_train` on a one-row batch) does."""

    def __init__(self, files: list[Path], captions: list[str], tokenizer, resolution: int):
        self.files, self.captions, self.tokenizer, self.resolution = files, captions, tokenizer, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        with Image.open(self.files[index]) as image:
            pixels = script_transform(image.convert("RGB"), self.resolution)
        return {"pixel_values": pixels, "input_ids": tokenize(self.tokenizer, [self.captions[index]])[0]}


def collate(examples: list[dict]) -> dict:
    pixels = torch.stack([example["pixel_values"] for example in examples])
    return {"pixel_values": pixels.to(memory_format=torch.contiguous_format).float(),
            "input_ids": torch.stack([example["input_ids"] for example in examples])}


def training_sources(data: Paths) -> tuple[list[Path], list[str]]:
    """The source image and caption of every sample of our train split, the images written out of
    data/raw's shards as files (the script reads an image folder): the same training data."""
    train = pd.read_parquet(data.processed / "train" / MANIFEST)
    raw = pd.read_parquet(data.raw / MANIFEST).set_index("id").loc[train["id"]].reset_index()
    folder = data.root / "source_files"
    folder.mkdir(exist_ok=True)
    files = [folder / f"{sample_id}.{fmt}" for sample_id, fmt in zip(raw["id"], raw["format"], strict=True)]
    for file, data_bytes in zip(files, image_bytes(data.raw, raw), strict=True):
        file.write_bytes(data_bytes)
    return files, train["caption"].tolist()


def reference_loop(settings: TrainParams, pretrained: str, files: list[Path], captions: list[str],
                   warmup_steps: int, resolution: int = RESOLUTION, workers: int = 0) -> dict:
    """The script's loop (also bench/gpu.py's, at 512 px in bf16 with loader workers): frozen VAE and text
    encoder in the weight dtype on the accelerator, the UNet in fp32 under autocast."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPTextModel

    set_seed(settings.seed)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    device = accelerator.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.mixed_precision, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet")
    vae.requires_grad_(False).to(device, weight_dtype)
    text_encoder.requires_grad_(False).to(device, weight_dtype)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=settings.weight_decay, eps=1e-8)
    loader = torch.utils.data.DataLoader(SourceImages(files, captions, tokenizer, resolution), shuffle=True,
                                         collate_fn=collate, batch_size=settings.batch_size, num_workers=workers)
    lr_scheduler = get_scheduler(settings.lr_schedule, optimizer, num_warmup_steps=settings.warmup_steps,
                                 num_training_steps=settings.steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)

    step, images, progress = 0, 0, tqdm(total=settings.steps, desc="reference")
    while step < settings.steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                pixels = batch["pixel_values"].to(weight_dtype)
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),),
                                          device=device).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"])[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                accelerator.gather(loss.repeat(settings.batch_size)).mean().item()  # the script's train_loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), settings.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            progress.set_postfix(step_loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])
            progress.update()
            step += 1
            if step == warmup_steps:
                started, images = time.perf_counter(), 0
            else:
                images += len(latents)
            if step == settings.steps:
                break
    seconds = time.perf_counter() - started
    progress.close()
    return dict(images_per_second=images / seconds, peak_memory_mb=peak_memory_mb(device))


# ---------------------------------------------------------------- sizes


def forward_costs(vae, text_encoder, unet, resolution: int, tokens: int) -> dict[str, tuple[int, int]]:
    """(parameters, forward FLOPs) per image of the VAE encoder, the text encoder and the UNet."""
    latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    device = next(unet.parameters()).device
    pixels = torch.zeros(1, 3, resolution, resolution, device=device)
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    latents = torch.zeros(1, unet.config.in_channels, latent, latent, device=device)
    states = torch.zeros(1, tokens, unet.config.cross_attention_dim, device=device)
    encoder = [p for name, p in vae.named_parameters() if name.startswith(("encoder.", "quant_conv."))]
    calls = {"VAE encoder": (encoder, lambda: vae.encode(pixels)),
             "text encoder": (list(text_encoder.parameters()), lambda: text_encoder(ids)),
             "UNet": (list(unet.parameters()), lambda: unet(latents, torch.tensor([500], device=device), states))}
    costs = {}
    for name, (parameters, call) in calls.items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        costs[name] = (sum(p.numel() for p in parameters), counter.get_total_flops())
    return costs


def sd15_costs() -> dict[str, tuple[int, int]]:
    """Stable Diffusion 1.5's sizes at 512 px, built on the meta device: shapes only, no weights, no memory."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                    num_hidden_layers=12, num_attention_heads=12,
                                                    max_position_embeddings=77))
        unet = build_unet(PRESETS["sd15"], latent_channels=4, latent_size=64)
        return forward_costs(vae, text_encoder, unet, 512, 77)


def saved_costs(pretrained: Path) -> dict[str, tuple[int, int]]:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(pretrained)
    return forward_costs(pipeline.vae, pipeline.text_encoder, pipeline.unet, RESOLUTION,
                         pipeline.tokenizer.model_max_length)


def print_sizes(rows: dict[str, dict[str, tuple[int, int]]]) -> None:
    print(f"\n{'parameters / forward GFLOP per image':<36} {'VAE encoder':>18} {'text encoder':>18} {'UNet':>18}"
          f"   VAE enc / UNet FLOPs")
    for name, costs in rows.items():
        cells = " ".join(f"{f'{n / 1e6:.2f} M / {f / 1e9:.3g}':>18}" for n, f in costs.values())
        print(f"{name:<36} {cells}   {costs['VAE encoder'][1] / costs['UNet'][1]:.2f}")


# ---------------------------------------------------------------- main


def bench_vae(name: str, vae: tuple[int, ...], data: Paths, root: Path, args) -> dict:
    from pipeline.stages.encode import encode
    from pipeline.stages.vae import vae_stage

    shutil.copytree(data.processed, root / "data" / "processed")
    saved_random_model(data, root / "pretrained", vae)
    files, captions = training_sources(data)
    epoch = math.ceil(len(files) / args.batch_size)  # steps per epoch, in both loops
    params, paths = finetune_params(root / "pretrained", vae, images=args.images, steps=epoch * (1 + args.epochs),
                                    batch_size=args.batch_size, log_every=epoch), Paths(root)
    vae_seconds = timed(lambda: vae_stage(paths, vae=params.vae, model=params.model, preprocess=params.preprocess))
    encode_seconds = timed(lambda: encode(paths, encode=params.encode, model=params.model))
    runs = {"ours": [], "reference": []}
    for _ in range(args.repeats):
        runs["ours"].append(in_fresh_process(our_loop, params, paths))
        runs["reference"].append(in_fresh_process(reference_loop, params.train, params.model.pretrained, files,
                                                  captions, warmup_steps(params.train.steps)))
    rates = {loop: statistics.median(run["images_per_second"] for run in results) for loop, results in runs.items()}
    ratio = rates["ours"] / rates["reference"]
    # training images after which encoding once has cost less than the reference's encoding per step
    break_even = encode_seconds / (1 / rates["reference"] - 1 / rates["ours"]) if ratio > 1 else math.inf
    latent = RESOLUTION // 2 ** (len(vae) - 1)
    print(f"\n{name}, {latent}x{latent}x4 latents, {len(files)} training images, {epoch} steps per epoch: "
          f"one-time vae stage {vae_seconds:.1f} s, encode {encode_seconds:.1f} s")
    print(f"  {'loop':<40} {'images/s':>9} {'each run':>14} {'peak RSS':>9}")
    for loop, label in (("ours", "ours: train stage on cached latents"),
                        ("reference", "reference: train_text_to_image.py loop")):
        each = ", ".join(f"{run['images_per_second']:.0f}" for run in runs[loop])
        print(f"  {label:<40} {rates[loop]:9.1f} {each:>14} {max(r['peak_memory_mb'] for r in runs[loop]):6.0f} MB")
    print(f"  ratio {ratio:.2f}x; encoding once pays for itself after {break_even:,.0f} training images")
    return dict(name=name, costs=saved_costs(root / "pretrained"), rates=rates, ratio=ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="synthetic source images (about 90%% train)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs after the first (1 + epochs are run)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each loop per VAE; images/s is the median")
    args = parser.parse_args()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    # timings on a shared machine mean little without what else ran on it
    print(f"1-minute load average before the bench: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"batch {args.batch_size} at {RESOLUTION}x{RESOLUTION}, fp32, AdamW, {torch.get_num_threads()} torch "
          f"threads; {1 + args.epochs} epochs, images/s after the warm-up steps, median of {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="sdpipe-bench-") as folder:
        started = time.perf_counter()
        data = prepared_data(Path(folder) / "data", args.images)
        print(f"data: {args.images} synthetic {RAW_SIDE}x{RAW_SIDE} PNGs, ingest + validate + preprocess to "
              f"{RESOLUTION}x{RESOLUTION} in {time.perf_counter() - started:.1f} s")
        results = [bench_vae(name, vae, data, Path(folder) / f"model-{i}", args)
                   for i, (name, vae) in enumerate(VAES.items())]
    print_sizes({"SD 1.5 at 512x512": sd15_costs(),
                 **{f"{result['name']} at {RESOLUTION}x{RESOLUTION}": result["costs"] for result in results}})
    print(f"\n{'':<28} {'ours img/s':>10} {'reference img/s':>16} {'ratio':>7}")
    for result in results:
        print(f"{result['name']:<28} {result['rates']['ours']:10.1f} {result['rates']['reference']:16.1f} "
              f"{result['ratio']:6.2f}x")


if __name__ == "__main__":
    main()
