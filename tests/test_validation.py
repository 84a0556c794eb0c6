"""Validation during training (pipeline/training/validation.py, best.py): the validation prompts' grid beside the
base model's column, the sample metric at each sample step, the best step's model kept, early stopping, resume.

A LoRA fine-tune of a tiny random Stable Diffusion pipeline (the layout real weights have) on the tiny project's
shapes, with real MLflow (SQLite under the project)."""

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from pipeline.contracts.latents import StalePromptStates, prompt_states
from pipeline.contracts.paths import Paths
from pipeline.core.atomic import read_json
from pipeline.core.config import ConfigError
from pipeline.core.params_file import parse_params
from pipeline.data.images import GRID_ZOOM
from pipeline.diffusion.schedule import SAMPLE_GUIDANCE
from pipeline.stages import train as train_stage
from pipeline.stages.encode import encode
from pipeline.stages.train import train
from pipeline.stages.vae import vae_stage
from pipeline.training.export import LORA_WEIGHTS

from .conftest import merge, save_random_base_model, save_random_clip, tiny_params_dict

PROMPTS = ["a {trigger} circle", "a red square"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    return str(save_random_base_model(tmp_path_factory.mktemp("base") / "tiny-sd"))


@pytest.fixture(scope="module")
def clip_folder(base_model, tmp_path_factory):
    """A tiny random CLIP with the base model's tokenizer: a deterministic clip_score nobody tuned."""
    return str(save_random_clip(Path(base_model) / "tokenizer", tmp_path_factory.mktemp("clip")))


def run_params(base_model: str, **train):
    return parse_params(merge(tiny_params_dict(), {
        "ingest": {"trigger": "sks"},
        "model": {"mode": "finetune", "pretrained": base_model, "finetune": "lora", "lora": {"rank": 4, "alpha": 4}},
        "train": {"steps": 6, "learning_rate": 0.05, "warmup_steps": 0, "lr_schedule": "constant_with_warmup",
                  "validate_every": 100, "log_every": 2, "sample_every": 3, "checkpoint_every": 100,
                  "validation_prompts": PROMPTS, "validation_seeds": SEEDS, **train},
    }))


@pytest.fixture(scope="module")
def prepared(trained_project, base_model, tmp_path_factory):
    """data/processed of the trained project, with this base's VAE and encode's caches (validation prompts too)."""
    root = tmp_path_factory.mktemp("prepared")
    shutil.copytree(trained_project[1].processed, root / "data" / "processed")
    params, paths = run_params(base_model), Paths(root)
    vae_stage(paths, vae=params.vae, model=params.model, preprocess=params.preprocess)
    encode(paths, encode=params.encode, model=params.model, train=params.train, ingest=params.ingest)
    return root


def project(prepared, root) -> Paths:
    for folder in ("data/processed", "data/latents", "models/vae"):
        shutil.copytree(prepared / folder, root / folder)
    return Paths(root)


def read_run_id(paths: Paths) -> str:
    return read_json(paths.run_record)["run_id"]


def client(paths: Paths) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{paths.root / 'mlflow.db'}")


def history(paths: Paths, metric: str) -> dict[int, float]:
    run_id = read_run_id(paths)
    return {point.step: point.value for point in client(paths).get_metric_history(run_id, metric)}


def grid_columns(paths: Paths, step: int, tmp_path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The logged grid of a step, cut into its (base, current) 32 px tiles, one row per (prompt, seed)."""
    folder = client(paths).download_artifacts(read_run_id(paths), "samples", str(tmp_path / f"grid-{step}"))
    pixels = np.asarray(Image.open(f"{folder}/step-{step:07d}.png").convert("RGB"))[::GRID_ZOOM, ::GRID_ZOOM]
    rows = [pixels[top : top + 32] for top in range(0, pixels.shape[0], 32)]
    return [row[:, :32] for row in rows], [row[:, 32:64] for row in rows]


def base_model_images(paths: Paths, base_model: str) -> list[np.ndarray]:
    """What the base model draws for the prompts at the seeds, from the prompt text (its own text encoder), with
    the sampler the run samples with; one per (prompt, seed) in the grid's order."""
    pipeline = DiffusionPipeline.from_pretrained(paths.sd_model)
    pipeline.unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    images, steps = {}, run_params(base_model).train.sample_steps
    for seed in SEEDS:
        prompts = [prompt.replace("{trigger}", "sks") for prompt in PROMPTS]
        drawn = pipeline(prompts, guidance_scale=SAMPLE_GUIDANCE, num_inference_steps=steps, height=32,
                         width=32, generator=[torch.Generator().manual_seed(seed) for _ in prompts]).images
        images.update({(prompt, seed): np.asarray(image) for prompt, image in zip(PROMPTS, drawn, strict=True)})
    return [images[prompt, seed] for prompt in PROMPTS for seed in SEEDS]


def lora_weights(paths: Paths) -> dict[str, torch.Tensor]:
    return load_file(paths.sd_model / LORA_WEIGHTS)


def test_the_grid_shows_the_base_models_images_beside_the_trained_ones(prepared, base_model, tmp_path):
    paths = project(prepared, tmp_path / "run")
    metrics = train(run_params(base_model, sample_metric="adherence"), paths)

    expected = base_model_images(paths, base_model)
    for step in (3, 6):
        base, current = grid_columns(paths, step, tmp_path)
        assert len(base) == len(PROMPTS) * len(SEEDS)
        for drawn, wanted in zip(base, expected, strict=True):
            # from cached text states (train) and from the prompt text (here): the same up to float rounding
            assert np.abs(drawn.astype(int) - wanted.astype(int)).max() <= 2
    assert any(np.abs(now.astype(int) - was.astype(int)).mean() > 5 for now, was in zip(current, base, strict=True))
    # adherence reads "a red square" (the trigger prompt is no shape caption): logged for the base and each sample step
    assert set(history(paths, "adherence")) == {0, 3, 6}
    assert set(history(paths, "colour_accuracy")) == {0, 3, 6}
    assert "kept_step" not in metrics


def test_a_sample_metric_that_cannot_score_the_prompts_is_refused(prepared, base_model, tmp_path):
    paths = project(prepared, tmp_path / "run")
    with pytest.raises(ConfigError, match="train.sample_metric: adherence reads colour-and-shape prompts"):
        train(run_params(base_model, sample_metric="adherence", validation_prompts=["a photo of {trigger}"]), paths)
    with pytest.raises(ConfigError, match="train.sample_metric: clip_score needs evaluate.clip_model"):
        train(run_params(base_model, sample_metric="clip_score"), paths)


def test_keep_best_is_never_the_training_loss_and_needs_a_sample_metric(base_model):
    with pytest.raises(ConfigError, match="train.keep_best.metric: the training loss is too noisy"):
        run_params(base_model, sample_metric="adherence", keep_best={"metric": "train_loss"})
    with pytest.raises(ConfigError, match="train.keep_best: needs train.sample_metric"):
        run_params(base_model, keep_best={"metric": "adherence"})
    with pytest.raises(ConfigError, match="'clip_score' is not logged by train.sample_metric adherence"):
        run_params(base_model, sample_metric="adherence", keep_best={"metric": "clip_score"})
    with pytest.raises(ConfigError, match="train.early_stopping_patience: needs train.keep_best"):
        run_params(base_model, early_stopping_patience=2)


KEEP_BEST = {"steps": 10, "sample_every": 2, "checkpoint_every": 2, "sample_metric": "clip_score",
             "keep_best": {"metric": "clip_score", "mode": "max"}}


def clip_params(base_model: str, clip_folder: str, **train):
    params = run_params(base_model, **{**KEEP_BEST, **train})
    return params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"clip_model": clip_folder})})


