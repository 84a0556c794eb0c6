"""bench/gpu.py's tiny mode runs on a CPU, as it must run on a GPU machine: without MLflow, DVC, Prefect or
Great Expectations (the measured H100 machine had none of them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

ABSENT = ("mlflow", "dvc", "prefect", "great_expectations", "ray")


def test_tiny_bench_measures_everything_without_the_tracking_stack(tmp_path):
    blocker = tmp_path / "absent"
    for name in ABSENT:  # shadows the installed package: importing it fails as it would there
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"encode", "train full", "train LoRA", "diffusers loop"}
    for name, result in results.items():
        assert "error" not in result, f"{name}: {result.get('error')}"
        assert result["images_per_second"] > 0 and result["peak_memory_mb"] > 0
    full, lora = results["train full"], results["train LoRA"]
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] / 10
    assert 0 < lora["flops_per_image"] < full["flops_per_image"]  # no weight gradients of the frozen UNet
    assert "mfu" not in full  # no measured peak on a CPU
    assert "vs diffusers" in done.stdout and "diffusers loop" in done.stdout
    assert not Path(tmp_path / "mlruns").exists() and not list(tmp_path.glob("*.db"))
