"""Scale out: each data stage's cost per image as the data set grows, DVC's no-op cost, disk, 1 vs 2 Ray CPUs.

    nice -n 10 .venv/bin/python bench/scale.py [--sizes 10000 100000] [--workers-compare 10000] [--repeats 1]
                                               [--out bench/results/scale.json] [--root FOLDER]

1. For each of --sizes N: a fresh copy of this repository (the files `git ls-files -co --exclude-standard`
   lists, committed in a new git repository, so DVC is set up as the repository has it) with
   `ingest.synthetic.count: N` at 32 px runs `dvc repro -s STAGE` for ingest, validate, preprocess and
   encode, each timed by the wall clock around the command (DVC's hashing and caching included). vae runs
   untimed before encode, with 5 steps: encode needs a VAE, and training one is not a data stage.
2. With nothing changed: `dvc status encode` and `dvc repro encode` (the pipeline up to encode; it must run
   no stage), timed.
3. Disk: the files under data/ and under .dvc/cache, in bytes and in allocated blocks, and both together
   with a file linked into both counted once. Data is stored once when every non-empty file of data/ is one
   of the cache's (a hard link, or a symlink to it); reflinked copies share blocks that this count does not
   see. Those that are not are listed (`not_in_cache`).
4. At --workers-compare images (0: skip), validate and preprocess re-run from scratch (`dvc repro -f -s`,
   persisted outputs removed first, as they would be reused) with `ray.num_cpus: 1` and then 2, --repeats
   times each, keeping the fastest; the speed-up is the one-CPU time over the two-CPU time.

Results are printed as they come and written to --out (JSON) after each. Per-image cost is given two ways:
the stage's seconds over its images (which a stage's fixed start-up — imports, Ray's start, DVC — inflates
at small sizes), and the marginal cost, the extra seconds per extra image between two consecutive sizes,
which is what grows if a stage's work per image grows with the data set. The summary gives each, largest
(interval) over smallest (flat within 25 %: 0.75 to 1.25), and the issue's other done-when figures. Each
size's project is deleted after it is measured unless --root is given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from project import REPO, commit_of, dvc, new_project, set_params  # noqa: E402

DATA_STAGES = ("ingest", "validate", "preprocess", "encode")
COMPARED_STAGES = ("validate", "preprocess")
RESOLUTION = 32
VAE_STEPS = 5
FLAT = (0.75, 1.25)  # per-image cost, largest size over smallest
NOOP_LIMIT = 10.0  # seconds of a no-op `dvc repro` at the largest size
SPEEDUP_TARGET = 1.7  # two Ray CPUs over one, validate + preprocess


# ---------------------------------------------------------------- measurements


def timed_stages(project: Path) -> Iterator[tuple[str, float]]:
    """Each data stage's seconds, in pipeline order, as it finishes."""
    for stage in DATA_STAGES:
        if stage == "encode":  # it needs a VAE; training one (untimed, few steps) is not a data stage
            dvc(project, "repro", "-s", "vae")
        yield stage, dvc(project, "repro", "-s", stage)[0]


def project_settings(size: int) -> dict[str, object]:
    return {"ingest.synthetic.count": size, "ingest.synthetic.resolution": RESOLUTION,
            "preprocess.resolution": RESOLUTION, "vae.steps": VAE_STEPS}


def per_image(seconds: float, size: int) -> dict:
    return dict(seconds=seconds, images_per_second=size / seconds, us_per_image=1e6 * seconds / size)


def noop(project: Path) -> dict:
    """`dvc status` and `dvc repro` up to encode with nothing changed: seconds, and what they found to do."""
    status_seconds, status = dvc(project, "status", "encode")
    repro_seconds, repro = dvc(project, "repro", "encode")
    return dict(status_seconds=status_seconds, status_up_to_date="Data and pipelines are up to date." in status,
                repro_seconds=repro_seconds, repro_ran=re.findall(r"Running stage '([^']+)'", repro))


def files_under(folder: Path) -> dict[tuple[int, int], tuple[int, int, str]]:
    """Every file under `folder` (a symlink counts as its target): (device, inode) -> (bytes, allocated bytes,
    path relative to `folder`)."""
    found = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            info = os.stat(path)
            if stat.S_ISREG(info.st_mode):
                found[info.st_dev, info.st_ino] = (info.st_size, info.st_blocks * 512, os.path.relpath(path, folder))
    return found


