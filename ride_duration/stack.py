"""The local stand-in for AWS + MLflow (+ Prefect): real servers over HTTP.

- S3 + Kinesis: moto's server (one endpoint, like LocalStack's 4566).
- MLflow: `mlflow server`, sqlite backend under `.local/`, artifacts in local S3.
- Prefect: `prefect server start` (for the batch part).

Processes run in the background with logs and pid files under `.local/`.
moto keeps state in memory only, so `down` snapshots every bucket to
`.local/s3/` (through the S3 API, like `aws s3 sync`) and `up` restores it.
Kinesis streams are recreated empty (stream data is transient on AWS too).

    python -m ride_duration.stack up|down|status|env
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from . import config
from .aws import LOCAL_CREDENTIALS

SERVICES = ("s3", "mlflow", "prefect")
DEFAULT_PORTS = {"s3": config.S3_PORT, "mlflow": config.MLFLOW_PORT, "prefect": config.PREFECT_PORT}
HOST = "127.0.0.1"
REGION = "eu-west-1"


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited child not yet reaped) is not alive for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


@dataclass
class LocalStack:
    local_dir: Path
    ports: dict = field(default_factory=lambda: dict(DEFAULT_PORTS))
    mlflow_bucket: str = config.MLFLOW_BUCKET
    predictions_bucket: str = config.PREDICTIONS_BUCKET
    streams: tuple = (config.INPUT_STREAM, config.PREDICTIONS_STREAM)
    quiet: bool = False

    @classmethod
    def from_settings(cls, **kwargs) -> "LocalStack":
        settings = config.get_settings()
        ports = {name: int(os.environ.get(f"STACK_{name.upper()}_PORT", port)) for name, port in DEFAULT_PORTS.items()}
        return cls(
            local_dir=settings.local_dir,
            ports=ports,
            mlflow_bucket=settings.mlflow_bucket,
            predictions_bucket=settings.predictions_bucket,
            streams=(settings.input_stream, settings.predictions_stream),
            **kwargs,
        )

    # ---------------------------------------------------------------- addresses
    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.ports[name]}"

    def env(self) -> dict:
        """The variables that point clients at this stack (dummy credentials included)."""
        return {
            "AWS_ENDPOINT_URL": self.url("s3"),
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
    def _pidfile(self, name: str) -> Path:
        return self.local_dir / "run" / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.local_dir / "logs" / f"{name}.log"

    @property
    def snapshot_dir(self) -> Path:
        return self.local_dir / "s3"

    def _read_pid(self, name: str) -> int | None:
        try:
            info = json.loads(self._pidfile(name).read_text())
        except (OSError, ValueError):
            return None
        pid = info.get("pid")
        return pid if pid and pid_alive(pid) and info.get("port") == self.ports[name] else None

    def _say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    # ---------------------------------------------------------------- commands
    def _command(self, name: str) -> tuple[list[str], dict]:
        env = {**os.environ, **LOCAL_CREDENTIALS, "AWS_DEFAULT_REGION": REGION}
        py = sys.executable
        port = str(self.ports[name])
        if name == "s3":
            return [py, "-m", "moto.server", "-H", HOST, "-p", port], env
        if name == "mlflow":
            db = self.local_dir / "mlflow" / "mlflow.db"
            db.parent.mkdir(parents=True, exist_ok=True)
            env["MLFLOW_S3_ENDPOINT_URL"] = self.url("s3")
            env.pop("AWS_ENDPOINT_URL", None)
            cmd = [
                py, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{db}",
                # Clients write artifacts straight to S3, as on AWS with the 2022 course.
                "--default-artifact-root", f"s3://{self.mlflow_bucket}/",
                "--no-serve-artifacts",
                "--host", HOST, "--port", port, "--workers", "1",
            ]
            return cmd, env
        if name == "prefect":
            home = self.local_dir / "prefect"
            home.mkdir(parents=True, exist_ok=True)
            env.update(
                PREFECT_HOME=str(home),
                PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_LOGGING_LEVEL="WARNING",
            )
            # SQLite takes one writer at a time, and Prefect 3.9 creates a subflow's
            # task run in a transaction that fails at once ("database is locked",
            # HTTP 503, the client retries 2 s later) when another write commits in
            # between. By default the server commits every task-run event on its
            # own; committing them in batches (at most 1 s late in the UI) made
            # those stalls rare: 8 -> 1 in 36 empty subflows (make bench-batch counts them).
            for key, value in (("TASK_RUN_RECORDER_BATCH_SIZE", "100"), ("TASK_RUN_RECORDER_FLUSH_INTERVAL", "1"),
                               ("EVENT_PERSISTER_BATCH_SIZE", "500")):
                env.setdefault(f"PREFECT_SERVER_SERVICES_{key}", value)
            env.pop("PREFECT_API_URL", None)
            return [py, "-m", "prefect", "server", "start", "--host", HOST, "--port", port], env
        raise ValueError(name)

    def _health_url(self, name: str) -> str:
        return {"s3": "/moto-api/", "mlflow": "/health", "prefect": "/api/health"}[name]

    def healthy(self, name: str) -> bool:
        try:
            return requests.get(self.url(name) + self._health_url(name), timeout=2).ok
        except requests.RequestException:
            return False

    def _start(self, name: str, timeout: float) -> None:
        if self._read_pid(name) is not None:
            self._say(f"{name:8s} already up at {self.url(name)}")
            return
        if port_in_use(self.ports[name]):
            raise StackError(
                f"port {self.ports[name]} ({name}) is taken by a process this stack did not start. "
                f"Stop it, or choose another port with STACK_{name.upper()}_PORT."
            )
        cmd, env = self._command(name)
        log = self.logfile(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._pidfile(name).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.local_dir, start_new_session=True,
            )
        self._pidfile(name).write_text(json.dumps({"pid": proc.pid, "port": self.ports[name], "cmd": cmd}))
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                self._pidfile(name).unlink(missing_ok=True)
                tail = log.read_text(errors="replace")[-2000:]
                raise StackError(f"{name} exited with code {proc.returncode} while starting; log {log}:\n{tail}")
            if self.healthy(name):
                self._say(f"{name:8s} up at {self.url(name)} in {time.monotonic() - start:.1f} s (log {log})")
                return
            time.sleep(0.25)
        self._stop(name)
        raise StackError(f"{name} did not become ready within {timeout:.0f} s; see {log}")

    def _stop(self, name: str, timeout: float = 15) -> bool:
        pid = self._read_pid(name)
        self._pidfile(name).unlink(missing_ok=True)
        if pid is None:
            return False
        try:
            os.killpg(pid, signal.SIGTERM)  # the whole session: mlflow/prefect spawn workers
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        if pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)
        return True

    # ---------------------------------------------------------------- resources
    def _clients(self):
        import boto3

        kwargs = dict(
            endpoint_url=self.url("s3"), region_name=REGION,
            aws_access_key_id="test", aws_secret_access_key="test",
        )
        return boto3.client("s3", **kwargs), boto3.client("kinesis", **kwargs)

    def _create_resources(self) -> None:
        s3, kinesis = self._clients()
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in (self.mlflow_bucket, self.predictions_bucket):
            if bucket not in existing:
                s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        streams = set(kinesis.list_streams().get("StreamNames", []))
        for stream in self.streams:
            if stream not in streams:
                kinesis.create_stream(StreamName=stream, ShardCount=1)
        for stream in self.streams:
            kinesis.get_waiter("stream_exists").wait(StreamName=stream, WaiterConfig={"Delay": 0.2, "MaxAttempts": 50})

    def snapshot_s3(self) -> int:
        """Copy every object of every bucket to `.local/s3/<bucket>/<key>` (atomically)."""
        s3, _ = self._clients()
        tmp = self.snapshot_dir.with_name("s3.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        count = 0
        for bucket in s3.list_buckets().get("Buckets", []):
            name = bucket["Name"]
            (tmp / name).mkdir()
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    target = tmp / name / obj["Key"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(name, obj["Key"], str(target))
                    count += 1
        old = self.snapshot_dir.with_name("s3.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.snapshot_dir.exists():
            self.snapshot_dir.rename(old)
        tmp.rename(self.snapshot_dir)
        shutil.rmtree(old, ignore_errors=True)
        return count

    def restore_s3(self) -> int:
        if not self.snapshot_dir.is_dir():
            return 0
        s3, _ = self._clients()
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        count = 0
        for bucket_dir in sorted(p for p in self.snapshot_dir.iterdir() if p.is_dir()):
            if bucket_dir.name not in existing:
                s3.create_bucket(Bucket=bucket_dir.name, CreateBucketConfiguration={"LocationConstraint": REGION})
            for path in sorted(p for p in bucket_dir.rglob("*") if p.is_file()):
                s3.upload_file(str(path), bucket_dir.name, path.relative_to(bucket_dir).as_posix())
                count += 1
        return count

    # ---------------------------------------------------------------- public
    def up(self, services=SERVICES, timeout: float = 90) -> dict:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        services = [s for s in SERVICES if s in services]
        if "s3" in services:
            fresh = self._read_pid("s3") is None
            self._start("s3", timeout)
            if fresh:
                restored = self.restore_s3()
                if restored:
                    self._say(f"restored {restored} S3 object(s) from {self.snapshot_dir}")
            self._create_resources()
        for name in services:
            if name != "s3":
                self._start(name, timeout)
        return self.env()

    def down(self) -> None:
        for name in ("prefect", "mlflow"):
            if self._stop(name):
                self._say(f"{name:8s} stopped")
        if self._read_pid("s3") is not None:
            if self.healthy("s3"):
                count = self.snapshot_s3()
                self._say(f"saved {count} S3 object(s) to {self.snapshot_dir}")
            self._stop("s3")
            self._say("s3       stopped")

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


def activate_if_running(announce: bool = True) -> bool:
    """CLIs' default: with no AWS endpoint configured (env or .env) but the local
    stack up, point this process at it, as `make` users expect. Returns True if so.
    With an endpoint configured, or the stack down, nothing changes (AWS profile)."""
    if config.get_settings().aws_endpoint_url:
        return False
    stack = LocalStack.from_settings(quiet=True)
    if not stack.healthy("s3"):
        return False
    stack.activate()
    if announce:
        print(f"using the local stack (S3 + Kinesis {stack.url('s3')}, MLflow {stack.url('mlflow')})", file=sys.stderr)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Start/stop the local S3+Kinesis, MLflow and Prefect servers.")
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--services", default=",".join(SERVICES), help="comma-separated subset of s3,mlflow,prefect")
    args = parser.parse_args(argv)
    stack = LocalStack.from_settings()
    try:
        if args.command == "up":
            stack.up([s.strip() for s in args.services.split(",") if s.strip()])
            print("\nPoint your shell at it:  eval \"$(python -m ride_duration.stack env)\"")
        elif args.command == "down":
            stack.down()
        elif args.command == "status":
            for name, info in stack.status().items():
                state = "up" if info["healthy"] else ("starting/unhealthy" if info["pid"] else "down")
                print(f"{name:8s} {state:20s} {info['url']}  pid={info['pid'] or '-'}")
        elif args.command == "env":
            for key, value in stack.env().items():
                print(f"export {key}={value}")
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
