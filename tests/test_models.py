import torch

from pipeline.core.config import VaeParams
from pipeline.diffusion.components import build_vae
from pipeline.diffusion.families.base import Scratch
from pipeline.diffusion.families.sd import FAMILY, PRESETS, build_unet
from pipeline.diffusion.tokenizer import build_tokenizer, tokenize

CAPTIONS = ["a red circle", "a blue square on a light background", "a picture of a green triangle"] * 20


def test_tokenizer_learns_whole_words_and_falls_back_to_characters(tmp_path):
    tokenizer = build_tokenizer(CAPTIONS, vocab_size=1000, max_tokens=24)
    assert tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    assert len(tokenizer.tokenize("a purple hexagon")) > 3
    again = build_tokenizer(list(reversed(CAPTIONS)), vocab_size=1000, max_tokens=24)
    assert again.get_vocab() == tokenizer.get_vocab(), "the same captions must give the same token ids"
    tokenizer.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(tmp_path).tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]


def test_components_fit_together():
    components = FAMILY.scratch_components(Scratch(tuple(CAPTIONS), "tiny", 1000, latent_channels=4, latent_size=8))
    tokenizer, text_encoder, unet = components["tokenizer"], components["text_encoder"], components["unet"]
    vae = build_vae(VaeParams(), resolution=32, latent_channels=4)
    ids = tokenize(tokenizer, ["a red circle"])
    assert ids.shape == (1, PRESETS["tiny"].max_tokens)
    with torch.no_grad():
        states = text_encoder(ids)[0]
        latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
        noise = unet(latents, torch.tensor([10]), states).sample
    assert latents.shape == (1, 4, 8, 8)
    assert noise.shape == latents.shape


def test_sd15_preset_has_stable_diffusion_15_sizes():
    from accelerate import init_empty_weights

    with init_empty_weights():  # shapes only: no 3.4 GB of weights
        unet = build_unet(PRESETS["sd15"], latent_channels=4, latent_size=64)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # runwayml/stable-diffusion-v1-5's UNet
    assert unet.config.down_block_types[-1] == "DownBlock2D" and unet.config.cross_attention_dim == 768