@pytest.fixture(scope="module")
def kept_run(prepared, base_model, clip_folder, tmp_path_factory):
    """A run to the end with keep_best: its metrics, the score history and the exported LoRA weights."""
    paths = project(prepared, tmp_path_factory.mktemp("kept") / "run")
    metrics = train(clip_params(base_model, clip_folder), paths)
    return metrics, history(paths, "clip_score"), lora_weights(paths)


def test_keep_best_exports_the_best_sample_steps_model_not_the_last(kept_run, prepared, base_model, tmp_path):
    metrics, scores, kept = kept_run
    trained = {step: value for step, value in scores.items() if step > 0}
    assert sorted(trained) == [2, 4, 6, 8, 10]
    best = max(trained, key=trained.get)
    # the run this test needs: the score peaks before the end, strictly (no tie decides it)
    assert best < 10 and all(value < trained[best] for step, value in trained.items() if step != best)
    assert metrics["kept_step"] == best and metrics["kept_clip_score"] == pytest.approx(trained[best])

    # the same training stopped at the kept step (a constant learning rate: the steps before it are the same)
    paths = project(prepared, tmp_path / "to-best")
    train(run_params(base_model, steps=best, sample_every=0, checkpoint_every=100), paths)
    at_best = lora_weights(paths)
    assert kept.keys() == at_best.keys()
    assert all(torch.equal(kept[name], at_best[name]) for name in kept)


