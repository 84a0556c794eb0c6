"""The families beside sd trained for real by `dvc repro`: from scratch, then served from the registry; then
fine-tuned in the same project from a tiny pretrained folder of the family, with LoRA and in full.
(sd's own fine-tuning is tests/test_finetune.py; its `dvc repro`, tests/test_subsets.py and tests/test_prior.py.)"""

import base64
import io
import json
import shutil
import warnings
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.contracts.paths import Paths
from pipeline.core.config import EvaluateParams
from pipeline.core.params_file import parse_params, read_params_file
from pipeline.diffusion.families import family_named
from pipeline.evaluation.noise_metrics import square_image_sizes
from pipeline.stages.train import train
from pipeline.training.export import LORA_WEIGHTS
from pipeline.training.modules import denoiser_weights_mb

from .conftest import merge, tiny_params_dict
from .test_finetune import finetune_params, project
from .test_model_card import LORA_PIXEL_TOLERANCE, assert_card_draws_as_sdpipe
from .test_pipeline_e2e import _run, copy_repository, stages_run

FINETUNED = ("sdxl", "sd3", "flux", "chroma", "zimage", "flux2", "qwenimage")


@torch.no_grad()
def denoiser_output(family_name: str, pipeline, denoiser: torch.nn.Module | None = None) -> torch.Tensor:
    """The prediction of denoiser (the pipeline's own by default) on fixed inputs, conditioned by the pipeline's
    tokenizers and text encoders as its family conditions them."""
    family = family_named(family_name)
    conditioning = family.encode_text(pipeline.components, family.token_ids(pipeline.components, ["a red circle"] * 2))
    denoiser = denoiser if denoiser is not None else getattr(pipeline, family.denoiser)
    vae_latents = torch.randn(2, family.denoiser_latent_channels(denoiser), 8, 8, generator=torch.Generator().manual_seed(0))
    latents = family.latent_space.to_denoiser(vae_latents, pipeline.vae)
    return family.predict(denoiser, latents, torch.tensor([10.0, 500.0]), conditioning, square_image_sizes(2, 32))


def sdpipe(root: Path, *command: str) -> int:
    """`sdpipe COMMAND` as dvc.yaml's stages run it in root, in this process: the same entry point without a
    new interpreter importing torch and diffusers (seconds per command)."""
    return main(["--params", str(root / "params.yaml"), "--debug", *command])


def assert_finetuned(family: str, finetune: str, model: Path, base_folder: str, trainable_parameters: int) -> None:
    """model is the family's pipeline fine-tuned from base_folder: a LoRA file that loads onto the base with the
    family pipeline's own load_lora_weights and changes its predictions, or a changed denoiser; text encoders
    and VAE as the base has them."""
    pipeline_class, denoiser_name = family_named(family).pipeline_class, family_named(family).denoiser
    saved = DiffusionPipeline.from_pretrained(model)
    assert type(saved) is pipeline_class
    base = pipeline_class.from_pretrained(base_folder)
    denoiser_size = sum(p.numel() for p in getattr(base, denoiser_name).parameters())
    if finetune == "lora":
        assert 0 < trainable_parameters < denoiser_size / 10
        before = denoiser_output(family, base)
        with warnings.catch_warnings():  # PEFT's word that a layer the LoRA config targets has no weights in the file
            warnings.filterwarnings("error", message=".*inconsistency was discovered between the PEFT config")
            base.load_lora_weights(model, weight_name=LORA_WEIGHTS)
        with_lora = denoiser_output(family, base)
        assert not torch.allclose(with_lora, before, atol=1e-4), "training changed nothing"
        # the base's tokenizers: the saved ones may keep fewer T5 tokens (model.max_sequence_length)
        fused = denoiser_output(family, base, getattr(saved, denoiser_name))
        torch.testing.assert_close(fused, with_lora, atol=1e-4, rtol=1e-4)
    else:
        assert trainable_parameters == denoiser_size and not (model / LORA_WEIGHTS).exists()
        trained = load_file(model / denoiser_name / "diffusion_pytorch_model.safetensors")
        assert any(not torch.equal(trained[k], v) for k, v in getattr(base, denoiser_name).state_dict().items())
    for name in [part.encoder for part in family_named(family).text] + ["vae"]:
        for (key, original), (_, kept) in zip(getattr(base, name).state_dict().items(),
                                              getattr(saved, name).state_dict().items(), strict=True):
            assert torch.equal(original, kept), f"{name}.{key} changed: it must stay frozen"
    space = family_named(family).latent_space
    assert space.statistics(saved.vae) == space.statistics(base.vae), "the pretrained VAE's own latent normalisation"
    assert f"{pipeline_class.__name__}.from_pretrained" in (model / "README.md").read_text()


