"""Every model family: a tiny pipeline built from scratch is that family's standard diffusers pipeline, and
the family's conditioning and denoiser call are the pipeline's own."""

import sys

import pytest
import torch
from diffusers import DiffusionPipeline

from pipeline.core.config import FAMILY_DECLARATIONS, ConfigError, TrainParams
from pipeline.core.params_file import parse_params
from pipeline.diffusion.families import FAMILIES, family_named, family_of_folder, load_pipeline
from pipeline.evaluation.noise_metrics import square_image_sizes
from pipeline.tracking.mlflow_model import sampling_arguments as served_sampling_arguments

from .conftest import merge, save_random_base_model, tiny_params_dict

PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "chroma": "ChromaPipeline",
                    "zimage": "ZImagePipeline"}


def pipeline_encoding(pipeline, captions: list[str]) -> dict[str, torch.Tensor]:
    """The pipeline's own encode_prompt, its tensors by the names a family's conditioning uses."""
    common = dict(device=torch.device("cpu"), num_images_per_prompt=1)
    name = type(pipeline).__name__
    if name == "FluxPipeline":  # (T5 states, pooled CLIP, text ids)
        encoded = pipeline.encode_prompt(captions, **common, max_sequence_length=pipeline.tokenizer_2.model_max_length)
        return {"prompt_embeds": encoded[0], "pooled_prompt_embeds": encoded[1]}
    if name == "ChromaPipeline":  # (T5 states, text ids, the transformer's mask, the negative's three)
        encoded = pipeline.encode_prompt(captions, **common, do_classifier_free_guidance=False,
                                         max_sequence_length=pipeline.tokenizer.model_max_length)
        return {"prompt_embeds": encoded[0], "prompt_attention_mask": encoded[2]}
    if name == "ZImagePipeline":  # (each caption's unpadded states, the negatives'): padded back, with their mask
        length = pipeline.tokenizer.model_max_length
        encoded, _ = pipeline.encode_prompt(list(captions), device=torch.device("cpu"),
                                            do_classifier_free_guidance=False, max_sequence_length=length)
        padded = torch.stack([torch.cat([states, states.new_zeros(length - len(states), states.shape[1])])
                              for states in encoded])
        mask = torch.stack([(torch.arange(length) < len(states)).to(states.dtype) for states in encoded])
        return {"prompt_embeds": padded, "prompt_attention_mask": mask}
    if name == "StableDiffusion3Pipeline":  # the other encoders' prompts default to the first's
        common.update(prompt_2=None, prompt_3=None, max_sequence_length=pipeline.tokenizer_3.model_max_length)
    encoded = pipeline.encode_prompt(captions, **common, do_classifier_free_guidance=False)
    if name == "StableDiffusionPipeline":  # (prompt, negative)
        return {"prompt_embeds": encoded[0]}
    return {"prompt_embeds": encoded[0], "pooled_prompt_embeds": encoded[2]}  # (prompt, negative, pooled, negative)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    return request.param, save_random_base_model(tmp_path_factory.mktemp(request.param) / "base", request.param)


def test_a_tiny_pipeline_saves_and_loads_back_as_its_family(saved):
    name, folder = saved
    loaded = DiffusionPipeline.from_pretrained(folder)
    assert type(loaded).__name__ == PIPELINE_CLASSES[name]
    assert family_of_folder(folder) is family_named(name)
    pipeline = load_pipeline(folder)
    arguments = family_named(name).sampling_arguments(pipeline, ["a red circle"], 4.0)
    image = pipeline(**arguments, num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())
    served = served_sampling_arguments(pipeline, "a red circle", "a blue square", 4.0)
    ours = family_named(name).sampling_arguments(pipeline, ["a red circle"], 4.0, "a blue square")
    assert served == {key: value[0] if isinstance(value, list) else value for key, value in ours.items()}, \
        "the served model (mlflow_model.py) samples as the family does"