def disk_use(project: Path) -> dict:
    """Bytes under data/ and .dvc/cache; `not_in_cache`: data/'s non-empty files that are not one of the
    cache's (DVC keeps an output as a copy when the cache already holds its content under another path)."""
    data, cache = files_under(project / "data"), files_under(project / ".dvc" / "cache")

    def total(files: dict) -> dict:
        return dict(files=len(files), bytes=sum(size for size, _, _ in files.values()),
                    allocated_bytes=sum(allocated for _, allocated, _ in files.values()))

    unlinked = {path: size for key, (size, _, path) in data.items() if key not in cache and size}
    return dict(data=total(data), cache=total(cache), together=total(data | cache),
                data_files_in_cache=len(data.keys() & cache.keys()) / max(len(data), 1), not_in_cache=unlinked)


def remove_persisted_outputs(project: Path, stage: str) -> None:
    """A `persist: true` output survives `dvc repro -f`, and its stage reuses what it finds there."""
    for out in yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage].get("outs", []):
        if isinstance(out, dict):
            for path, options in out.items():
                if (options or {}).get("persist"):
                    target = project / path
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def worker_seconds(project: Path, cpus: int) -> dict[str, float]:
    """validate and preprocess from scratch on an in-process Ray of `cpus` CPUs."""
    set_params(project, {"ray.num_cpus": cpus})
    seconds = {}
    for stage in COMPARED_STAGES:
        remove_persisted_outputs(project, stage)
        seconds[stage] = dvc(project, "repro", "-f", "-s", stage)[0]
    return seconds | dict(total=sum(seconds.values()))


def compare_workers(project: Path, repeats: int) -> dict:
    best: dict[int, dict] = {}
    for _ in range(repeats):
        for cpus in (1, 2):
            seconds = worker_seconds(project, cpus)
            if cpus not in best or seconds["total"] < best[cpus]["total"]:
                best[cpus] = seconds
    return dict(one_cpu=best[1], two_cpus=best[2], speedup=best[1]["total"] / best[2]["total"])


# ---------------------------------------------------------------- report


def cost_ratios(results: dict) -> dict[str, float]:
    """Each data stage's per-image cost at the largest size over that at the smallest."""
    sizes = sorted(results["sizes"], key=int)
    smallest, largest = results["sizes"][sizes[0]]["stages"], results["sizes"][sizes[-1]]["stages"]
    return {stage: largest[stage]["us_per_image"] / smallest[stage]["us_per_image"] for stage in DATA_STAGES}


def marginal_costs(results: dict) -> dict[str, list[float]]:
    """Each data stage's extra µs per extra image from one size to the next, in size order."""
    sizes = sorted(results["sizes"], key=int)
    return {stage: [1e6 * (results["sizes"][larger]["stages"][stage]["seconds"]
                           - results["sizes"][smaller]["stages"][stage]["seconds"]) / (int(larger) - int(smaller))
                    for smaller, larger in zip(sizes, sizes[1:])] for stage in DATA_STAGES}


def marginal_ratios(results: dict) -> dict[str, float]:
    """Each data stage's marginal cost over the largest interval over that over the smallest."""
    return {stage: costs[-1] / costs[0] for stage, costs in marginal_costs(results).items()}


def done_when(results: dict) -> dict:
    """The issue's done-when figures, at the largest size measured."""
    largest = results["sizes"][max(results["sizes"], key=int)]
    ratios = cost_ratios(results)
    noop_seconds = largest["noop"]["repro_seconds"]
    found = dict(cost_ratios=ratios, per_image_cost_flat=len(results["sizes"]) > 1 and within(FLAT, ratios),
                 noop_repro_seconds=noop_seconds,
                 noop_repro_within_limit=noop_seconds <= NOOP_LIMIT and not largest["noop"]["repro_ran"],
                 data_files_in_cache=largest["disk"]["data_files_in_cache"],
                 stored_once=not largest["disk"]["not_in_cache"])
    if len(results["sizes"]) > 2:
        marginal = marginal_ratios(results)
        found.update(marginal_cost_ratios=marginal, marginal_cost_flat=within(FLAT, marginal))
    if "workers" in results:
        speedup = results["workers"]["speedup"]
        found.update(workers_speedup=speedup, workers_speedup_reached=speedup >= SPEEDUP_TARGET)
    return found


def within(bounds: tuple[float, float], ratios: dict[str, float]) -> bool:
    return all(bounds[0] <= ratio <= bounds[1] for ratio in ratios.values())


