"""Memory of a LoRA fine-tune of a base of real width: the peak RSS of the `encode` and `train` stages.

    nice .venv/bin/python bench/memory.py [--code DIR] [--root DIR] [--steps 1] [--out memory-bench.json]

Builds, once per --root (later runs reuse them), two randomly initialised Flux.1 pipelines saved with
`save_pretrained` in bf16 (no download):

- large: Flux.1's width (24 heads of 128, T5 states of 4096, CLIP pooled 768, 64 packed latent channels) with
  one double-stream and five single-stream blocks (~1.1 B parameters, ~2.2 GB in bf16); a T5 encoder of
  T5-XXL's width (d_model 4096, d_ff 10240, 64 heads of 64) with two layers; a CLIP text encoder of width 768
  with one layer; a small 8x VAE with Flux's 16 latent channels and latent shift;
- tiny: the tests' tiny flux preset (pipeline.diffusion.families.random_pipeline), for the fixed cost of an
  empty run: the same stages with almost no weights.

Then, for each base, a project copied from the files of --code (the code tree measured; default: this
repository) with its own params.yaml plus `overrides` (16 generated 64 px images with captions, model.family
flux, finetune lora on the base, encode.dtype bfloat16, train.mixed_precision bf16, --steps steps of batch 1,
a validation loss of one sample at one timestep, no sample grids) runs ingest, validate, preprocess, vae,
encode and train, each as its own process: `python -c LAUNCH --params P STAGE` in the project with
PYTHONPATH the project (the stage's log starts with the `pipeline.__file__` it ran). Each stage's peak RSS is
the kernel's high-water mark of the stage process (wait4's ru_maxrss, what `/usr/bin/time -v` prints as
"Maximum resident set size"). Sampled every POLL_SECONDS with psutil beside it: the RSS and the anonymous
RSS (RssAnon: what no file backs, so not the pages of an mmap-ed weights file) summed over the process tree
(Ray workers included, were there any: with one shard per split, encode runs its tasks in its own process),
and the stage's last log line at the peak.

A step of the large base takes ~6 minutes on 2 CPU cores without bf16 instructions (the denoiser's first
forward, for the FLOP count, as long): one step by default, ~20 minutes per code tree, most of it train's.

Prints, per stage, the peak RSS with each base and their difference (what the large base costs), the
denoiser's and T5's bytes on disk, and whether train meets the goal of issue 30:
train peak <= empty run's train peak + GOAL x the denoiser's bf16 bytes. Before and after a change:

    git worktree add /tmp/mem-before 406a817
    nice .venv/bin/python bench/memory.py --code /tmp/mem-before --out memory-before.json
    nice .venv/bin/python bench/memory.py --out memory-after.json
"""

from __future__ import annotations

import os

