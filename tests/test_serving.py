"""`mlflow models serve` of the registered champion answers POST /invocations with images (loopback only)."""

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pipeline.tracking.runs import tracking_uri

from .conftest import free_port

STARTUP_SECONDS = 120


def _post(url: str, payload: bytes) -> bytes:
    request = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


def _wait_until_up(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert server.poll() is None, "mlflow models serve exited early"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer {url} within {STARTUP_SECONDS} s")


@pytest.mark.e2e
def test_served_champion_returns_png_images(trained_project, tmp_path):
    params, paths = trained_project
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": tracking_uri(params.register_, paths.root),
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/sdpipe@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_until_up(f"http://127.0.0.1:{port}/ping", server)
            body = json.dumps({"dataframe_records": [
                {"prompt": "a red circle", "seed": 3, "steps": 3},
                {"prompt": "a red circle", "seed": 3, "steps": 3},
                {"prompt": "a blue square", "seed": 4, "steps": 3, "guidance": 2.0},
            ]}).encode()
            predictions = json.loads(_post(f"http://127.0.0.1:{port}/invocations", body))["predictions"]
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    images = [base64.b64decode(row["image"]) for row in predictions]
    assert len(images) == 3
    assert all(Image.open(io.BytesIO(data)).size == (32, 32) for data in images)
    assert images[0] == images[1], "the same prompt and seed give the same image"
