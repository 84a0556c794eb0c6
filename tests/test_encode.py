"""encode: latent files that follow the processed shards, written on Ray, reused while their keys hold."""

import shutil
import sys

import pandas as pd
import torch
from diffusers import AutoencoderKL

from pipeline.contracts.data import load_split
from pipeline.contracts.latents import load_latents
from pipeline.core.config import RayParams
from pipeline.diffusion.vae_io import encode_images, to_model_range
from pipeline.runtime.ray_tasks import run_tasks, start_ray
from pipeline.stages.encode import encode
from pipeline.stages.ingest import ingest
from pipeline.stages.preprocess import preprocess
from pipeline.stages.validate import validate

from .conftest import add_patterns, folder_project, tree_hashes


def encoded_project(root, trained_project):
    """30 folder images preprocessed at 32 px with the tiny chain's VAE, encoded once."""
    params, paths = folder_project(root, [(24, 20)] * 30, val_fraction=0.2)
    preprocess(params.preprocess, paths)
    shutil.copytree(trained_project[1].vae_model, paths.vae_model)
    return params, paths, encode(paths, encode=params.encode, model=params.model)


def test_latents_are_the_vae_posteriors_of_the_processed_images_read_by_index(trained_project, tmp_path):
    _, paths, counts = encoded_project(tmp_path, trained_project)
    assert (counts["encoded"], counts["reused"]) == (30, 0)
    images, rows = load_split(paths, "train")
    vae = AutoencoderKL.from_pretrained(paths.vae_model)
    mean, std = encode_images(vae, to_model_range(images), batch_size=64)
    cached = load_latents(paths.latents, "train")
    assert cached.ids == rows["id"].tolist()
    group = cached.single_size()
    torch.testing.assert_close(group.mean.load(), mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(group.std.load(), std, atol=1e-5, rtol=1e-4)
    positions = torch.tensor([5, 0, 5, len(rows) - 1])
    assert torch.equal(group.mean[positions], group.mean.load()[positions]), "a batch reads its rows by index"
    files = pd.read_parquet(paths.latents / "train.parquet")["posterior"].unique()
    processed = pd.read_parquet(paths.processed / "train" / "manifest.parquet")["shard"].unique()
    assert len(files) == len(processed), "one latent file per processed shard"


def test_adding_images_encodes_only_their_shards_and_a_new_dtype_replaces_every_file(trained_project, tmp_path):
    params, paths, _ = encoded_project(tmp_path, trained_project)
    before = tree_hashes(paths.latents / "shards")
    add_patterns(tmp_path / "source", [(24, 20)] * 10, first_seed=30)
    ingest(params.ingest, paths)
    validate(params.validate_, paths)
    preprocess(params.preprocess, paths)
    again = encode(paths, encode=params.encode, model=params.model)
    assert (again["encoded"], again["reused"]) == (10, 30)
    after = tree_hashes(paths.latents / "shards")
    assert before.items() <= after.items(), "the earlier files are kept as they were"
    assert 1 <= len(after) - len(before) <= 2, "one new file per new processed shard (train, val)"

    half = params.encode.model_copy(update={"dtype": "float16"})
    counts = encode(paths, encode=half, model=params.model)
    assert (counts["encoded"], counts["reused"]) == (40, 0)
    assert not set(tree_hashes(paths.latents / "shards")) & set(after), "files no manifest names are deleted"
    assert load_latents(paths.latents, "val").single_size().mean.load().dtype == torch.float16


def test_encoding_on_ray_gives_the_latents_of_encoding_in_process(trained_project, tmp_path, monkeypatch):
    _, on_ray, _ = encoded_project(tmp_path / "ray", trained_project)
    params, paths = folder_project(tmp_path / "here", [(24, 20)] * 30, val_fraction=0.2)
    preprocess(params.preprocess, paths)
    shutil.copytree(trained_project[1].vae_model, paths.vae_model)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails: the tasks run in this process
    encode(paths, encode=params.encode, model=params.model)
    monkeypatch.undo()
    assert sorted(tree_hashes(paths.latents / "shards")) == sorted(tree_hashes(on_ray.latents / "shards"))
    for split in ("train", "val"):
        here, there = (load_latents(folder, split).single_size() for folder in (paths.latents, on_ray.latents))
        torch.testing.assert_close(here.mean.load(), there.mean.load(), atol=1e-5, rtol=1e-4)


def test_tasks_that_want_a_gpu_each_take_one_when_the_cluster_has_gpus():
    import ray

    ray.shutdown()
    try:
        # Ray schedules by declared resources: two logical GPUs on this GPU-less machine are enough to see
        # each task given one (its CUDA_VISIBLE_DEVICES), and tasks that want none given none.
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
        given = run_tasks(lambda _: [{"gpus": ray.get_gpu_ids()}], list(range(4)), RayParams(), "test", gpu=True)
        assert all(len(rows[0]["gpus"]) == 1 for rows in given)
        assert {str(rows[0]["gpus"][0]) for rows in given} <= {"0", "1"}
        plain = run_tasks(lambda _: [{"gpus": ray.get_gpu_ids()}], list(range(2)), RayParams(), "test")
        assert all(rows[0]["gpus"] == [] for rows in plain)
    finally:
        ray.shutdown()
        start_ray(RayParams())


def test_a_damaged_latent_file_is_encoded_again(trained_project, tmp_path):
    params, paths, _ = encoded_project(tmp_path, trained_project)
    damaged = sorted((paths.latents / "shards").iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    counts = encode(paths, encode=params.encode, model=params.model)
    assert counts["encoded"] > 0 and torch.isfinite(load_latents(paths.latents, "train").single_size().mean.load()).all()
