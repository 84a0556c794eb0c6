"""Fine-tuning a pretrained model (a tiny random Stable Diffusion pipeline saved with save_pretrained, the
layout real weights have): frozen VAE and text encoder, full UNet or LoRA, and caches keyed by what they
depend on."""

import shutil
import weakref

import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from pipeline.contracts.latents import EMPTY_PROMPT_ROW, load_latents
from pipeline.contracts.paths import Paths
from pipeline.core.config import ConfigError
from pipeline.core.params_file import parse_params
from pipeline.diffusion.tokenizer import tokenize
from pipeline.stages import train as train_stage
from pipeline.stages.encode import encode
from pipeline.stages.train import train
from pipeline.stages.vae import vae_stage
from pipeline.training import export, modules
from pipeline.training.export import LORA_WEIGHTS
from pipeline.training.lora_formats import KOHYA_LORA_WEIGHTS

from .conftest import merge, save_random_base_model, tiny_params_dict


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    return str(save_random_base_model(tmp_path_factory.mktemp("base") / "tiny-sd"))


def finetune_params(base_model: str, **model):
    return parse_params(merge(tiny_params_dict(), {
        "model": {"mode": "finetune", "pretrained": base_model, **model},
        "train": {"steps": 8, "learning_rate": 0.01, "validate_every": 8, "sample_every": 0, "checkpoint_every": 8,
                  "log_every": 4, "warmup_steps": 0},
    }))


def project(trained_project, root, params):
    """The processed data of the trained project; vae and encode run for this model."""
    shutil.copytree(trained_project[1].processed, root / "data" / "processed")
    paths = Paths(root)
    vae_stage(paths, vae=params.vae, model=params.model, preprocess=params.preprocess)
    counts = encode(paths, encode=params.encode, model=params.model)
    return paths, counts


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    states = torch.randn(2, 24, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), states).sample