@torch.no_grad()
def test_the_family_conditions_and_calls_the_denoiser_as_its_pipeline_does(saved):
    name, folder = saved
    family, pipeline = family_named(name), load_pipeline(folder)
    captions = ["a red circle", ""]
    ours = family.encode_text(pipeline.components, family.token_ids(pipeline.components, captions))
    assert list(ours) == list(family.conditioning)
    theirs = pipeline_encoding(pipeline, captions)
    assert list(theirs) == list(ours)
    for tensor in ours:
        torch.testing.assert_close(ours[tensor], theirs[tensor])
    denoiser = getattr(pipeline, family.denoiser)
    latents = torch.randn(2, pipeline.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    prediction = family.predict(denoiser, latents, torch.tensor([10, 900]), ours, square_image_sizes(2, 32))
    assert prediction.shape == latents.shape


def test_the_config_reads_each_familys_declaration_from_its_module():
    from pipeline.diffusion.flow_matching import FlowMatching

    assert list(FAMILY_DECLARATIONS) == sorted(FAMILIES), "every declared family is registered, and only those"
    for name, family in FAMILIES.items():
        assert FAMILY_DECLARATIONS[name] == family.declared
        assert family.pipeline_class.__name__ == PIPELINE_CLASSES[name]
        module = sys.modules[type(family).__module__]
        assert tuple(module.PRESETS) == family.presets, "the declared presets are the module's sizes"
        objective = family.training_objective(TrainParams(), None)
        assert isinstance(objective, FlowMatching) == family.declared.flow
        assert getattr(objective, "patch_size", 1) == family.declared.patch


# Where a family's name may appear as a string in pipeline/ and flows/ besides its own module: the params'
# default family, and models/sd, the trained model's folder (named before there were families).
NAME_ALLOWED = {("pipeline/core/config.py", "sd"), ("pipeline/contracts/paths.py", "sd")}


def test_no_module_but_the_familys_own_names_it():
    """A family is one module: nothing else switches on its name (adding one touches its module, the
    registry line in families/__init__.py, its tests and the docs)."""
    import ast

    from .conftest import REPO

    found = []
    for source in sorted([*REPO.glob("pipeline/**/*.py"), *REPO.glob("flows/**/*.py")]):
        where = source.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in FAMILY_DECLARATIONS and \
                    where != f"pipeline/diffusion/families/{node.value}.py" and (where, node.value) not in NAME_ALLOWED:
                found.append(f"{where}:{node.lineno}: {node.value!r}")
    assert not found, found


@pytest.mark.parametrize("family", ["sd3", "flux", "chroma", "zimage"])
def test_ddpm_settings_are_refused_for_the_flow_families_with_a_sentence(family):
    with pytest.raises(ConfigError, match=f"train.snr_gamma: min-SNR weighting is DDPM's .* {family} trains by flow"):
        parse_params(merge(tiny_params_dict(), {"model": {"family": family}, "train": {"snr_gamma": 5.0}}))
    with pytest.raises(ConfigError, match="train.prediction_type: v_prediction is a DDPM target"):
        parse_params(merge(tiny_params_dict(), {"model": {"family": family},
                                                "train": {"prediction_type": "v_prediction"}}))


@torch.no_grad()
def test_chroma_attends_to_the_caption_and_one_padding_token(tmp_path):
    """T5 reads the tokenizer's mask, and the transformer attends to each caption's tokens and exactly one
    padding token (ChromaPipeline's rule): the padding beyond it changes nothing, the mask reaches the blocks."""
    family, pipeline = family_named("chroma"), load_pipeline(save_random_base_model(tmp_path / "chroma", "chroma"))
    captions = ["a red circle", "a big purple triangle on a green square"]
    tokens = family.token_ids(pipeline.components, captions)
    conditioning = family.encode_text(pipeline.components, tokens)
    lengths = tokens["tokenizer_attention_mask"].sum(dim=1)
    assert lengths[0] < lengths[1] < tokens["tokenizer"].shape[1], "both captions are padded, by different counts"
    assert conditioning["prompt_attention_mask"].sum(dim=1).tolist() == (lengths + 1).tolist()
    latents = torch.randn(2, pipeline.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps, sizes = torch.tensor([300, 700]), square_image_sizes(2, 32)
    masked = family.predict(pipeline.transformer, latents, timesteps, conditioning, sizes)
    unmasked = {**conditioning, "prompt_attention_mask": torch.ones_like(conditioning["prompt_attention_mask"])}
    assert not torch.allclose(masked, family.predict(pipeline.transformer, latents, timesteps, unmasked, sizes))


def test_the_chroma1_preset_has_chroma1s_sizes():
    from pipeline.diffusion.families.chroma import PRESETS, build_transformer

    with torch.device("meta"):  # shapes only: 8.9 B parameters would take 36 GB in fp32
        transformer = build_transformer(PRESETS["chroma1"], latent_channels=16, latent_size=128)
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 1) == 8.9  # lodestones/Chroma1-HD's card


@torch.no_grad()
def test_zimage_predicts_the_velocity_zimagepipelines_euler_step_takes(tmp_path):
    """The transformer takes 1 - σ and its output negated is the velocity: one Euler step of ZImagePipeline from
    σ = 1 to 0 without guidance (guidance_scale 0) lands on the latents minus the family's prediction at t = 1000,
    conditioned on each caption's own states, whatever the other caption's length."""
    family, pipeline = family_named("zimage"), load_pipeline(save_random_base_model(tmp_path / "zimage", "zimage"))
    captions = ["a red circle", "a big purple triangle on a green square"]
    latents = torch.randn(2, pipeline.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    # a copy of the captions: the pipeline writes the templated prompts into the list
    stepped = pipeline(prompt=list(captions), latents=latents, num_inference_steps=1, guidance_scale=0.0,
                       max_sequence_length=pipeline.tokenizer.model_max_length, height=32, width=32,
                       output_type="latent").images
    conditioning = family.encode_text(pipeline.components, family.token_ids(pipeline.components, captions))
    prediction = family.predict(pipeline.transformer, latents, torch.tensor([1000.0, 1000.0]), conditioning,
                                square_image_sizes(2, 32))
    torch.testing.assert_close(stepped, latents - prediction, atol=1e-5, rtol=1e-5)
    alone = family.encode_text(pipeline.components, family.token_ids(pipeline.components, captions[:1]))
    torch.testing.assert_close(family.predict(pipeline.transformer, latents[:1], torch.tensor([1000.0]), alone,
                                              square_image_sizes(1, 32)), prediction[:1], atol=1e-5, rtol=1e-5)


def test_zimage_samples_with_classifier_free_guidance_as_the_other_families_count_it(tmp_path):
    """ZImagePipeline mixes pos + g·(pos - neg): sdpipe's scale w goes in as g = w - 1, so w = 1 is no guidance
    (the pipeline then runs no unconditional branch) and the card names the trained size and Qwen3's length."""
    family, pipeline = family_named("zimage"), load_pipeline(save_random_base_model(tmp_path / "zimage", "zimage"))
    arguments = family.sampling_arguments(pipeline, ["a red circle"], 4.0, "a blue square")
    assert arguments == {"prompt": ["a red circle"], "guidance_scale": 3.0, "negative_prompt": ["a blue square"],
                         "max_sequence_length": pipeline.tokenizer.model_max_length, "height": 32, "width": 32}
    assert family.sampling_arguments(pipeline, ["a red circle"], 1.0)["guidance_scale"] == 0.0
    assert family.default_size(pipeline) == {"height": 1024, "width": 1024}, "ZImagePipeline's own default"

    # sample grids of a fine-tune sample from the cached states (the caption's and the empty prompt's)
    cached = family.encode_text(pipeline.components, family.token_ids(pipeline.components, ["a red circle", ""]))
    from_cache = family.with_cached_states({
        **{key: value for key, value in arguments.items() if key not in ("prompt", "negative_prompt")},
        **{name: tensor[:1] for name, tensor in cached.items()},
        **{f"negative_{name}": tensor[1:] for name, tensor in cached.items()}})
    draw = dict(num_inference_steps=2, output_type="np")
    with torch.no_grad():
        expected = pipeline(**{**arguments, "negative_prompt": None}, **draw,
                            generator=torch.Generator().manual_seed(0)).images
        drawn = pipeline(**from_cache, **draw, generator=torch.Generator().manual_seed(0)).images
    assert abs(drawn - expected).max() < 1e-5


@torch.no_grad()
def test_zimage_latents_are_normalised_as_its_pipelines_encode_images(tmp_path):
    """The latents training sees are those ZImageImg2ImgPipeline makes of an image before noising it: shifted by
    the VAE's shift_factor and scaled by its scaling_factor (ZImagePipeline decodes by the inverse)."""
    from diffusers import ZImageImg2ImgPipeline

    from pipeline.diffusion.vae_io import denoiser_latents

    pipeline = load_pipeline(save_random_base_model(tmp_path / "zimage", "zimage"))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    img2img = ZImageImg2ImgPipeline(**pipeline.components)
    img2img.scheduler.scale_noise = lambda sample, timestep, noise: sample  # the clean latents, before the noise
    theirs = img2img.prepare_latents(image, torch.tensor([1000.0]), 1, 16, 32, 32, torch.float32, torch.device("cpu"),
                                     torch.Generator().manual_seed(1))
    sample = pipeline.vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(1))
    assert pipeline.vae.config.shift_factor not in (None, 0.0)
    torch.testing.assert_close(denoiser_latents(sample, pipeline.vae.config), theirs)


def test_the_z_image_6b_preset_has_z_images_sizes():
    from pipeline.diffusion.families.zimage import PRESETS, build_transformer

    with torch.device("meta"):  # shapes only: 6 B parameters would take 25 GB in fp32
        transformer = build_transformer(PRESETS["z_image_6b"], latent_channels=16, latent_size=128)
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 2) == 6.15  # Tongyi-MAI/Z-Image's 12.3 GB bf16