def test_early_stopping_stops_patience_sample_steps_after_the_best(kept_run, prepared, base_model, clip_folder,
                                                                   tmp_path):
    expected, scores, kept = kept_run
    patience = 1
    paths = project(prepared, tmp_path / "run")
    metrics = train(clip_params(base_model, clip_folder, early_stopping_patience=patience), paths)
    assert metrics["kept_step"] == expected["kept_step"]
    assert metrics["stopped_early_at_step"] == expected["kept_step"] + patience * KEEP_BEST["sample_every"]
    assert max(history(paths, "clip_score")) == metrics["stopped_early_at_step"]
    assert all(torch.equal(lora_weights(paths)[name], kept[name]) for name in kept)


def test_a_resumed_run_keeps_the_best_so_far(kept_run, prepared, base_model, clip_folder, tmp_path, monkeypatch):
    """Killed after a checkpoint that follows the best step, the run resumes knowing that best: a run that forgot
    it would keep the best of the steps after the checkpoint."""
    expected, _, kept = kept_run
    kill_at = expected["kept_step"] + 3  # after the checkpoint at kept_step + 2 (none at the last step)
    assert kill_at < KEEP_BEST["steps"]
    paths = project(prepared, tmp_path / "run")
    params = clip_params(base_model, clip_folder)
    calls, loss = [], train_stage.diffusion_loss

    def dying_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at + 1:  # the first call counts the FLOPs, before step 1
            raise KeyboardInterrupt("killed")
        return loss(*args, **kwargs)

    monkeypatch.setattr(train_stage, "diffusion_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train(params, paths)
    monkeypatch.setattr(train_stage, "diffusion_loss", loss)
    metrics = train(params, paths)
    assert metrics["resumed_from_step"] == kill_at - 1
    assert metrics["kept_step"] == expected["kept_step"]
    assert all(torch.equal(lora_weights(paths)[name], kept[name]) for name in kept)


def test_encode_caches_the_prompts_states_and_train_refuses_prompts_it_has_none_for(prepared, base_model, tmp_path):
    paths = project(prepared, tmp_path / "run")
    changed = run_params(base_model, validation_prompts=["a {trigger} triangle"])
    with pytest.raises(StalePromptStates, match="run encode again"):
        train(changed, paths)
    counts = encode(paths, encode=changed.encode, model=changed.model, train=changed.train, ingest=changed.ingest)
    assert counts["encoded"] == 0  # no image re-encoded: only the new prompt's text file
    states, empty = prompt_states(paths.latents, ["a sks triangle"])
    assert states["prompt_embeds"].shape[0] == 1 and empty["prompt_embeds"].dim() == 2
