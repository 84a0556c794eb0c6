"""Shared fixtures: tiny parameters and a project folder with the whole chain run once."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

for _name, _value in {
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}.items():
    os.environ.setdefault(_name, _value)
# `make test` runs two pytest-xdist workers on two cores: each worker, and every process it starts, gets one
# core's worth of torch threads. Two torch processes of two threads each would oversubscribe the cores, and
# a step's thousands of small ops then wait for descheduled threads (steps several times slower).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)


def _session_folder(prefix: str) -> str:
    """A temporary folder for this test process, deleted when it exits."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = _session_folder("sdpipe-prefect-")
# An empty torch hub cache: FID/KID must not depend on weights a developer happens to have.
os.environ["TORCH_HOME"] = _session_folder("sdpipe-torch-")

import contextlib  # noqa: E402
import copy  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from xdist.scheduler import LoadFileScheduling  # noqa: E402

from pipeline.contracts.paths import Paths  # noqa: E402
from pipeline.core.config import Params  # noqa: E402
from pipeline.core.params_file import parse_params, read_params_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# The files that take longest (busy seconds, docs/explanation/results.md), longest first. `make test` hands each
# pytest-xdist worker the next group of tests in collection order as it finishes one: with these first, the long
# files run side by side from the start and the many short ones fill in, instead of a long file starting last.
SLOWEST_FILES = ("test_family_training.py", "test_pipeline_e2e.py", "test_team.py", "test_resume.py",
                 "test_docs.py", "test_validation.py", "test_ray_cluster.py", "test_bench_gpu.py", "test_subsets.py")
# A group is a file (its module fixtures stay in one process), except in these files, whose tests are parametrised
# by family and grouped by it: a family's project is built and used by one worker while the other families' run on
# the other, so no one file holds a worker for most of the run.
SPLIT_BY_FAMILY = ("test_family_training.py",)


class FileOrFamilyScheduling(LoadFileScheduling):
    """`--dist loadfile`, with SPLIT_BY_FAMILY's files split by their tests' parameter (the node id's [...])."""

    def _split_scope(self, nodeid: str) -> str:
        file, _, test = nodeid.partition("::")
        if Path(file).name in SPLIT_BY_FAMILY and test.endswith("]"):
            return f"{file}[{test.rpartition('[')[2]}"
        return file


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown to pytest -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log) -> LoadFileScheduling | None:
    return FileOrFamilyScheduling(config, log) if config.getvalue("dist") == "loadfile" else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(SLOWEST_FILES)}
    # stable: a file's order stays, except that a split file's family groups go before its other tests
    items.sort(key=lambda item: (rank.get(item.path.name, len(SLOWEST_FILES)),
                                 item.path.name in SPLIT_BY_FAMILY and not hasattr(item, "callspec")))


TINY_OVERRIDES = {
    "ingest": {"synthetic": {"count": 160}},
    "vae": {"steps": 20, "batch_size": 32},
    "train": {"steps": 20, "batch_size": 32, "warmup_steps": 2, "log_every": 5, "validate_every": 10,
              "sample_every": 10, "sample_steps": 3, "checkpoint_every": 10},
    "evaluate": {"samples_per_prompt": 1, "num_inference_steps": 3, "timesteps": [100, 900], "stability_repeats": 2},
}


def merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        merged[key] = merge(merged.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def tiny_params_dict() -> dict:
    """The project's params.yaml with sizes cut down so the whole chain runs in seconds."""
    return merge(read_params_file(REPO / "params.yaml"), TINY_OVERRIDES)


@pytest.fixture(scope="session", autouse=True)
def in_process_ray():
    """One in-process Ray for the whole session: the data stages use an open session rather than start
    their own (seconds each). Tests of other Ray settings use `another_ray`."""
    import ray

    from pipeline.core.config import RayParams
    from pipeline.runtime.ray_tasks import start_ray

    start_ray(RayParams())
    yield
    ray.shutdown()


@contextlib.contextmanager
def another_ray(settings):
    """The session's Ray swapped for one with these RayParams while the block runs."""
    import ray

    from pipeline.core.config import RayParams
    from pipeline.runtime.ray_tasks import start_ray

    ray.shutdown()
    try:
        start_ray(settings)
        yield
    finally:
        ray.shutdown()
        start_ray(RayParams())


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(tiny_params_dict())


def _file_states(root: Path) -> dict[str, tuple[int, int]]:
    return {path.relative_to(root).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in root.rglob("*") if path.is_file()}


def run_every_stage(params: Params, paths: Paths) -> dict[str, set[str]]:
    """Every stage once, in dvc.yaml's order, through the CLI's own stage handlers; returns the files each
    stage wrote (new or changed), relative to the project root."""
    from pipeline.cli import STAGES

    written = {}
    for name, handler in STAGES.items():
        before = _file_states(paths.root)
        handler(params, paths, None)
        written[name] = {path for path, state in _file_states(paths.root).items() if before.get(path) != state}
    return written


@pytest.fixture(scope="session")
def trained_project_writes(tmp_path_factory) -> tuple[Params, Paths, dict[str, set[str]]]:
    """A tiny project with every stage run once, and the files each stage wrote."""
    params, paths = parse_params(tiny_params_dict()), Paths(tmp_path_factory.mktemp("project"))
    return params, paths, run_every_stage(params, paths)


@pytest.fixture(scope="session")
def trained_project(trained_project_writes) -> tuple[Params, Paths]:
    params, paths, _ = trained_project_writes
    return params, paths


def write_image(path: Path, shade: int, size: tuple[int, int] = (24, 20), fmt: str = "PNG") -> Path:
    """A tiny solid image whose content (and so its id) is set by `shade`."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade % 256, shade // 256 % 256, 128)).save(path, format=fmt)
    return path


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path: to prove a folder was not touched."""
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_pattern(path: Path, seed: int, size: tuple[int, int] = (24, 20), fmt: str = "PNG") -> Path:
    """A tiny image of random blocks: unlike `write_image` it is neither blank nor like any other seed's."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST).save(path, format=fmt)
    return path


def only_inputs_changed(status: str) -> bool:
    """`dvc status` of a project with nothing to re-run: the inputs stage, which DVC runs every time, is all it lists."""
    return status.split() == ["inputs:", "always", "changed"]


def free_port() -> int:
    """A loopback port nothing listens on, for servers the tests start."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def folder_project(root: Path, sizes: list[tuple[int, int]], **preprocess) -> tuple[Params, Paths]:
    """A folder source of captioned `write_pattern` images, one per (width, height), ingested and validated
    under root/project with the tiny params and these preprocess settings; any aspect ratio up to 12:1 passes."""
    from pipeline.stages.ingest import ingest
    from pipeline.stages.validate import validate

    source = root / "source"
    add_patterns(source, sizes)
    params = parse_params(merge(tiny_params_dict(), {
        "ingest": {"source": "folder", "folder": {"path": str(source)}},
        "validate": {"min_aspect_ratio": 1 / 12, "max_aspect_ratio": 12.0},
        "preprocess": preprocess,
    }))
    paths = Paths(root / "project")
    ingest(params.ingest, paths)
    validate(params.validate_, paths)
    return params, paths


def add_patterns(source: Path, sizes: list[tuple[int, int]], first_seed: int = 0) -> None:
    """One `write_pattern` image per size, seeds counting from first_seed, each with a sidecar caption."""
    for seed, size in enumerate(sizes, start=first_seed):
        write_pattern(source / f"{seed}.png", seed, size)
        (source / f"{seed}.txt").write_text(f"pattern {seed}", encoding="utf-8")


def save_random_clip(tokenizer_folder: Path, folder: Path) -> Path:
    """A tiny random CLIP (seed 0) with a tokenizer of ours, saved as a transformers folder: a deterministic
    clip_score that needs no downloaded weights."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    tokenizer = CLIPTokenizerFast.from_pretrained(tokenizer_folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_random_base_model(folder: Path, family: str = "sd") -> Path:
    """A randomly initialised pipeline of a model family at its tiny preset, saved in diffusers format: the
    stand-in for real pretrained weights (same files, same loading code)."""
    import torch

    from pipeline.diffusion.families import family_named, random_pipeline

    torch.manual_seed(0)
    captions = [f"a {colour} {shape}" for colour in ("red", "green", "blue", "yellow", "purple", "orange")
                for shape in ("circle", "square", "triangle")]
    random_pipeline(family_named(family), captions, resolution=32).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    """A tiny pretrained folder per family, saved when a test first asks for it."""
    class Bases(dict):
        def __missing__(self, family: str) -> str:
            self[family] = str(save_random_base_model(tmp_path_factory.mktemp(family) / f"tiny-{family}", family))
            return self[family]

    return Bases()


@pytest.fixture(scope="session")
def ray_cluster():
    """The address of a real two-node Ray cluster on this machine (tests/ray_cluster.py), for the session."""
    import shutil

    from .ray_cluster import two_node_cluster

    # Ray's socket paths under its temp dir must stay within AF_UNIX's 107 bytes: pytest's own temp dirs
    # (/tmp/pytest-of-root/pytest-12/popen-gw0/...) leave too little room.
    temp_dir = Path(tempfile.mkdtemp(prefix="sdpipe-ray-"))
    try:
        with two_node_cluster(temp_dir) as address:
            yield address
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


# Smaller still: the team tests' pipeline runs go through Prefect and DVC, whose overhead is theirs to test;
# checkpoints every 2 of 8 steps, so a run killed after the first has steps left to resume.
TEAM_OVERRIDES = {
    "ingest": {"synthetic": {"count": 64}},
    "vae": {"steps": 4},
    "train": {"steps": 8, "log_every": 2, "validate_every": 4, "sample_every": 0, "checkpoint_every": 2},
    "evaluate": {"num_inference_steps": 2},
}


@pytest.fixture(scope="session")
def team_stack(tmp_path_factory):
    """The team's servers (pipeline/services.py) started once for the session for a committed copy of this
    repository on tiny params: PostgreSQL, S3, MLflow with basic auth, Prefect with auth and a worker, all on
    127.0.0.1; each process is stopped by its pid afterwards. A flow run 45 s without a heartbeat (every 30 s)
    is marked crashed."""
    import shutil

    from pipeline import services

    from .test_pipeline_e2e import copy_repository

    root = copy_repository(tmp_path_factory.mktemp("team"), merge(tiny_params_dict(), TEAM_OVERRIDES))
    state = Path(tempfile.mkdtemp(prefix="sdpipe-services-"))  # pytest's temp dir is 0700: PostgreSQL's user cannot enter it
    try:
        yield services.start(root, state, ui=False, worker_poll=1, fast=True, crashed_after=45)
    finally:
        services.stop(root, state)
        shutil.rmtree(state, ignore_errors=True)