def test_a_preset_of_another_family_is_named():
    with pytest.raises(ConfigError, match="model.preset: 'sd15' is not a preset of model.family sdxl"):
        parse_params(merge(tiny_params_dict(), {"model": {"family": "sdxl", "preset": "sd15"}}))


def test_the_crop_corner_is_where_the_fitted_crop_starts_in_the_scaled_image():
    from PIL import Image

    from pipeline.data.images import crop_top_left, resize_and_crop

    assert crop_top_left((40, 20), (16, 16), (0.25, 0.5)) == (4, 0)  # crop 20 wide from x = 5, scaled by 0.8
    assert crop_top_left((20, 40), (16, 16), (0.5, 1.0)) == (0, 16)
    assert crop_top_left((30, 30), (16, 16), (0.7, 0.2)) == (0, 0)
    pattern = Image.linear_gradient("L").resize((120, 60)).convert("RGB")
    left, top = crop_top_left(pattern.size, (32, 32), (0.25, 0.5))
    scaled = pattern.resize((64, 32), Image.Resampling.LANCZOS).crop((left, top, left + 32, top + 32))
    fitted = resize_and_crop(pattern, (32, 32), (0.25, 0.5))
    assert abs(torch.tensor(list(scaled.getdata())).float() - torch.tensor(list(fitted.getdata())).float()).mean() < 2