def test_lora_finetune_saves_weights_that_load_onto_the_base_model(trained_project, base_model, tmp_path,
                                                                   monkeypatch):
    params = finetune_params(base_model, finetune="lora", lora={"rank": 4, "alpha": 4})
    paths, _ = project(trained_project, tmp_path, params)
    training_denoiser, alive_at_export, load_base = [], [], export.base_denoiser_with_lora

    def build_model(*args, **kwargs):
        model = modules.build_model(*args, **kwargs)
        training_denoiser.append(weakref.ref(model.denoiser))
        return model

    def base_denoiser_with_lora(*args, **kwargs):
        alive_at_export.append(training_denoiser[0]() is not None)  # no gc.collect: a cycle left to it counts
        return load_base(*args, **kwargs)

    monkeypatch.setattr(train_stage, "build_model", build_model)
    monkeypatch.setattr(export, "base_denoiser_with_lora", base_denoiser_with_lora)
    metrics = train(params, paths)
    # at a base's real size, a training copy still alive when export loads the base again doubles the peak
    assert alive_at_export == [False], "the training denoiser was still in memory when export loaded the base"

    base = StableDiffusionPipeline.from_pretrained(base_model)
    assert 0 < metrics["trainable_parameters"] < sum(p.numel() for p in base.unet.parameters()) / 10
    assert (paths.sd_model / LORA_WEIGHTS).is_file()
    saved = StableDiffusionPipeline.from_pretrained(paths.sd_model)
    before = unet_output(base.unet)
    base.load_lora_weights(paths.sd_model)
    with_lora = unet_output(base.unet)
    assert not torch.allclose(with_lora, before, atol=1e-4), "training changed nothing"
    torch.testing.assert_close(unet_output(saved.unet), with_lora, atol=1e-4, rtol=1e-4)
    frozen = StableDiffusionPipeline.from_pretrained(base_model)
    for name in ("text_encoder", "vae"):
        for (key, original), (_, kept) in zip(getattr(frozen, name).state_dict().items(),
                                              getattr(saved, name).state_dict().items(), strict=True):
            assert torch.equal(original, kept), f"{name}.{key} changed: it must stay frozen"
    assert "load_lora_weights" in (paths.sd_model / "README.md").read_text()
    image = saved("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def sample(pipeline) -> torch.Tensor:
    return pipeline("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images


def with_lora(base_model: str, folder, weight_name: str) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline.from_pretrained(base_model)
    pipeline.load_lora_weights(folder, weight_name=weight_name)
    return pipeline


def test_a_lora_run_exports_a_kohya_file_that_plain_diffusers_loads_to_the_same_images(trained_project, base_model,
                                                                                        tmp_path):
    params = finetune_params(base_model, lora={"rank": 4, "alpha": 8, "export": ["diffusers", "kohya"]})
    paths, _ = project(trained_project, tmp_path, params)
    train(params, paths)

    diffusers_file = with_lora(base_model, paths.sd_model, LORA_WEIGHTS)
    assert diffusers_file.unet.peft_config["default_0"].lora_alpha == 8  # the scale trained with: alpha / rank = 2
    expected = sample(diffusers_file)
    assert not torch.allclose(expected, sample(StableDiffusionPipeline.from_pretrained(base_model)), atol=1e-3)
    assert torch.equal(sample(with_lora(base_model, paths.sd_model, KOHYA_LORA_WEIGHTS)), expected)
    fused = StableDiffusionPipeline.from_pretrained(paths.sd_model)
    torch.testing.assert_close(sample(fused), expected, atol=1e-4, rtol=0)
    assert KOHYA_LORA_WEIGHTS in (paths.sd_model / "README.md").read_text()


def test_a_dora_run_saves_magnitudes_that_load_and_fuse_in_plain_diffusers(trained_project, base_model, tmp_path):
    params = finetune_params(base_model, lora={"use_dora": True})
    paths, _ = project(trained_project, tmp_path, params)
    train(params, paths)

    saved = load_file(paths.sd_model / LORA_WEIGHTS)
    assert any(key.endswith("lora_magnitude_vector") for key in saved)
    loaded = with_lora(base_model, paths.sd_model, LORA_WEIGHTS)
    assert loaded.unet.peft_config["default_0"].use_dora
    expected = sample(loaded)
    assert not torch.allclose(expected, sample(StableDiffusionPipeline.from_pretrained(base_model)), atol=1e-3)
    torch.testing.assert_close(sample(StableDiffusionPipeline.from_pretrained(paths.sd_model)), expected,
                               atol=1e-4, rtol=0)  # models/sd: the DoRA layers fused into the base
    assert not (paths.sd_model / KOHYA_LORA_WEIGHTS).exists()


def test_full_finetune_trains_the_unet_on_cached_text_states(trained_project, base_model, tmp_path):
    params = finetune_params(base_model, finetune="full")
    paths, _ = project(trained_project, tmp_path, params)
    val = load_latents(paths.latents, "val")
    base = StableDiffusionPipeline.from_pretrained(base_model)
    empty = base.text_encoder(tokenize(base.tokenizer, [""]))[0][0]
    assert list(val.text_states) == ["prompt_embeds"]
    torch.testing.assert_close(val.text_states["prompt_embeds"][EMPTY_PROMPT_ROW], empty, atol=1e-5, rtol=1e-5)
    assert val.text_states["prompt_embeds"].shape[0] == 1 + len({c for c in val.captions if c})

    metrics = train(params, paths)
    assert metrics["trainable_parameters"] == sum(p.numel() for p in base.unet.parameters())
    assert not (paths.sd_model / LORA_WEIGHTS).exists()
    saved = load_file(paths.sd_model / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(saved[k], v) for k, v in base.unet.state_dict().items())
    text = load_file(paths.sd_model / "text_encoder" / "model.safetensors")
    assert all(torch.equal(text[k], v) for k, v in base.text_encoder.state_dict().items() if k in text)


def test_caches_are_reused_only_when_their_keys_match(trained_project, base_model, tmp_path):
    params = finetune_params(base_model)
    paths, first = project(trained_project, tmp_path, params)
    samples = first["train"] + first["val"]
    assert first["encoded"] == samples and first["reused"] == 0

    assert encode(paths, encode=params.encode, model=params.model)["encoded"] == 0
    flipped = params.model_copy(update={"encode": params.encode.model_copy(update={"mirrored": True})})
    both = encode(paths, encode=flipped.encode, model=flipped.model)
    assert (both["encoded"], both["reused"]) == (samples, samples)  # only the mirrored images are new
    group = load_latents(paths.latents, "train").single_size()
    assert not torch.allclose(group.flip_mean.load(), group.mean.load())
    half = params.model_copy(update={"encode": params.encode.model_copy(update={"dtype": "bfloat16"})})
    assert encode(paths, encode=half.encode, model=half.model)["encoded"] == samples
    mapped = load_latents(paths.latents, "train").single_size().mean
    assert mapped.dtype == torch.bfloat16
    rows = pd.read_parquet(paths.latents / "train.parquet")
    stored = torch.stack([load_file(paths.latents / row.posterior)[f"mean.{row.height}x{row.width}"][row.row]
                          for row in rows.itertuples()])
    assert torch.equal(mapped.load(), stored)  # bfloat16, read through the memory map


def test_finetune_needs_a_pretrained_model_it_can_find(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained: required when model.mode is finetune"):
        parse_params(merge(tiny_params_dict(), {"model": {"mode": "finetune"}}))
    params = parse_params(merge(tiny_params_dict(), {"model": {"mode": "finetune", "pretrained": "./models/nowhere"}}))
    with pytest.raises(ConfigError, match="model.pretrained: './models/nowhere' is neither a folder"):
        vae_stage(Paths(tmp_path), vae=params.vae, model=params.model, preprocess=params.preprocess)
    not_cached = parse_params(merge(tiny_params_dict(), {"model": {"mode": "finetune", "pretrained": "nobody/nothing"}}))
    with pytest.raises(ConfigError, match="cannot load vae of 'nobody/nothing': there is no folder .*HF_HUB_OFFLINE"):
        vae_stage(Paths(tmp_path), vae=not_cached.vae, model=not_cached.model, preprocess=not_cached.preprocess)


def test_unknown_lora_target_modules_are_named(trained_project, base_model, tmp_path):
    params = finetune_params(base_model, lora={"target_modules": ["to_nothing"]})
    paths, _ = project(trained_project, tmp_path, params)
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        train(params, paths)
