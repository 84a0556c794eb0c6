"""A real two-node Ray cluster on this machine, for the tests that run the data stages on a cluster.

Two `ray start --block` processes: a head and a second node that joins it, one CPU each, sharing one temp
dir. Both run behind Ray's token authentication: every node and every driver needs RAY_AUTH_MODE=token and
the same token. The token is the one Ray's default lookup finds (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token, created if missing as an in-process `ray.init` would), because the test process's Ray
keeps the first token it loaded. Stopping a node's `ray start` process stops that node's services; `ray
stop` would also stop every other Ray on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import REPO, free_port

RAY = Path(sys.executable).with_name("ray")
START_SECONDS, STOP_SECONDS = 120, 30
# On SIGTERM a node waits up to 30 s for its work to drain; the tests leave none, so it need not wait.
NODE_ENVIRONMENT = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def node_options(temp_dir: Path) -> list[str]:
    """What both nodes are started with. Every port that has a fixed default is a free one, so the cluster
    and an in-process Ray (the embedded run a test compares with, anyone else's) run on this machine side
    by side."""
    return ["--block", "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats",
            f"--temp-dir={temp_dir}", "--min-worker-port=0", "--max-worker-port=0",
            f"--dashboard-agent-listen-port={free_port()}"]


def start_node(options: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as output:
        # A session of its own: the node's services are the only processes in its group.
        return subprocess.Popen([str(RAY), "start", *options], stdout=output, stderr=subprocess.STDOUT,
                                env=os.environ | NODE_ENVIRONMENT, start_new_session=True)


def stop_node(node: subprocess.Popen) -> None:
    """SIGTERM to the node's `ray start --block` process, which then stops the node's services and their
    workers; SIGKILL to its process group if that takes longer than STOP_SECONDS."""
    node.terminate()
    try:
        node.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()


def wait_until(ready: Callable[[], bool], what: str, nodes: list[subprocess.Popen], logs: list[Path]) -> None:
    """Polls ready() until it holds; fails with the log of a node that stopped, or after START_SECONDS."""
    deadline = time.monotonic() + START_SECONDS
    while not ready():
        stopped = [log for node, log in zip(nodes, logs) if node.poll() is not None]
        if stopped or time.monotonic() > deadline:
            log = stopped[0] if stopped else logs[-1]
            reason = "its process ended" if stopped else f"not within {START_SECONDS} s"
            raise RuntimeError(f"Ray cluster: {what} ({reason}); the end of {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def alive_nodes(address: str) -> int:
    """Counted by a driver of its own: this process's Ray session is the embedded one the tests compare with."""
    count = ("import ray; ray.init(address=%r, log_to_driver=False, logging_level='warning'); "
             "print(sum(node['Alive'] for node in ray.nodes()))" % address)
    done = subprocess.run([sys.executable, "-c", count], capture_output=True, text=True, timeout=START_SECONDS)
    return int(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else 0


@contextmanager
def two_node_cluster(temp_dir: Path) -> Iterator[str]:
    """Yields the head's address (host:port) once both nodes are alive; stops both nodes after."""
    subprocess.run([str(RAY), "get-auth-token", "--generate"], check=True, capture_output=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.delenv("RAY_ADDRESS", raising=False)  # an embedded run compared with this cluster stays embedded
        # The nodes' workers import the tasks' code from this checkout, as a real cluster's image holds sdpipe.
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        port = free_port()
        address, logs = f"127.0.0.1:{port}", [temp_dir / "head.log", temp_dir / "node.log"]
        nodes = [start_node(["--head", f"--port={port}", "--include-dashboard=false",
                             f"--dashboard-port={free_port()}", *node_options(temp_dir)], logs[0])]
        try:
            wait_until(lambda: accepts_connections(port), "the head's GCS does not answer", nodes, logs[:1])
            nodes.append(start_node([f"--address={address}", *node_options(temp_dir)], logs[1]))
            wait_until(lambda: alive_nodes(address) == 2, "the second node does not join", nodes, logs)
            yield address
        finally:
            for node in reversed(nodes):
                stop_node(node)