def table(results: dict) -> str:
    sizes = sorted(results["sizes"], key=int)
    measured = [results["sizes"][size] for size in sizes]
    ratios = cost_ratios(results)

    def row(label: str, cells: list[str], last: str = "") -> str:
        return (f"{label:<26}" + "".join(f"{cell:>16}" for cell in cells) + f"{last:>18}").rstrip()

    def megabytes(files: dict) -> str:
        return f"{files['bytes'] / 1e6:.1f} ({files['allocated_bytes'] / 1e6:.1f})"

    marginal = marginal_costs(results)
    marginal_ratio = marginal_ratios(results) if len(sizes) > 2 else {}
    lines = [row("images", [f"{int(size):,}" for size in sizes], "largest/smallest")]
    for stage in DATA_STAGES:
        cost = [m["stages"][stage] for m in measured]
        lines += [row(f"{stage} s", [f"{c['seconds']:.1f}" for c in cost]),
                  row(f"{stage} images/s", [f"{c['images_per_second']:.0f}" for c in cost]),
                  row(f"{stage} µs/image", [f"{c['us_per_image']:.0f}" for c in cost], f"{ratios[stage]:.2f}x")]
        if len(sizes) > 2:
            lines.append(row(f"{stage} marginal µs/image", ["", *(f"{c:.0f}" for c in marginal[stage])],
                             f"{marginal_ratio[stage]:.2f}x"))
    lines += [row("dvc status encode, s", [f"{m['noop']['status_seconds']:.1f}" for m in measured]),
              row("no-op dvc repro encode, s", [f"{m['noop']['repro_seconds']:.1f}" for m in measured]),
              row("data/ MB (allocated)", [megabytes(m["disk"]["data"]) for m in measured]),
              row(".dvc/cache MB (allocated)", [megabytes(m["disk"]["cache"]) for m in measured]),
              row("both MB (allocated)", [megabytes(m["disk"]["together"]) for m in measured]),
              row("data/ files in the cache", [f"{m['disk']['data_files_in_cache']:.1%}" for m in measured]),
              row("data/ MB not in the cache", [f"{sum(m['disk']['not_in_cache'].values()) / 1e6:.1f}"
                                                for m in measured])]
    if "workers" in results:
        workers = results["workers"]
        lines.append(f"validate + preprocess at {workers['images']:,} images: 1 Ray CPU "
                     f"{workers['one_cpu']['total']:.1f} s, 2 Ray CPUs {workers['two_cpus']['total']:.1f} s: "
                     f"{workers['speedup']:.2f}x")
    return "\n".join(lines)


def save(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def measure_size(project: Path, size: int, results: dict, out: Path) -> None:
    entry = results["sizes"][str(size)] = dict(stages={})
    for stage, seconds in timed_stages(project):
        entry["stages"][stage] = per_image(seconds, size)
        save(results, out)
        print(f"{size:>9,} {stage:<11} {seconds:8.1f} s {size / seconds:9.0f} images/s", flush=True)
    entry.update(noop=noop(project), disk=disk_use(project))
    save(results, out)
    print(f"{size:>9,} no-op: {json.dumps(entry['noop'])}\n{size:>9,} disk: {json.dumps(entry['disk'])}", flush=True)


def measure(args: argparse.Namespace, root: Path, results: dict) -> None:
    """Every size, each in its own project; the Ray CPU comparison in the project of its size."""
    for size in sorted(set(args.sizes) | ({args.workers_compare} - {0})):
        project = new_project(root / f"n{size}", project_settings(size))
        if size in args.sizes:
            measure_size(project, size, results, args.out)
        else:
            dvc(project, "repro", "-s", "ingest")
        if size == args.workers_compare:
            results["workers"] = dict(images=size, repeats=args.repeats) | compare_workers(project, args.repeats)
            save(results, args.out)
            print(f"{size:>9,} Ray CPUs: {json.dumps(results['workers'])}", flush=True)
        if not args.root:
            shutil.rmtree(project)  # 10^5 images take several GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="images per data set")
    parser.add_argument("--workers-compare", type=int, default=10_000, help="images for 1 vs 2 Ray CPUs; 0: skip")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each Ray CPU count; the fastest counts")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.json")
    parser.add_argument("--root", type=Path, help="keep the projects in this folder (default: temporary, deleted)")
    args = parser.parse_args()
    results = dict(commit=commit_of(REPO), cpus=os.cpu_count(), load_average=os.getloadavg(), resolution=RESOLUTION,
                   vae_steps=VAE_STEPS, sizes={})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdpipe-scale-") as temporary:
        root = args.root or Path(temporary)
        print(f"commit {results['commit']}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; projects in {root}",
              flush=True)
        measure(args, root, results)
    results.update(done_when=done_when(results), wall_seconds=time.perf_counter() - started,
                   load_average_after=os.getloadavg())
    save(results, args.out)
    print(f"\n{table(results)}\ndone when: {json.dumps(results['done_when'])}\n"
          f"wall time {results['wall_seconds']:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