def test_a_pretrained_model_of_another_family_is_named(trained_project, bases, tmp_path):
    from pipeline.core.config import ConfigError

    params = finetune_params(bases["sdxl"], family="sd")
    paths, _ = project(trained_project, tmp_path, params)
    with pytest.raises(ConfigError, match="model.family: sd trains a StableDiffusionPipeline, but model.pretrained"):
        train(params, paths)


# The tiniest run that still runs every stage: 64 images, a few VAE and training steps, 3 prompts x 1 sample
# at 2 sampling steps. It proves the chain works for the family, not that the model is good (bench/families.py).
E2E_OVERRIDES = {
    "ingest": {"synthetic": {"count": 64}},
    "vae": {"steps": 3, "batch_size": 16},
    "model": {"max_sequence_length": 8},
    "train": {"steps": 4, "batch_size": 16, "validate_every": 4, "sample_every": 0, "checkpoint_every": 4,
              "log_every": 2, "validation_samples": 8},
    "evaluate": {"stability_repeats": 1, "num_inference_steps": 2, "max_prompts": 3, "timesteps": [500],
                 "classifier_images_per_label": 20},
}
# what a family needs beside them: Qwen's chat template spends 8 of Z-Image's Qwen3 tokens on every prompt and
# 15 of flux2's before a caption's end
FAMILY_OVERRIDES = {"zimage": {"model": {"max_sequence_length": 24}}, "flux2": {"model": {"max_sequence_length": 24}}}


@pytest.fixture(scope="session")
def data_project(tmp_path_factory) -> Path:
    """A committed copy of the repository on the tiniest params in which `dvc repro preprocess` ran: the data
    stages, which read no model setting, once for every family this worker trains."""
    root = copy_repository(tmp_path_factory.mktemp("data-clone"), merge(tiny_params_dict(), E2E_OVERRIDES))
    _run(["dvc", "repro", "preprocess"], root)
    return root


@pytest.fixture(scope="module", params=FINETUNED)
def scratch_project(request, data_project, tmp_path_factory) -> tuple[str, Path]:
    """Per family, a copy of data_project switched to the family, in which `dvc repro` ran (its data stages
    stand: DVC finds their outputs up to date)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"{family}-clone") / "project"
    shutil.copytree(data_project, root, symlinks=True)
    params = merge(read_params_file(root / "params.yaml"), merge(FAMILY_OVERRIDES.get(family, {}),
                                                                  {"model": {"family": family}}))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], root).stdout
    assert stages_run(out) == {"inputs", "vae", "encode", "train", "evaluate", "register"}, out
    return family, root


@pytest.mark.e2e
def test_dvc_repro_trains_a_family_from_scratch_and_serves_it_from_the_registry(scratch_project, tmp_path):
    family, root = scratch_project
    pipeline_class = family_named(family).pipeline_class
    saved = DiffusionPipeline.from_pretrained(root / "models" / "sd")
    assert type(saved) is pipeline_class
    if family == "flux2":  # a 32-channel AutoencoderKLFlux2 whose patch channels' statistics the vae stage fitted
        assert saved.vae.config.latent_channels == 32
        assert not torch.equal(saved.vae.bn.running_mean, torch.zeros_like(saved.vae.bn.running_mean))
    elif family == "qwenimage":  # a 16-channel one-frame VAE whose per-channel latent statistics the vae stage fitted
        assert saved.vae.config.z_dim == 16 and saved.vae.config.latents_mean != [0.0] * 16
        assert saved.vae.config.latents_std != [1.0] * 16
    elif family_named(family).declared.latents_shifted:  # a 16-channel VAE whose latents' mean the vae stage fitted
        assert saved.vae.config.latent_channels == 16 and saved.vae.config.shift_factor not in (None, 0.0)
    else:
        assert saved.vae.config.latent_channels == 4 and saved.vae.config.shift_factor is None
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("sdpipe", "champion")
    assert champion.tags["model_family"] == family

    out = tmp_path / "generated"
    assert sdpipe(root, "generate", "--model", "models:/sdpipe@champion", "--prompt", "a red circle", "-n", "2",
                  "--steps", "2", "--out", str(out)) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000_seed0.png", "001_seed1.png", "grid.png"]
    assert Image.open(out / "000_seed0.png").size == (32, 32)

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/sdpipe@champion")
    images = served.predict(pd.DataFrame({"prompt": ["a blue square"], "steps": [2]}))["image"]
    assert Image.open(io.BytesIO(base64.b64decode(images[0]))).size == (32, 32)


@pytest.mark.e2e
def test_the_model_cards_call_draws_what_sdpipe_generate_draws(scratch_project, tmp_path):
    """The card's python block run as written in a process without sdpipe: identical pixels to sdpipe generate,
    with the arguments the family's pipeline would otherwise default differently."""
    family, root = scratch_project
    params = parse_params(read_params_file(root / "params.yaml"))
    code = assert_card_draws_as_sdpipe(params, Paths(root), tmp_path)
    assert f"{family_named(family).pipeline_class.__name__}.from_pretrained('models/sd')" in code
    if family_named(family).declared.flow:  # T5 pads to the trained length, not the pipeline's 256 or 512
        assert f"max_sequence_length={params.model.max_sequence_length}," in code
    if family == "flux":  # FluxPipeline samples 1024 px with guidance 3.5 and no true guidance unless told
        for argument in ("height=32,", "width=32,", "guidance_scale=1.0,", "negative_prompt='',",
                         f"true_cfg_scale={EvaluateParams().guidance_scale},"):
            assert argument in code, argument
    elif family in ("chroma", "zimage", "flux2"):  # their pipelines sample 1024 px unless told to
        assert "height=32," in code and "width=32," in code
    elif family == "qwenimage":  # 1024 px too, and guides (true_cfg_scale) only against a negative prompt
        for argument in ("height=32,", "width=32,", "negative_prompt='',"):
            assert argument in code, argument
    else:  # the pipeline reads the trained size from the denoiser's config
        assert "height=" not in code