def test_sdxl_time_ids_follow_each_images_recorded_size_and_crop(tmp_path):
    """A non-square image's size before preprocess and its crop travel from preprocess through encode to the
    UNet's time ids."""
    import pandas as pd

    from pipeline.contracts.data import MANIFEST
    from pipeline.contracts.latents import IMAGE_SIZE_COLUMNS, load_latents
    from pipeline.diffusion.components import build_vae
    from pipeline.stages.encode import encode
    from pipeline.stages.preprocess import preprocess

    from .conftest import folder_project

    params, paths = folder_project(tmp_path, [(48, 24), (24, 40), (32, 32)] * 4, crop="random", val_fraction=0.3)
    preprocess(params.preprocess, paths)
    build_vae(params.vae, 32, latent_channels=4).save_pretrained(paths.vae_model)
    encode(paths, encode=params.encode, model=params.model)
    manifest = pd.read_parquet(paths.processed / "train" / MANIFEST)
    wide = manifest[manifest["original_width"] == 48].iloc[0]
    assert (wide["original_height"], wide["crop_top"], wide["width"], wide["height"]) == (24, 0, 32, 32)
    assert 0 <= wide["crop_left"] <= 32 and manifest["crop_left"].nunique() > 1, "random crops start apart"
    cache = load_latents(paths.latents, "train")
    expected = torch.tensor(manifest.set_index("id").loc[cache.ids, list(IMAGE_SIZE_COLUMNS)].to_numpy(), dtype=torch.float32)
    assert torch.equal(cache.image_sizes, expected)

    family, pipeline = family_named("sdxl"), load_pipeline(save_random_base_model(tmp_path / "sdxl", "sdxl"))
    conditioning = family.encode_text(pipeline.components, family.token_ids(pipeline.components, ["a", "a"]))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    not_square = cache.image_sizes[cache.image_sizes[:, 0] != cache.image_sizes[:, 1]][:2]
    with torch.no_grad():
        recorded = family.predict(pipeline.unet, latents, torch.tensor([500, 500]), conditioning, not_square)
        square = family.predict(pipeline.unet, latents, torch.tensor([500, 500]), conditioning, square_image_sizes(2, 32))
    assert not torch.allclose(recorded, square), "the time ids reach the UNet"