for _name in ("DVC_NO_ANALYTICS", "DO_NOT_TRACK", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")
for _name in ("GX_ANALYTICS_ENABLED", "MLFLOW_ENABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED"):
    os.environ.setdefault(_name, "false")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the bases are built with this repository's helpers, whichever code is measured

STAGES = ("ingest", "validate", "preprocess", "vae", "encode", "train")
MEASURED = ("encode", "train")
GOAL = 1.5  # train's peak may exceed the empty run's by this many times the denoiser's bf16 bytes
RESOLUTION, IMAGES = 64, 16
POLL_SECONDS = 0.05
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square")
# The stage process: say which code runs, then be `sdpipe` (python -m pipeline.cli with that print first).
LAUNCH = ("import sys, pipeline; print(f'sdpipe code: {pipeline.__file__}', flush=True); "
          "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
CODE_LINE = "sdpipe code: "
# Only keys both versions know (pipeline/core/config.py rejects unknown ones); ADDED: sections params.yaml
# leaves commented out.
ADDED = {"ingest.folder"}


def overrides(base: Path, images: Path, steps: int) -> dict[str, object]:
    """Dotted params.yaml keys: a LoRA fine-tune of `base` on `images` as small as the stages allow."""
    return {
        "ingest.source": "folder", "ingest.folder": {"path": str(images)},
        "validate.min_rows": 4,
        "preprocess.resolution": RESOLUTION, "preprocess.val_fraction": 0.25,
        "encode.dtype": "bfloat16", "encode.batch_size": IMAGES,
        "model.family": "flux", "model.mode": "finetune", "model.finetune": "lora", "model.pretrained": str(base),
        "train.steps": steps, "train.batch_size": 1, "train.mixed_precision": "bf16", "train.warmup_steps": 0,
        "train.log_every": 1, "train.validate_every": steps, "train.validation_samples": 1,
        "train.validation_timesteps": [500], "train.sample_every": 0, "train.checkpoint_every": steps,
    }


# ---------------------------------------------------------------- inputs: images and bases


def captions() -> list[str]:
    return [f"a {colour} {shape}" for shape in SHAPES for colour in COLOURS][:IMAGES]


def write_images(folder: Path) -> Path:
    """IMAGES captioned PNGs of random colour blocks (none blank, none like another), with sidecar captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, caption in enumerate(captions()):
        blocks = np.random.default_rng(index).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((RESOLUTION, RESOLUTION), Image.Resampling.NEAREST).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(caption, encoding="utf-8")
    return folder


def large_flux_pipeline():
    """Flux.1's widths with 1 + 5 blocks, T5-XXL's width with 2 layers, a width-768 CLIP, a small 8x VAE."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from pipeline.diffusion.components import clip_text_config, t5_encoder_config
    from pipeline.diffusion.latent_space import STAND_IN_LATENT_SCALE, STAND_IN_LATENT_SHIFT
    from pipeline.diffusion.tokenizer import build_t5_tokenizer, build_tokenizer

    torch.manual_seed(0)
    clip_tokenizer = build_tokenizer(captions(), vocab_size=1000, max_tokens=77)
    t5_tokenizer = build_t5_tokenizer(captions(), vocab_size=1000, max_tokens=77)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=5, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        sample_size=RESOLUTION, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=STAND_IN_LATENT_SHIFT, scaling_factor=STAND_IN_LATENT_SCALE)
    scheduler = FlowMatchEulerDiscreteScheduler(  # Flux.1-dev's
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=scheduler, vae=vae, transformer=transformer,
        text_encoder=CLIPTextModel(clip_text_config(clip_tokenizer, 768, 1, 12)), tokenizer=clip_tokenizer,
        text_encoder_2=T5EncoderModel(t5_encoder_config(t5_tokenizer, 4096, 2, 64, 10240, dropout=0.0)),
        tokenizer_2=t5_tokenizer)


def tiny_flux_pipeline():
    """The tests' stand-in (tests/conftest.py save_random_base_model) for flux, at this bench's resolution."""
    import torch

    from pipeline.diffusion.families import family_named, random_pipeline

    torch.manual_seed(0)
    return random_pipeline(family_named("flux"), captions(), resolution=RESOLUTION)


def saved_base(folder: Path, build) -> Path:
    """The pipeline `build` makes, saved in bf16 safetensors (as Flux.1 is published); kept once saved. Built in
    a process of its own: a stage process starts with its parent's high-water mark (exec keeps it in ru_maxrss),
    so building in this one would put the large base's peak into every stage's figure."""
    if not (folder / "model_index.json").is_file():
        builder = multiprocessing.get_context("spawn").Process(target=save_base, args=(folder, build))
        builder.start()
        builder.join()
        if builder.exitcode:
            raise RuntimeError(f"building {folder} failed (exit code {builder.exitcode})")
    return folder


def save_base(folder: Path, build) -> None:
    import torch

    started = time.perf_counter()
    build().to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    print(f"saved {folder} in {time.perf_counter() - started:.0f} s", flush=True)


def component_bytes(base: Path, component: str) -> int:
    return sum(path.stat().st_size for path in (base / component).glob("*.safetensors"))


def component_parameters(base: Path, component: str) -> int:
    from safetensors import safe_open

    count = 0
    for path in (base / component).glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            count += sum(int(np.prod(handle.get_slice(name).get_shape())) for name in handle.keys())
    return count


# ---------------------------------------------------------------- the project and its stages


def code_files(code: Path) -> list[str]:
    """The code tree's files: a git work tree's tracked and new files (not ignored), else every file."""
    if (code / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=code, check=True,
                                capture_output=True, text=True).stdout.split("\0")
        return [name for name in listed if name and (code / name).is_file() and not (code / name).is_symlink()]
    return [path.relative_to(code).as_posix() for path in code.rglob("*")
            if path.is_file() and not {".venv", "__pycache__", ".git"} & set(path.relative_to(code).parts)]


def project_params(code: Path, settings: dict[str, object]) -> dict:
    """The code's own params.yaml with `settings`; a key it does not have (ADDED aside) is an error here."""
    params = yaml.safe_load((code / "params.yaml").read_text(encoding="utf-8"))
    for dotted, value in settings.items():
        *sections, key = dotted.split(".")
        node = params
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or (key not in node and dotted not in ADDED):
            raise KeyError(f"{code / 'params.yaml'} has no {dotted}: this version of the code does not know it; "
                           "take it out of bench/memory.py's overrides")
        node[key] = value
    return params


def new_project(code: Path, folder: Path, settings: dict[str, object]) -> Path:
    """A copy of the code's files with the bench's params.yaml, committed in its own git repository."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in code_files(code):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(code / name, folder / name)
    (folder / "params.yaml").write_text(yaml.safe_dump(project_params(code, settings), sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=folder, check=True, capture_output=True)
    return folder


def anonymous_bytes(pid: int) -> int:
    """RssAnon: the resident pages no file backs (what an mmap-ed weights file adds to RSS is RssFile)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """Resident and anonymous bytes of a process and its descendants now (0 for any that just ended). A child
    with its parent's command line is one between fork and exec (a `git` or `dvc` call): it shares the
    parent's pages, and counting them twice would double the figure, so it is left out."""
    try:
        members = [(process, None), *((child, child.parent()) for child in process.children(recursive=True))]
    except psutil.Error:
        return 0, 0
    resident = anonymous = 0
    for member, parent in members:
        try:
            if parent is None or member.cmdline() != parent.cmdline():
                resident += member.memory_info().rss
                anonymous += anonymous_bytes(member.pid)
        except (psutil.Error, OSError):
            pass
    return resident, anonymous


def run_stage(project: Path, stage: str) -> dict:
    """One stage as its own process, its output in logs/STAGE.log: seconds, exit code, peak RSS of the process
    (ru_maxrss) and of its process tree (sampled), and which code ran."""
    log = project / "logs" / f"{stage}.log"
    log.parent.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(project)}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    command = [sys.executable, "-c", LAUNCH, "--params", str(project / "params.yaml"), stage]
    started = time.perf_counter()
    peaks = {"rss": (0, 0), "anon": (0, 0)}  # (bytes, the log's length then: what the stage was doing)
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=project, env=env, stdout=output, stderr=subprocess.STDOUT)
        watched = psutil.Process(process.pid)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            for kind, now in zip(peaks, tree_memory(watched), strict=True):
                if now > peaks[kind][0]:
                    peaks[kind] = (now, log.stat().st_size)
            time.sleep(POLL_SECONDS)
    process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    code = next((line[len(CODE_LINE):] for line in text.splitlines() if line.startswith(CODE_LINE)), None)
    return dict(stage=stage, returncode=process.returncode, seconds=time.perf_counter() - started,
                peak_rss=usage.ru_maxrss * 1024, code=code,
                **{f"tree_peak_{kind}": value for kind, (value, _) in peaks.items()},
                **{f"tree_peak_{kind}_after": last_line(text.encode()[:offset].decode(errors="replace"))
                   for kind, (_, offset) in peaks.items()},
                **({"log_tail": text[-3000:]} if process.returncode else {}))