@pytest.mark.e2e
def test_a_family_finetunes_with_lora_then_in_full(scratch_project, bases, tmp_path):
    """The scratch project switched to fine-tuning a tiny pretrained folder of its family: DVC sees the stages
    that read the model change and the data stages stand; the stages `dvc repro train` would run then run as its
    commands do, in this process (tests/test_pipeline_e2e.py runs fine-tuning's `dvc repro`). LoRA, then the
    whole denoiser; full fine-tuning checkpoints the transformers' activations (train.gradient_checkpointing):
    it must train alike."""
    family, root = scratch_project
    params = read_params_file(root / "params.yaml")
    params["model"].update(mode="finetune", pretrained=bases[family], finetune="lora")
    params["train"].update(learning_rate=0.01, warmup_steps=0)  # a few steps must visibly move the weights
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(json.loads(_run(["dvc", "status", "--json"], root).stdout))
    assert {"vae", "encode", "train"} <= changed and not changed & {"ingest", "validate", "preprocess"}, changed
    for stage in ("vae", "encode", "train"):
        assert sdpipe(root, stage) == 0
    trained = json.loads((root / "metrics" / "train.json").read_text())
    assert_finetuned(family, "lora", root / "models" / "sd", bases[family], trained["trainable_parameters"])
    code = assert_card_draws_as_sdpipe(parse_params(params), Paths(root), tmp_path, block=1,
                                       tolerance=LORA_PIXEL_TOLERANCE)
    assert f"from_pretrained({params['model']['pretrained']!r})\npipe.load_lora_weights('models/sd')" in code

    params["model"]["finetune"] = "full"
    params["train"]["gradient_checkpointing"] = family != "sdxl"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert sdpipe(root, "train") == 0
    trained = json.loads((root / "metrics" / "train.json").read_text())
    assert_finetuned(family, "full", root / "models" / "sd", bases[family], trained["trainable_parameters"])


def test_lora_on_an_int8_base_trains_in_a_fraction_of_the_memory_and_saves_onto_the_full_precision_base(
        trained_project, bases, tmp_path):
    """QLoRA's recipe with torchao's int8 (model.lora.quantize_base): the frozen transformer's linear weights are
    int8 while its LoRA layers train in fp32; the LoRA file is an ordinary one, and models/sd fuses it into the
    base as stored, not into the quantized copy."""
    params = finetune_params(bases["flux"], family="flux", max_sequence_length=8, lora={"quantize_base": "int8"})
    paths, _ = project(trained_project, tmp_path, params)
    metrics = train(params, paths, tracked=False)

    base = family_named("flux").pipeline_class.from_pretrained(bases["flux"])
    fp32_mb = denoiser_weights_mb(base.transformer)
    assert metrics["denoiser_weights_mb"] < 0.4 * fp32_mb, (metrics["denoiser_weights_mb"], fp32_mb)
    assert_finetuned("flux", "lora", paths.sd_model, bases["flux"], metrics["trainable_parameters"])
