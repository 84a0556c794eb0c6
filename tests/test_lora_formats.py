"""The LoRA files models/sd carries load in plain diffusers as the layers that were trained: alpha and DoRA kept in
the diffusers file, and kohya's key layout read back by diffusers' own kohya conversion to the same images."""

import pytest
import torch
from diffusers.utils import convert_unet_state_dict_to_peft

from pipeline.core.config import ConfigError, LoraParams
from pipeline.diffusion.families import family_named
from pipeline.training.lora_formats import KOHYA_LORA_WEIGHTS, kohya_layers, save_kohya_lora
from pipeline.training.modules import lora_config


def pipeline_with_trained_lora(family, base, settings: LoraParams):
    """The base pipeline with the LoRA layers sdpipe trains, their up weights (and DoRA magnitudes) moved away
    from peft's initial values as training would."""
    pipeline = family.pipeline_class.from_pretrained(base)
    denoiser = getattr(pipeline, family.denoiser)
    denoiser.add_adapter(lora_config(family, settings))
    torch.manual_seed(1)
    for name, parameter in denoiser.named_parameters():
        if "lora_B" in name or "lora_magnitude_vector" in name:
            parameter.data += 0.1 * torch.randn_like(parameter)
    return pipeline


def images(pipeline) -> torch.Tensor:
    return pipeline("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images


def loaded(family, base, folder, weight_name: str):
    pipeline = family.pipeline_class.from_pretrained(base)
    pipeline.load_lora_weights(folder, weight_name=weight_name)
    return pipeline


@pytest.mark.parametrize(("name", "use_dora"), [("sd", False), ("sd", True), ("flux", True)])
def test_the_diffusers_file_loads_as_the_trained_layers_alpha_and_dora_included(bases, tmp_path, name, use_dora):
    family, settings = family_named(name), LoraParams(rank=4, alpha=8.0, use_dora=use_dora)
    trained = pipeline_with_trained_lora(family, bases[name], settings)
    family.save_lora(tmp_path, family.lora_layers(getattr(trained, family.denoiser)),
                     lora_config(family, settings).to_dict())
    expected = images(trained)
    assert not torch.allclose(expected, images(family.pipeline_class.from_pretrained(bases[name])), atol=1e-3)
    user = loaded(family, bases[name], tmp_path, "pytorch_lora_weights.safetensors")
    torch.testing.assert_close(images(user), expected, atol=1e-6, rtol=0)  # alpha / rank = 2, not 1
    user.fuse_lora()
    torch.testing.assert_close(images(user), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_the_kohya_file_loads_through_diffusers_kohya_conversion_to_the_same_images(bases, tmp_path, name):
    family, settings = family_named(name), LoraParams(rank=4, alpha=8.0)
    trained = pipeline_with_trained_lora(family, bases[name], settings)
    layers = family.lora_layers(getattr(trained, family.denoiser))
    family.save_lora(tmp_path, layers, lora_config(family, settings).to_dict())
    save_kohya_lora(tmp_path, family, layers, settings)

    kohya = kohya_layers(layers, settings)
    assert kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"] == 8.0
    assert {key.rsplit(".", 2)[-2] if key.endswith(".weight") else "alpha" for key in kohya} == {
        "lora_down", "lora_up", "alpha"}
    from_diffusers_file = images(loaded(family, bases[name], tmp_path, "pytorch_lora_weights.safetensors"))
    from_kohya_file = loaded(family, bases[name], tmp_path, KOHYA_LORA_WEIGHTS)
    assert torch.equal(images(from_kohya_file), from_diffusers_file)
    torch.testing.assert_close(from_diffusers_file, images(trained), atol=1e-6, rtol=0)
    from_kohya_file.fuse_lora()
    torch.testing.assert_close(images(from_kohya_file), from_diffusers_file, atol=1e-4, rtol=0)


def test_a_kohya_layer_diffusers_would_misread_is_refused_before_the_file_is_written(tmp_path):
    """diffusers' conversion strips SDXL's add_embedding.linear_1 to add_embedding.linear (kohya's names for it
    are sgm's label_emb): the file would load with that layer missing."""
    family = family_named("sdxl")
    layers = {"add_embedding.linear_1.lora.down.weight": torch.zeros(4, 8),
              "add_embedding.linear_1.lora.up.weight": torch.zeros(8, 4)}
    with pytest.raises(ConfigError, match=r"model\.lora\.export: kohya: .*add_embedding\.linear_1"):
        save_kohya_lora(tmp_path, family, layers, LoraParams())
    assert not (tmp_path / KOHYA_LORA_WEIGHTS).exists()
    state, _ = family.pipeline_class.lora_state_dict(kohya_layers(layers, LoraParams()))
    assert "add_embedding.linear_1" not in " ".join(convert_unet_state_dict_to_peft(state))