def last_line(text: str) -> str:
    """The last line written (a progress bar's last state)."""
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][-200:] if lines else ""


def run_stages(project: Path) -> list[dict]:
    """STAGES in order, each measured; stops at the first that fails."""
    results = []
    for stage in STAGES:
        result = run_stage(project, stage)
        if result["code"] is None or not Path(result["code"]).is_relative_to(project):
            raise RuntimeError(f"{stage} ran the code at {result['code']}, not the project's copy in {project}")
        results.append(result)
        print(f"  {stage:<10} {result['seconds']:6.0f} s  peak RSS {gib(result['peak_rss'])}  "
              f"tree {gib(result['tree_peak_rss'])} (anonymous {gib(result['tree_peak_anon'])})  "
              f"exit {result['returncode']}", flush=True)
        if result["returncode"]:
            print(result["log_tail"], flush=True)
            break
    return results


# ---------------------------------------------------------------- report


def gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


def described(code: Path) -> str:
    """The code's commit (git describe, `-dirty` with changes), or that it is no git work tree."""
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=code, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 and (code / ".git").exists() else "not a git work tree"


def summary(runs: dict[str, list[dict]], sizes: dict[str, int]) -> dict:
    """Per measured stage: the peaks with each base, their difference and that difference per denoiser byte;
    the same of the process tree's anonymous memory, and what the large run was doing at its peak."""
    peaks = {base: {result["stage"]: result for result in results} for base, results in runs.items()}
    stages = {}
    for stage in MEASURED:
        tiny, large = peaks["tiny"].get(stage), peaks["large"].get(stage)
        if not (tiny and large) or tiny["returncode"] or large["returncode"]:
            stages[stage] = None
            continue
        extra = large["peak_rss"] - tiny["peak_rss"]
        anonymous_extra = large["tree_peak_anon"] - tiny["tree_peak_anon"]
        stages[stage] = dict(empty=tiny["peak_rss"], large=large["peak_rss"], extra=extra,
                             extra_per_denoiser_byte=extra / sizes["denoiser_bytes"],
                             anonymous_empty=tiny["tree_peak_anon"], anonymous_large=large["tree_peak_anon"],
                             anonymous_extra_per_denoiser_byte=anonymous_extra / sizes["denoiser_bytes"],
                             peak_after=large["tree_peak_rss_after"])
    train = stages.get("train")
    return dict(stages=stages, goal_met=None if train is None else train["extra_per_denoiser_byte"] <= GOAL)


