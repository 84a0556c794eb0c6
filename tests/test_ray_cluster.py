"""The data stages' tasks on a real two-node Ray cluster give what the embedded in-process Ray gives.

Each test here starts Ray processes; run this file on its own (`pytest tests/test_ray_cluster.py`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.contracts.latents import load_latents
from pipeline.contracts.paths import Paths
from pipeline.core.config import RayParams
from pipeline.runtime.ray_tasks import run_tasks

from .conftest import another_ray, tree_hashes

pytestmark = pytest.mark.e2e


def square_on_its_node(number: int) -> list[dict]:
    """A task's rows, with the id of the node that ran it."""
    import ray

    time.sleep(0.5)  # long enough that the first node is still busy when the next task is placed
    return [{"number": number, "square": number * number, "node": ray.get_runtime_context().get_node_id()}]


def without_nodes(rows: list[list[dict]]) -> list[list[dict]]:
    return [[{key: value for key, value in row.items() if key != "node"} for row in task] for task in rows]


def test_tasks_on_two_nodes_return_the_rows_of_the_embedded_run(ray_cluster):
    tasks = list(range(8))
    with another_ray(RayParams(address=ray_cluster)):
        on_cluster = run_tasks(square_on_its_node, tasks, RayParams(), "cluster test")
    embedded = run_tasks(square_on_its_node, tasks, RayParams(), "embedded test")
    assert without_nodes(on_cluster) == without_nodes(embedded) == [[{"number": n, "square": n * n}] for n in tasks]
    assert len({row["node"] for task in on_cluster for row in task}) == 2, "both nodes ran tasks"


def stage_outputs(params, root, vae: Path) -> tuple[dict[str, dict[str, str]], Paths]:
    """The files ingest, validate and preprocess write into a fresh project under root, by folder; then
    encode with the given VAE."""
    from pipeline.stages.encode import encode
    from pipeline.stages.ingest import ingest
    from pipeline.stages.preprocess import preprocess
    from pipeline.stages.validate import validate

    paths = Paths(root)
    ingest(params.ingest, paths)
    validate(params.validate_, paths)
    preprocess(params.preprocess, paths)
    shutil.copytree(vae, paths.vae_model)
    encode(paths, encode=params.encode, model=params.model)
    return {"raw": tree_hashes(paths.raw), "validated": tree_hashes(paths.validated),
            "processed": tree_hashes(paths.processed)}, paths


FEW_TASKS = """
import os, sys
from pipeline.core.config import RayParams
from pipeline.runtime.ray_tasks import run_tasks
rows = run_tasks(lambda task: [{"pid": os.getpid()}], [1, 2, 3], RayParams(min_tasks=4), "few")
print(sorted({row["pid"] for task in rows for row in task}) == [os.getpid()], "ray" in sys.modules)
"""


def test_fewer_tasks_than_min_tasks_run_in_the_stages_process_without_ray(tmp_path):
    done = subprocess.run([sys.executable, "-c", FEW_TASKS], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"], "the tasks ran elsewhere, or Ray was imported"


def test_an_open_session_or_a_cluster_takes_even_a_few_tasks():
    # the session's Ray is open (conftest): a stage started inside it uses it whatever min_tasks says
    rows = run_tasks(lambda task: [{"pid": os.getpid()}], [1], RayParams(min_tasks=100), "one")
    assert rows[0][0]["pid"] != os.getpid()


def test_stage_outputs_on_two_nodes_are_identical_to_the_embedded_run(ray_cluster, trained_project, tmp_path):
    tiny_params, trained = trained_project
    params = tiny_params.model_copy(update={"ingest": tiny_params.ingest.model_copy(update={"shard_size": 40})})
    with another_ray(RayParams(address=ray_cluster)):
        on_cluster, cluster = stage_outputs(params, tmp_path / "cluster", trained.vae_model)
    embedded, here = stage_outputs(params, tmp_path / "embedded", trained.vae_model)
    assert on_cluster == embedded
    assert len(on_cluster["processed"]) > 8, "four raw shards, each a train and a val shard"
    assert tree_hashes(cluster.latents / "shards").keys() == tree_hashes(here.latents / "shards").keys()
    for split in ("train", "val"):
        torch.testing.assert_close(load_latents(cluster.latents, split).single_size().mean.load(),
                                   load_latents(here.latents, split).single_size().mean.load(), atol=1e-5, rtol=1e-4)
