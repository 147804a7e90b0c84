"""Load-testing the service: the same load against three gunicorn servers.

(a) the project: `create_app()` with gunicorn.conf.py (fast runtime, 2 stock gevent workers)
(b) the 2022 course: Flask + gunicorn with 1 sync worker, the sklearn forest with
    n_jobs=-1 predicting each request
(c) a hello-world endpoint with gunicorn.conf.py: the ceiling for Flask + gunicorn here

The load generator is Python: N threads, each with its own keep-alive
connection (a minimal HTTP/1.1 client, see `KeepAliveClient`), posting the example ride for a fixed duration.
It shares the machine's cores with the server, as any local load test does,
so compare the ratios measured side by side, not the absolute numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from flask import Flask, jsonify, request

from benchmarks.figures import record
from ride_duration.config import get_settings
from ride_duration.features import EXAMPLE_RIDE
from ride_duration.predict import load_serving_model, make_prediction
from ride_duration.registry import load_model
from ride_duration.web import create_app
from ride_duration.web.app import new_app
from ride_duration.web.payload import parse_json, validate_rides
from workbench.gunicorn import GunicornServer
from workbench.stack import free_port


@dataclass
class LoadResult:
    name: str
    requests: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray = field(repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")


class KeepAliveClient:
    """A minimal HTTP/1.1 client on one keep-alive socket.

    http.client parses headers with the email package, which costs more CPU
    than the service's own work; on a 2-core machine the load generator would
    measure itself. This sends pre-built request bytes and reads exactly one
    response (status line + Content-Length body). Enough for our own servers.
    """

    def __init__(self, host: str, port: int, timeout: float = 30):
        self.address = (host, port)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        return sock

    def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = self._connect()
        self.sock.sendall(raw)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._recv()
        head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
        status = int(head[9:12])
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        while len(self.buffer) < length:
            self._recv()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        if close:
            self.close()
        return status, body

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


def build_request(
    host: str, path: str, body: bytes, content_type: str = "application/json", method: str = "POST"
) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def run_load(
    url: str,
    payload=EXAMPLE_RIDE,
    *,
    connections: int = 8,
    seconds: float = 5.0,
    path: str = "/predict",
    name: str = "",
) -> LoadResult:
    """POST `payload` over `connections` keep-alive connections (one thread each) for `seconds`."""
    host, port = url.removeprefix("http://").split(":")
    raw = build_request(f"{host}:{port}", path, json.dumps(payload).encode())
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    start_line = threading.Barrier(connections + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        client = KeepAliveClient(host, int(port))
        start_line.wait()
        clock, times = time.perf_counter, latencies[i]
        while (t0 := clock()) < stop_at[0]:
            try:
                status, _ = client.request(raw)
            except (OSError, ValueError):
                status = 0
                client.close()
            if status == 200:
                times.append((clock() - t0) * 1000)
            else:
                errors[i] += 1
        client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    begin = time.perf_counter()
    stop_at[0] = begin + seconds
    start_line.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    all_latencies = np.concatenate([np.asarray(x) for x in latencies]) if any(latencies) else np.empty(0)
    return LoadResult(name, len(all_latencies), sum(errors), elapsed, all_latencies)


def create_2022_app() -> Flask:
    """The 2022 course's service: the sklearn pipeline with the forest's n_jobs=-1, each
    request one `predict` call (its `predict.py`, with this project's request handling)."""
    model, version = load_model(settings=get_settings())
    model[-1].n_jobs = -1
    app = new_app("duration-prediction-2022")

    @app.get("/health")
    def health():
        return jsonify(status="ok", model_version=version)

    @app.post("/predict")
    def predict():
        ride = request.get_json()
        return jsonify(duration=float(make_prediction(model, ride)[0]), model_version=version)

    return app


def create_hello_app() -> Flask:
    """A hello-world endpoint with the service's app setup: the ceiling for Flask + gunicorn here."""
    app = new_app("hello")

    @app.get("/health")
    def health():
        return jsonify(status="ok", model_version="hello")

    @app.post("/predict")
    def predict():
        return jsonify(hello="world")

    return app


# name -> (gunicorn app spec, use the repo's gunicorn.conf.py?, extra gunicorn args)
SERVERS = {
    "a: project (fast runtime, gunicorn.conf.py)": ("ride_duration.web:create_app()", True, ()),
    "b: 2022 design (sklearn n_jobs=-1, 1 sync worker)": (
        "benchmarks.web:create_2022_app()",
        False,
        ("--workers", "1", "--worker-class", "sync", "--no-control-socket"),
    ),
    "c: hello world (gunicorn.conf.py)": ("benchmarks.web:create_hello_app()", True, ()),
}


def run_benchmark(
    seconds: float = 10.0,
    connections: int = 8,
    rounds: int = 5,
    warmup: float = 1.0,
    env: dict | None = None,
    servers: dict = SERVERS,
) -> list[LoadResult]:
    """Start every server, then load them in turn, `rounds` times `seconds/rounds` each.

    Interleaving the rounds spreads any background load on the machine over all
    servers alike, so the ratios stay meaningful on a shared machine.
    """
    with contextlib.ExitStack() as running:
        urls = {}
        for name, (app, use_config, args) in servers.items():
            server = GunicornServer(app, port=free_port(), config=use_config, args=args, env=env)
            urls[name] = running.enter_context(server).url
        for url in urls.values():
            run_load(url, connections=connections, seconds=warmup)
        parts: dict[str, list[LoadResult]] = {name: [] for name in urls}
        for _ in range(rounds):
            for name, url in urls.items():
                parts[name].append(run_load(url, connections=connections, seconds=seconds / rounds, name=name))
    return [
        LoadResult(
            name,
            sum(p.requests for p in runs),
            sum(p.errors for p in runs),
            sum(p.seconds for p in runs),
            np.concatenate([p.latencies_ms for p in runs]),
        )
        for name, runs in parts.items()
    ]


def format_table(results: list[LoadResult]) -> str:
    lines = [
        "| server | req/s | p50 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.rps:,.0f} | {r.percentile(50):.2f} | {r.percentile(99):.2f} | {r.errors} |")
    if len(results) == 3:
        a, b, c = results
        lines.append("")
        lines.append(
            f"a/b = {a.rps / b.rps:.1f}x (target >= 40)   a/c = {a.rps / c.rps:.2f} (target >= 0.5)   "
            f"a p99 = {a.percentile(99):.2f} ms (target <= 20)"
        )
    return "\n".join(lines)


def _per_call_ms(fn, calls: int = 2000) -> float:
    """Best of 5 runs of `calls // 5` calls, in ms per call (the least disturbed by the machine's other work)."""
    for _ in range(100):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        runs.append((time.perf_counter() - start) / (calls // 5) * 1000)
    return min(runs)


def request_breakdown(settings) -> dict:
    """Where one request's time goes in the app, timed in this process: the WSGI call of the
    service and of hello world (a request as gunicorn hands it over), and the service's own steps.

    What the service adds to hello world is its steps; the rest of (a)'s cost per request
    beside (c)'s, in the load test, is the worker's (gunicorn's parsing and writing, gevent)."""
    body = json.dumps(EXAMPLE_RIDE).encode()

    def wsgi_call(app) -> None:
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/predict",
            "SERVER_NAME": "bench",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.input_terminated": True,  # as gunicorn sets it
            "wsgi.errors": io.StringIO(),
        }
        b"".join(app(environ, lambda status, headers, exc_info=None: None))

    model, _ = load_serving_model(None, settings)
    service, hello = create_app(model, "bench"), create_hello_app()
    features, _ = validate_rides(parse_json(body))
    with service.app_context():
        steps = {
            "json_in_and_validation": _per_call_ms(lambda: validate_rides(parse_json(body))),
            "model_call": _per_call_ms(lambda: model.predict(features)),
            "json_out": _per_call_ms(lambda: jsonify(duration=1.0, model_version="bench")),
        }
    return {
        "service_app_ms": _per_call_ms(lambda: wsgi_call(service)),
        "hello_app_ms": _per_call_ms(lambda: wsgi_call(hello)),
        **{f"{name}_ms": value for name, value in steps.items()},
    }


def measure_start(app: str, repeats: int = 5, env: dict | None = None) -> float:
    """Median seconds from launching gunicorn (gunicorn.conf.py) to its first answered /health."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with GunicornServer(app, port=free_port(), env=env):
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    """`make bench-web`: needs the model in the registry (`make services-up train`); prints a markdown table."""
    import argparse
    import os
    import sys

    from ride_duration.web.server import ServerError
    from workbench.stack import LocalStack

    parser = argparse.ArgumentParser(prog="python -m benchmarks.web", description=main.__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per server (default 10)")
    parser.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections (default 8)")
    args = parser.parse_args(argv)
    # Default to the local stack (make services-up) for whatever the environment does not set.
    for key, value in LocalStack.from_settings(quiet=True).env().items():
        os.environ.setdefault(key, value)
    try:
        results = run_benchmark(seconds=args.seconds, connections=args.connections)
    except ServerError as exc:
        print(f"error: a server did not start: {exc}", file=sys.stderr)
        return 1
    print(format_table(results))
    steps = request_breakdown(get_settings())
    print(
        "\none request in the app (WSGI call, this process): service {service_app_ms:.3f} ms, hello world "
        "{hello_app_ms:.3f} ms; the service's steps: JSON in + validation {json_in_and_validation_ms:.3f} ms, "
        "model call {model_call_ms:.3f} ms, JSON out {json_out_ms:.3f} ms".format(**steps)
    )
    service = measure_start("ride_duration.web:create_app()")
    floor = measure_start("benchmarks.web:create_hello_app()")
    print(
        f"\nstart to first /health, medians of 5: service {service:.2f} s (loads the model's serving form), "
        f"hello world {floor:.2f} s (gunicorn + Flask, no model): {service / floor:.2f}x"
    )
    a, b, c = results
    record(
        "web",
        {
            "connections": args.connections,
            "seconds_per_server": args.seconds,
            "a_req_s": round(a.rps),
            "b_req_s": round(b.rps, 1),
            "c_req_s": round(c.rps),
            "a_over_b": round(a.rps / b.rps, 1),
            "a_over_c": round(a.rps / c.rps, 2),
            "a_p50_ms": round(a.percentile(50), 2),
            "a_p99_ms": round(a.percentile(99), 2),
            "c_p99_ms": round(c.percentile(99), 2),
            "one_request_ms": {name.removesuffix("_ms"): round(value, 3) for name, value in steps.items()},
            "start_s": {"service": round(service, 2), "hello": round(floor, 2), "ratio": round(service / floor, 2)},
        },
    )
    print("figures recorded in docs/figures.json and docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
