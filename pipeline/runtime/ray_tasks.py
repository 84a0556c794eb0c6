"""Where the data stages' per-image work runs: Ray tasks, one per shard (encode's take a GPU each on a
cluster that has GPUs).

On the embedded default Ray starts on this machine (no dashboard, `ray.num_cpus` CPUs) and stops when the
stage ends, unless the stage has fewer than `ray.min_tasks` tasks: then they run one after another in the
stage's own process, since Ray's start, its workers' imports and its shutdown cost more seconds than a
few shards gain from running side by side (docs/explanation/results.md). With `ray.address` or RAY_ADDRESS set,
the same tasks run on that cluster, whose nodes must see the project folder at the same path (a shared
volume), because tasks read and write shards there. A Ray session already open in the calling process (a
test's, a notebook's) is used as it is. Tasks return plain rows; their order is the order of the tasks, so
outputs never depend on how many workers ran them.

Plain Ray tasks with a bounded window in flight, not a Ray Data pipeline: measured on 2 cores, Ray Data's
streaming executor spent so much of the driver's CPU per task that two workers were barely faster than
one (preprocess of 10^5 images: 1.2x); tasks with a window gave 1.7x (docs/explanation/results.md). Without Ray
installed the tasks run one after another in the calling process.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.core.config import RayParams

log = logging.getLogger(__name__)


def cluster_address(params: RayParams) -> str | None:
    return params.address or os.environ.get("RAY_ADDRESS") or None


def session_open() -> bool:
    """A Ray session in this process (a test's, a notebook's), without importing Ray to ask."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def worth_starting_ray(params: RayParams, tasks: int) -> bool:
    return bool(cluster_address(params)) or session_open() or tasks >= params.min_tasks


def as_one_cpu_tasks(work: Callable[[Any], list[dict]], tasks: list) -> Iterator[list[dict]]:
    """The tasks one after another here, each with the one thread a one-CPU Ray task gets (Ray sets
    OMP_NUM_THREADS=1): how many threads split a matrix product changes its sums' low bits, and the latents
    must be the same bytes wherever they were encoded."""
    torch = sys.modules.get("torch")  # only a stage that imported torch runs torch in its tasks
    threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    try:
        yield from map(work, tasks)
    finally:
        if torch:
            torch.set_num_threads(threads)


def start_ray(params: RayParams) -> None:
    """Connect to the configured cluster, or start Ray in-process."""
    import ray

    address = cluster_address(params)
    settings = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                    configure_logging=False)
    if address:
        log.info("ray: connecting to the cluster at %s", address)
        ray.init(address=address, **settings)
    else:
        # "local": a new single-node Ray of this machine, even where a cluster is running here too. Its
        # services take the machine's address (Ray maps 127.0.0.1 to it) behind Ray's token authentication.
        ray.init(address="local", num_cpus=params.num_cpus, **settings)


@contextmanager
def ray_session(params: RayParams) -> Iterator[None]:
    """Ray for the duration of a stage; a session already open in this process is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    start_ray(params)
    try:
        yield
    finally:
        ray.shutdown()


def iter_tasks(work: Callable[[Any], list[dict]], tasks: list, params: RayParams, label: str, *,
               gpu: bool = False) -> Iterator[list[dict]]:
    """`work(task)` for every task on Ray; each task's rows, in task order. A few tasks per CPU are in flight
    at a time, so results never pile up in memory however many tasks there are. `gpu`: each task takes one
    of the cluster's GPUs when it has any, so a GPU runs one task at a time."""
    if not tasks:
        return
    if not worth_starting_ray(params, len(tasks)):
        log.info("%s: %d task(s) in this process (fewer than ray.min_tasks, %d)", label, len(tasks), params.min_tasks)
        yield from as_one_cpu_tasks(work, tasks)
        return
    try:
        import ray
        from ray import cloudpickle
    except ImportError:  # a machine without Ray (the GPU benchmark's, see docs/guides/gpu.md): the same tasks here
        log.warning("%s: Ray is not installed: %d task(s) run one after another in this process", label, len(tasks))
        yield from as_one_cpu_tasks(work, tasks)
        return

    @ray.remote(num_cpus=1)
    def run(task: bytes) -> bytes:
        # Pickled both ways: tasks and rows travel exactly as they are. A task's exception travels back the
        # same way and is raised here as it was: Ray would wrap it in its own.
        try:
            return cloudpickle.dumps(work(cloudpickle.loads(task)))
        except Exception as error:
            return cloudpickle.dumps(error)

    with ray_session(params):
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if gpu else 0
        log.info("%s: %d task(s) on Ray (%s CPUs%s)", label, len(tasks), resources.get("CPU"),
                 f", one of {gpus} GPUs each" if gpus else "")
        remote = run.options(num_gpus=1) if gpus else run
        window = 2 * int(resources.get("CPU", 1)) + 2  # tasks in flight: the workers stay busy
        pending = [remote.remote(cloudpickle.dumps(task)) for task in tasks[:window]]
        for next_task in range(window, len(tasks) + window):
            rows = cloudpickle.loads(ray.get(pending.pop(0)))
            if isinstance(rows, Exception):
                raise rows
            if next_task < len(tasks):
                pending.append(remote.remote(cloudpickle.dumps(tasks[next_task])))
            yield rows


def run_tasks(work: Callable[[Any], list[dict]], tasks: list, params: RayParams, label: str, *,
              gpu: bool = False) -> list[list[dict]]:
    return list(iter_tasks(work, tasks, params, label, gpu=gpu))
