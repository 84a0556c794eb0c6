import json
import os
import subprocess
import sys

import torch

from pipeline.core.config import VaeParams
from pipeline.diffusion.components import build_vae
from pipeline.diffusion.families.base import Scratch
from pipeline.diffusion.families.sd import FAMILY, PRESETS, build_unet
from pipeline.diffusion.tokenizer import build_qwen2_tokenizer, build_t5_tokenizer, build_tokenizer, tokenize

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


def test_t5_tokenizer_learns_whole_words_the_same_in_every_process(tmp_path):
    """Hash order must not change the vocabulary (the `tokenizers` Unigram trainer's does): cache keys and exact
    resume depend on the token ids."""
    from transformers import AutoTokenizer

    tokenizer = build_t5_tokenizer(CAPTIONS, vocab_size=1000, max_tokens=8)
    assert tokenizer.tokenize("a red circle") == ["▁a", "▁red", "▁circle"]
    assert len(tokenizer.tokenize("a purple hexagon")) > 3, "unseen words are spelled out"
    assert tokenize(tokenizer, ["a red circle"]).tolist() == [tokenizer.convert_tokens_to_ids(
        ["▁a", "▁red", "▁circle", "</s>", "<pad>", "<pad>", "<pad>", "<pad>"])], "eos, then padded to max_tokens"
    assert tokenize(tokenizer, ["a " * 20])[0, -1] == tokenizer.eos_token_id, "truncated, ending with eos"
    script = ("import json, sys; from pipeline.diffusion.tokenizer import build_t5_tokenizer; "
              "print(json.dumps(build_t5_tokenizer(json.loads(sys.argv[1]), vocab_size=1000, max_tokens=8).get_vocab()))")
    other = subprocess.run([sys.executable, "-c", script, json.dumps(list(reversed(CAPTIONS)))],
                           env={**os.environ, "PYTHONHASHSEED": "12345"}, capture_output=True, text=True, check=True)
    assert json.loads(other.stdout) == tokenizer.get_vocab()
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).tokenize("a red circle") == ["▁a", "▁red", "▁circle"]


def test_qwen2_tokenizer_learns_whole_words_and_templates_prompts_as_the_qwen_pipelines_call_it(tmp_path):
    """ZImagePipeline applies the chat template with enable_thinking=True, Flux2KleinPipeline with False (an empty
    thinking block); the padded, truncated ids then go to the Qwen3 encoder with their attention mask."""
    from transformers import AutoTokenizer

    tokenizer = build_qwen2_tokenizer(CAPTIONS, vocab_size=1000, max_tokens=24)
    assert tokenizer.tokenize("a red circle") == ["a", "Ġred", "Ġcircle"]
    assert len(tokenizer.tokenize("a purple hexagon")) > 3, "unseen words are spelled in bytes"
    again = build_qwen2_tokenizer(list(reversed(CAPTIONS)), vocab_size=1000, max_tokens=24)
    assert again.get_vocab() == tokenizer.get_vocab(), "the same captions must give the same token ids"
    messages = [{"role": "user", "content": "a red circle"}]
    thinking = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert thinking == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"
    not_thinking = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False)
    assert not_thinking == thinking + "<think>\n\n</think>\n\n"
    assert tokenizer.tokenize(thinking) == ["<|im_start|>", "user", "Ċ", "a", "Ġred", "Ġcircle", "<|im_end|>", "Ċ",
                                            "<|im_start|>", "assistant", "Ċ"]
    encoded = tokenizer([thinking], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert encoded.attention_mask.tolist() == [[1] * 11 + [0] * 5]
    assert encoded.input_ids[0, 11:].tolist() == [tokenizer.convert_tokens_to_ids("<|endoftext|>")] * 5, "pads"
    assert tokenizer.decode(encoded.input_ids[0], skip_special_tokens=True) == "user\na red circle\nassistant\n"
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                      enable_thinking=False) == not_thinking
    assert loaded(not_thinking).input_ids == tokenizer(not_thinking).input_ids


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
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # stable-diffusion-v1-5/stable-diffusion-v1-5's UNet
    assert unet.config.down_block_types[-1] == "DownBlock2D" and unet.config.cross_attention_dim == 768
