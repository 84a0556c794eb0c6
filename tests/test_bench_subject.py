"""bench/subject.py: its subject reader tells the subject (a blue bar) from the synthetic set's shapes, and its smoke
mode runs the whole bench (base, fine-tune, measures) on a CPU."""

import importlib.util
import io
import json
import os
import subprocess
import sys

import pandas as pd
from PIL import Image

from pipeline.data.shapes import COLOURS, render_samples

from .conftest import REPO


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_subject", REPO / "bench" / "subject.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_subject_reader_reads_the_rendered_subject_and_none_of_the_synthetic_shapes(tmp_path):
    bench = bench_module()
    bench.render_subject(tmp_path, resolution=32)
    subject = [Image.open(path) for path in sorted(tmp_path.glob("*.png"))]
    assert len(subject) == bench.SUBJECT_IMAGES
    assert all(bench.draws_the_subject(image) for image in subject)

    shapes = [Image.open(io.BytesIO(sample.png)) for sample in render_samples(count=300, resolution=32, seed=3)]
    assert not any(bench.draws_a_bar(image) for image in shapes), "the base's data holds no bar"
    for colour in set(COLOURS) - {bench.SUBJECT_COLOUR}:
        other = bench.render_bar(32, size=20, left=6, top=11, background=240, colour=colour)
        assert bench.draws_a_bar(other) and not bench.draws_the_subject(other), f"a {colour} bar is not the subject"
    blank = Image.new("RGB", (32, 32), (240, 240, 240))
    assert not bench.draws_a_bar(blank) and not bench.draws_the_subject(blank)


def test_smoke_bench_trains_the_base_fine_tunes_it_and_measures_both(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "subject.py"), "--smoke", "--prior", "prediction", "--prior", "data",
                           "--root", str(tmp_path / "root"), "--out", str(out)],
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    base, prediction, regularised = json.loads(out.read_text())
    assert (base["prior"], prediction["prior"], regularised["prior"]) == ("base", "prediction", "data")
    for result in (base, prediction, regularised):
        assert result["trigger_samples"] == 3 and result["class_samples"] == 12
        assert 0 <= result["trigger_hit_rate"] <= 1 and 0 <= result["class_adherence"] <= 1
    assert 0 <= base["vae_round_trip_hit_rate"] <= 1
    assert -1 <= base["closest_class_pair_text_cosine"] < 1 and -1 <= base["trigger_class_text_cosine"] <= 1
    assert prediction["drift"] == prediction["class_adherence"] - base["class_adherence"]
    assert prediction["train_cpu_minutes"] > 0
    assert (tmp_path / "root" / "subject-runs" / "prediction-3-0.002-r4-w1" / "models" / "sd"
            / "pytorch_lora_weights.safetensors").is_file()
    assert "| prediction | 3 |" in done.stdout and "| data | 3 |" in done.stdout
    regularisation = pd.read_parquet(tmp_path / "root" / "subject-runs" / "data-3-0.002-r4-w1" / "data" / "raw"
                                     / "manifest.parquet")
    assert set(regularisation["subset"]) == {"subject", "regularisation"}
