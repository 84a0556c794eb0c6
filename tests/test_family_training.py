"""The families beside sd trained for real: fine-tuned (LoRA and full) from a tiny pretrained folder of the
family through the stage functions, and trained from scratch by `dvc repro`, then served from the registry.
(sd's own fine-tuning is tests/test_finetune.py; its `dvc repro`, tests/test_pipeline_e2e.py.)"""

import base64
import io
import shutil
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from pipeline.contracts.paths import Paths
from pipeline.core.config import FLOW_FAMILIES
from pipeline.diffusion.families import family_named
from pipeline.evaluation.noise_metrics import square_image_sizes
from pipeline.stages.train import train
from pipeline.training.export import LORA_WEIGHTS

from .conftest import merge, save_random_base_model, tiny_params_dict
from .test_finetune import finetune_params, project
from .test_pipeline_e2e import _run, copy_repository

FINETUNED = ("sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    """A tiny pretrained folder per family, saved when a test first asks for it."""
    saved = {}

    class Bases(dict):
        def __missing__(self, family: str) -> str:
            saved[family] = str(save_random_base_model(tmp_path_factory.mktemp(family) / f"tiny-{family}", family))
            return saved[family]

    return Bases()


@pytest.fixture(scope="module")
def encoded(trained_project, bases, tmp_path_factory):
    """Per family, a project whose vae and encode stages ran once for its finetune (LoRA and full share them)."""
    projects = {}

    def project_of(family: str, params) -> Path:
        if family not in projects:
            paths, counts = project(trained_project, tmp_path_factory.mktemp(f"{family}-project"), params)
            assert counts["text_cache_bytes"] > 0 and counts["image_cache_bytes"] > 0, "encode reports the cache"
            projects[family] = paths.root
        return projects[family]

    return project_of


@torch.no_grad()
def denoiser_output(family_name: str, pipeline) -> torch.Tensor:
    """The denoiser's prediction on fixed inputs, conditioned as its family conditions it."""
    family = family_named(family_name)
    conditioning = family.encode_text(pipeline.components, family.token_ids(pipeline.components, ["a red circle"] * 2))
    latents = torch.randn(2, pipeline.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    return family.predict(getattr(pipeline, family.denoiser), latents, torch.tensor([10.0, 500.0]), conditioning,
                          square_image_sizes(2, 32))


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("family", FINETUNED)
def test_a_family_finetunes_from_its_pretrained_folder(encoded, bases, tmp_path, family, finetune):
    # full fine-tuning checkpoints the transformers' activations (train.gradient_checkpointing): it must train alike
    params = finetune_params(bases[family], family=family, finetune=finetune)
    if finetune == "full" and family != "sdxl":
        params = params.model_copy(update={"train": params.train.model_copy(update={"gradient_checkpointing": True})})
    shutil.copytree(encoded(family, params), tmp_path, dirs_exist_ok=True)
    paths = Paths(tmp_path)
    metrics = train(params, paths)

    pipeline_class = family_named(family).pipeline_class
    denoiser_name = family_named(family).denoiser
    saved = DiffusionPipeline.from_pretrained(paths.sd_model)
    assert type(saved) is pipeline_class
    base = pipeline_class.from_pretrained(bases[family])
    denoiser_size = sum(p.numel() for p in getattr(base, denoiser_name).parameters())
    if finetune == "lora":
        assert 0 < metrics["trainable_parameters"] < denoiser_size / 10
        before = denoiser_output(family, base)
        base.load_lora_weights(paths.sd_model, weight_name=LORA_WEIGHTS)
        with_lora = denoiser_output(family, base)
        assert not torch.allclose(with_lora, before, atol=1e-4), "training changed nothing"
        torch.testing.assert_close(denoiser_output(family, saved), with_lora, atol=1e-4, rtol=1e-4)
    else:
        assert metrics["trainable_parameters"] == denoiser_size and not (paths.sd_model / LORA_WEIGHTS).exists()
        trained = load_file(paths.sd_model / denoiser_name / "diffusion_pytorch_model.safetensors")
        assert any(not torch.equal(trained[k], v) for k, v in getattr(base, denoiser_name).state_dict().items())
    for name in [part.encoder for part in family_named(family).text] + ["vae"]:
        for (key, original), (_, kept) in zip(getattr(base, name).state_dict().items(),
                                              getattr(saved, name).state_dict().items(), strict=True):
            assert torch.equal(original, kept), f"{name}.{key} changed: it must stay frozen"
    assert saved.vae.config.shift_factor == base.vae.config.shift_factor, "the pretrained VAE's own latent shift"
    assert f"{pipeline_class.__name__}.from_pretrained" in (paths.sd_model / "README.md").read_text()


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


@pytest.mark.e2e
@pytest.mark.parametrize("family", FINETUNED)
def test_dvc_repro_trains_a_family_from_scratch_and_serves_it_from_the_registry(tmp_path, family):
    params = merge(tiny_params_dict(), merge(E2E_OVERRIDES, {"model": {"family": family}}))
    root = copy_repository(tmp_path / "clone", params)
    _run(["dvc", "repro"], root)

    pipeline_class = family_named(family).pipeline_class
    saved = DiffusionPipeline.from_pretrained(root / "models" / "sd")
    assert type(saved) is pipeline_class
    if family in FLOW_FAMILIES:  # a 16-channel VAE whose latents' mean the vae stage fitted
        assert saved.vae.config.latent_channels == 16 and saved.vae.config.shift_factor not in (None, 0.0)
    else:
        assert saved.vae.config.latent_channels == 4 and saved.vae.config.shift_factor is None
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("sdpipe", "champion")
    assert champion.tags["model_family"] == family

    out = tmp_path / "generated"
    _run([str(Path(sys.executable).parent / "sdpipe"), "generate", "--model", "models:/sdpipe@champion", "--prompt",
          "a red circle", "-n", "2", "--steps", "2", "--out", str(out)], root)
    assert sorted(p.name for p in out.glob("*.png")) == ["000_seed0.png", "001_seed1.png", "grid.png"]
    assert Image.open(out / "000_seed0.png").size == (32, 32)

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/sdpipe@champion")
    images = served.predict(pd.DataFrame({"prompt": ["a blue square"], "steps": [2]}))["image"]
    assert Image.open(io.BytesIO(base64.b64decode(images[0]))).size == (32, 32)
