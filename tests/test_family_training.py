"""The families beside sd trained for real: fine-tuned (LoRA and full) from a tiny pretrained folder of the
family through the stage functions, and trained from scratch by `dvc repro`, then served from the registry.
(sd's own fine-tuning is tests/test_finetune.py; its `dvc repro`, tests/test_pipeline_e2e.py.)"""

import base64
import io
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from pipeline.diffusion.families import family_named
from pipeline.evaluation.noise_metrics import square_image_sizes
from pipeline.stages.train import train
from pipeline.training.export import LORA_WEIGHTS

from .conftest import merge, save_random_base_model, tiny_params_dict
from .test_finetune import finetune_params, project
from .test_pipeline_e2e import _run, copy_repository


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> str:
    return str(save_random_base_model(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", "sdxl"))


@torch.no_grad()
def denoiser_output(pipeline) -> torch.Tensor:
    """The denoiser's prediction on fixed inputs, conditioned as its family conditions it."""
    family = family_named("sdxl")
    conditioning = family.encode_text(pipeline.components, family.token_ids(pipeline.components, ["a red circle"] * 2))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return family.predict(pipeline.unet, latents, torch.tensor([10, 500]), conditioning, square_image_sizes(2, 32))


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_sdxl_finetunes_from_its_pretrained_folder(trained_project, sdxl_base, tmp_path, finetune):
    params = finetune_params(sdxl_base, family="sdxl", finetune=finetune)
    paths, _ = project(trained_project, tmp_path, params)
    metrics = train(params, paths)

    saved = DiffusionPipeline.from_pretrained(paths.sd_model)
    assert isinstance(saved, StableDiffusionXLPipeline)
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
    unet_size = sum(p.numel() for p in base.unet.parameters())
    if finetune == "lora":
        assert 0 < metrics["trainable_parameters"] < unet_size / 10
        before = denoiser_output(base)
        base.load_lora_weights(paths.sd_model, weight_name=LORA_WEIGHTS)
        with_lora = denoiser_output(base)
        assert not torch.allclose(with_lora, before, atol=1e-4), "training changed nothing"
        torch.testing.assert_close(denoiser_output(saved), with_lora, atol=1e-4, rtol=1e-4)
    else:
        assert metrics["trainable_parameters"] == unet_size and not (paths.sd_model / LORA_WEIGHTS).exists()
        trained = load_file(paths.sd_model / "unet" / "diffusion_pytorch_model.safetensors")
        assert any(not torch.equal(trained[k], v) for k, v in base.unet.state_dict().items())
    for name in ("text_encoder", "text_encoder_2", "vae"):
        for (key, original), (_, kept) in zip(getattr(base, name).state_dict().items(),
                                              getattr(saved, name).state_dict().items(), strict=True):
            assert torch.equal(original, kept), f"{name}.{key} changed: it must stay frozen"
    assert "StableDiffusionXLPipeline.from_pretrained" in (paths.sd_model / "README.md").read_text()


def test_a_pretrained_model_of_another_family_is_named(trained_project, sdxl_base, tmp_path):
    from pipeline.core.config import ConfigError

    params = finetune_params(sdxl_base, family="sd")
    paths, _ = project(trained_project, tmp_path, params)
    with pytest.raises(ConfigError, match="model.family: sd trains a StableDiffusionPipeline, but model.pretrained"):
        train(params, paths)


@pytest.mark.e2e
def test_dvc_repro_trains_sdxl_from_scratch_and_serves_it_from_the_registry(tmp_path):
    params = merge(tiny_params_dict(), {
        "model": {"family": "sdxl"},
        "vae": {"steps": 5},
        "train": {"steps": 6, "validate_every": 6, "sample_every": 0, "checkpoint_every": 6, "log_every": 3},
        "evaluate": {"stability_repeats": 1, "num_inference_steps": 2, "max_prompts": 3},
    })
    root = copy_repository(tmp_path / "clone", params)
    _run(["dvc", "repro"], root)

    assert isinstance(DiffusionPipeline.from_pretrained(root / "models" / "sd"), StableDiffusionXLPipeline)
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("sdpipe", "champion")
    assert champion.tags["model_family"] == "sdxl"

    out = tmp_path / "generated"
    _run([str(Path(sys.executable).parent / "sdpipe"), "generate", "--model", "models:/sdpipe@champion", "--prompt",
          "a red circle", "-n", "2", "--steps", "2", "--out", str(out)], root)
    assert sorted(p.name for p in out.glob("*.png")) == ["000_seed0.png", "001_seed1.png", "grid.png"]

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/sdpipe@champion")
    images = served.predict(pd.DataFrame({"prompt": ["a blue square"], "steps": [2]}))["image"]
    assert Image.open(io.BytesIO(base64.b64decode(images[0]))).size == (32, 32)