def table(report: dict) -> str:
    sizes = report["sizes"]
    lines = [f"code {report['code']} ({report['commit']}), {report['date']}; train.steps {report['steps']}",
             f"denoiser {sizes['denoiser_parameters'] / 1e9:.2f} B parameters, {sizes['denoiser_bytes'] / 1e9:.2f} GB "
             f"({sizes['denoiser_bytes'] / 2**30:.2f} GiB) bf16 on disk; T5 {sizes['t5_parameters'] / 1e6:.0f} M, {sizes['t5_bytes'] / 1e9:.2f} GB",
             "", "| stage | peak RSS, empty run (tiny base) | large base | difference | difference / denoiser bytes | "
             "anonymous: empty, large (difference / denoiser bytes) |", "|---|---:|---:|---:|---:|---:|"]
    for stage, row in report["summary"]["stages"].items():
        if row is None:
            failed = [r for results in report["runs"].values() for r in results if r["returncode"]]
            lines.append(f"| {stage} | failed: {failed[0]['stage'] if failed else 'not run'} | | | | |")
            continue
        lines.append(f"| {stage} | {gib(row['empty'])} | {gib(row['large'])} | {gib(row['extra'])} | "
                     f"{row['extra_per_denoiser_byte']:.2f} | {gib(row['anonymous_empty'])}, "
                     f"{gib(row['anonymous_large'])} ({row['anonymous_extra_per_denoiser_byte']:.2f}) |")
    lines.append("")
    for stage, row in report["summary"]["stages"].items():
        if row is not None:
            lines.append(f"{stage}'s peak came after: {row['peak_after']}")
    met = report["summary"]["goal_met"]
    if met is not None:
        lines.append(f"goal (train: difference <= {GOAL} x denoiser bytes): {'met' if met else 'not met'}")
    lines.append("seconds per stage: " + "; ".join(
        f"{base}: " + ", ".join(f"{r['stage']} {r['seconds']:.0f}" for r in results)
        for base, results in report["runs"].items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=REPO, help="the code tree measured (default: this repository)")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "sdpipe-memory-bench",
                        help="working folder; its bases are reused by later runs")
    parser.add_argument("--steps", type=int, default=1, help="train.steps (a step of the large base takes ~6 "
                        "minutes on 2 CPU cores without bf16 instructions)")
    parser.add_argument("--out", type=Path, default=Path("memory-bench.json"), help="results (JSON)")
    args = parser.parse_args()
    code, started = args.code.resolve(), time.perf_counter()
    images = write_images(args.root / "images")
    bases = {"tiny": saved_base(args.root / "bases" / "flux-tiny", tiny_flux_pipeline),
             "large": saved_base(args.root / "bases" / "flux-large", large_flux_pipeline)}
    sizes = dict(denoiser_bytes=component_bytes(bases["large"], "transformer"),
                 denoiser_parameters=component_parameters(bases["large"], "transformer"),
                 t5_bytes=component_bytes(bases["large"], "text_encoder_2"),
                 t5_parameters=component_parameters(bases["large"], "text_encoder_2"))
    report = dict(code=str(code), commit=described(code), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  steps=args.steps, sizes=sizes, runs={})
    for name, base in bases.items():
        print(f"{name} base: {base}", flush=True)
        project = new_project(code, args.root / "projects" / f"{code.name}-{name}", overrides(base, images, args.steps))
        report["runs"][name] = run_stages(project)
        args.out.write_text(json.dumps(report, indent=2))
    report["summary"] = summary(report["runs"], sizes)
    report["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=2))
    print("\n" + table(report))


if __name__ == "__main__":
    main()
