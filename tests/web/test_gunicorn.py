"""The service under a real gunicorn process (the repo's gunicorn.conf.py: gunicorn's stock gevent worker)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from ride_duration.config import WEB_PORT
from ride_duration.predict import make_prediction
from ride_duration.web.payload import MAX_CONTENT_LENGTH
from workbench.gunicorn import GunicornServer
from workbench.stack import free_port

REPO = Path(__file__).resolve().parents[2]
RIDE = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}
JSON = {"Content-Type": "application/json"}
CONFIG = runpy.run_path(str(REPO / "gunicorn.conf.py"))


def test_health_reports_the_registry_version(served, trained_model):
    health = served.health()
    assert health["status"] == "ok"
    assert health["model_version"] == trained_model["logged"].run_id
    assert "training_data" in health  # what load_model found in the registry (None when not recorded)


def test_example_ride(served, trained_model):
    response = requests.post(served.url + "/predict", json=RIDE, timeout=10)
    assert response.status_code == 200
    assert response.json() == {
        "duration": pytest.approx(float(make_prediction(trained_model["pipeline"], RIDE)[0]), abs=1e-9),
        "model_version": trained_model["logged"].run_id,
    }


def _hostile_requests():
    """(method, path, body bytes, headers) of malformed, hostile or wrong requests."""
    values = [
        None,
        True,
        False,
        "130",
        "",
        [],
        {},
        [130],
        {"v": 130},
        -1,
        0,
        266,
        1e400,
        -1e400,
        10**30,
        130.5,
        "NaN",
        2**63,
        -(2**63),
        1e-320,
        "∞",
        "<script>",
        501,
        -0.001,
        1e308,
    ]
    raw_values = [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1e999",
        b"9" * 5000,
        b"0x10",
        b"01",
        b".5",
        b"+1",
        b"true",
        b"null",
        b'"\\ud800"',
        b"[[[[[[]]]]]]",
    ]
    out = []
    for field, value in itertools.product(RIDE, values):  # wrong types and ranges per field
        if (
            field == "trip_distance"
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and 0 <= value <= 500
        ):
            continue  # a valid distance
        bad = {**RIDE, field: value}
        out += [
            ("POST", "/predict", json.dumps(bad).encode(), JSON),  # alone and inside a list
            ("POST", "/predict", json.dumps([RIDE, bad]).encode(), JSON),
        ]
    for field, raw in itertools.product(RIDE, raw_values):  # JSON literals json.dumps would not write
        body = (
            b"{"
            + b", ".join(f'"{k}": '.encode() + (raw if k == field else json.dumps(v).encode()) for k, v in RIDE.items())
            + b"}"
        )
        out.append(("POST", "/predict", body, JSON))
    for field in RIDE:  # missing fields, alone and in lists
        ride = {k: v for k, v in RIDE.items() if k != field}
        out += [
            ("POST", "/predict", json.dumps(ride).encode(), JSON),
            ("POST", "/predict", json.dumps([RIDE, ride]).encode(), JSON),
        ]
    nested = b'{"a":' * 5000 + b"1" + b"}" * 5000
    bodies = [
        b"",
        b" ",
        b"null",
        b"1",
        b'"ride"',
        b"[]",
        b"[1,2]",
        b"[null]",
        b"{}",
        b"{",
        b"}",
        b"[",
        b"\x00\x01",
        b"\xff" * 10,
        b"PULocationID=130",
        b"<ride/>",
        nested,
        b"[" * 50_000 + b"]" * 50_000,
        json.dumps([RIDE] * 1001).encode(),
        json.dumps({"rides": [RIDE]}).encode(),
        json.dumps({**RIDE, "trip_distance": [1] * 10_000}).encode(),
        json.dumps([[RIDE]]).encode(),
        b'{"PULocationID": 130, "PULocationID": "x", "DOLocationID": 1}',
    ]
    out += [("POST", "/predict", b, JSON) for b in bodies]
    out += [("POST", "/predict", b"x" * (MAX_CONTENT_LENGTH + n), JSON) for n in (1, 1000, 500_000)]
    out += [("POST", "/predict", json.dumps([RIDE] * 3000).encode(), JSON)]  # too large as a list
    for ctype in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "",
        "application/jsonx",
        "image/png",
    ]:
        out.append(("POST", "/predict", json.dumps(RIDE).encode(), {"Content-Type": ctype} if ctype else {}))
    for method, path in itertools.product(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"], ["/predict"]):
        out.append((method, path, json.dumps(RIDE).encode(), JSON))
    out += [("POST", "/health", b"{}", JSON), ("DELETE", "/health", b"", {})]
    for path in [
        "/",
        "/predict/",
        "/predict/1",
        "/admin",
        "/../etc/passwd",
        "/%00",
        "/" + "a" * 2000,
        "/health/x",
        "/PREDICT",
    ]:
        out += [("GET", path, b"", {}), ("POST", path, json.dumps(RIDE).encode(), JSON)]
    return out


def test_hostile_payloads_never_5xx(served):
    cases = _hostile_requests()
    assert len(cases) >= 200
    session = requests.Session()
    statuses = {}
    for method, path, body, headers in cases:
        response = session.request(method, served.url + path, data=body, headers=headers, timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        label = f"{method} {path[:40]} {body[:80]!r} {headers}"
        if method == "OPTIONS":  # Flask answers the allowed methods
            assert response.status_code == 200 and "POST" in response.headers["Allow"]
            continue
        assert 400 <= response.status_code < 500, f"{response.status_code} for {label}: {response.text[:200]}"
        error = response.json()["error"]
        assert isinstance(error, str) and 10 < len(error) <= 300, label
    assert served.health()["status"] == "ok"  # still serving
    assert {400, 404, 405, 413, 415} <= set(statuses)


def _random_rides(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "PULocationID": rng.randint(1, 265),
            "DOLocationID": rng.randint(1, 265),
            "trip_distance": round(rng.uniform(0, 30), 2),
        }
        for _ in range(n)
    ]


def test_2000_concurrent_requests_match_the_model(served, trained_model):
    connections, per_connection = 8, 260
    rides = _random_rides(connections * per_connection, seed=7)
    expected = make_prediction(trained_model["pipeline"], rides)
    answers = [None] * len(rides)
    failures = []

    def worker(k: int) -> None:
        session = requests.Session()  # one keep-alive connection per thread
        for i in range(k, len(rides), connections):
            try:
                response = session.post(served.url + "/predict", json=rides[i], timeout=30)
                response.raise_for_status()
                answers[i] = response.json()["duration"]
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                failures.append(f"ride {i}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert answers == pytest.approx(expected.tolist(), abs=1e-9)
    # and a list of the same rides in one request
    response = requests.post(served.url + "/predict", json=rides[:500], timeout=30)
    assert [a["duration"] for a in response.json()] == pytest.approx(expected[:500].tolist(), abs=1e-9)


def test_predict_client_script(served, trained_model):
    host = served.url.removeprefix("http://")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/predict_client.py"), "--host", host],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["model_version"] == trained_model["logged"].run_id
    assert answer["duration"] == pytest.approx(float(make_prediction(trained_model["pipeline"], RIDE)[0]))


def test_predict_client_script_reports_errors(served):
    host = served.url.removeprefix("http://")
    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/predict_client.py"),
            "--host",
            host,
            "--ride",
            '{"PULocationID": 0, "DOLocationID": 1, "trip_distance": 1}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "400" in bad.stderr and "'PULocationID' must be a TLC zone id" in bad.stderr
    down = subprocess.run(
        [sys.executable, str(REPO / "scripts/predict_client.py"), "--host", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert down.returncode == 1 and "is the service running?" in down.stderr


def test_serve_command_runs_gunicorn_on_web_bind(stack, trained_model):
    """`make serve` = `python -m ride_duration.web serve`: gunicorn with the repo's config, never
    Flask's server, listening where WEB_BIND says (no --bind on its command line overrides it)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ride_duration.web", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "WEB_BIND": f"127.0.0.1:{port}"},
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["model_version"] == trained_model["logged"].run_id
        response = requests.post(f"http://127.0.0.1:{port}/predict", json=RIDE, timeout=10)
        assert response.status_code == 200
        assert "gunicorn" in response.headers["Server"].lower()
    finally:
        output = None
        for _ in range(30):  # TERM again each second: a worker still booting drops it (see GunicornServer.stop)
            with contextlib.suppress(ProcessLookupError):  # it may have exited on its own (the assert above says why)
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                output = proc.communicate(timeout=1)[0]
                break
    assert "Using worker: gevent" in output
    assert f"Listening at: http://127.0.0.1:{port}" in output
    assert "Booting worker" in output


def test_web_bind_default_and_override():
    """gunicorn.conf.py is the one place that decides the address: WEB_BIND, else 0.0.0.0:9696."""
    env = {k: v for k, v in os.environ.items() if k != "WEB_BIND"}
    read = [sys.executable, "-c", f"import runpy; print(runpy.run_path({str(REPO / 'gunicorn.conf.py')!r})['bind'])"]
    default = subprocess.run(read, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert default == f"0.0.0.0:{WEB_PORT}"
    env["WEB_BIND"] = "127.0.0.1:1234"
    assert subprocess.run(read, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip() == (
        "127.0.0.1:1234"
    )
    makefile = (REPO / "Makefile").read_text()
    serve = makefile.split("\nserve:", 1)[1].split("\n\n", 1)[0].split("\n")[1]
    assert "ride_duration.web serve" in serve and "--bind" not in serve and "WEB_BIND" not in serve


def _raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes: for requests no HTTP client would send."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def _status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw[:300]
    return int(head[9:12]), json.loads(body)


PARTIAL_HEADERS = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: appl"
PARTIAL_BODY = (
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    + b'{"PULocationID": 130, '
)  # 22 of the 200 bytes announced


BODY_TIMEOUT = 3  # seconds, WEB_BODY_TIMEOUT for `quick_deadlines` (the service's default is 10)


@pytest.fixture(scope="module")
def quick_deadlines(stack, trained_model):
    """The service with a short body deadline, so the slow-client test waits seconds, not tens."""
    with GunicornServer(port=free_port(), env={"WEB_BODY_TIMEOUT": str(BODY_TIMEOUT)}) as server:
        yield server


def test_slow_clients_neither_delay_valid_requests_nor_stay_open(quick_deadlines, trained_model):
    """50 slow clients (half stuck in their headers, half in their body, each trickling a
    byte a second so an idle timeout would never fire): a valid request still answers
    within 1 s, and the server closes every slow connection within its deadline:
    headers within `keepalive` (the gevent worker's header read), a body answered 408
    JSON at WEB_BODY_TIMEOUT (the app's gevent.Timeout) and closed `keepalive` later
    (gunicorn drains the rest of the body before it would read a next request).
    With gthread (2 workers x 2 threads) 4 such clients made valid requests time out."""
    served = quick_deadlines
    keepalive = CONFIG["keepalive"]
    expected = float(make_prediction(trained_model["pipeline"], RIDE)[0])
    selector = selectors.DefaultSelector()
    opened = {}
    for i in range(50):
        sock = socket.create_connection(("127.0.0.1", served.port), timeout=5)
        sock.sendall(PARTIAL_HEADERS if i % 2 else PARTIAL_BODY)
        sock.setblocking(False)
        opened[sock] = ("headers" if i % 2 else "body", time.monotonic())
        selector.register(sock, selectors.EVENT_READ)
    received = {sock: b"" for sock in opened}
    answered, closed, latencies = {}, {}, []
    session = requests.Session()
    began = time.monotonic()
    give_up = began + keepalive + BODY_TIMEOUT + 10
    next_trickle = began + 0.5  # half a second off the deadlines (whole seconds): never a byte as the server closes

    def collect(timeout: float) -> None:
        for key, _ in selector.select(timeout=timeout):
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:  # a reset after the answer is still a close
                chunk = b""
            now = time.monotonic() - opened[sock][1]
            if chunk:
                received[sock] += chunk
                answered.setdefault(sock, now)
            else:
                selector.unregister(sock)
                closed[sock] = now

    try:
        while len(closed) < len(opened) and time.monotonic() < give_up:
            start = time.monotonic()
            answer = session.post(served.url + "/predict", json=RIDE, timeout=5)
            latencies.append(time.monotonic() - start)
            assert answer.status_code == 200 and answer.json()["duration"] == pytest.approx(expected, abs=1e-9)
            collect(timeout=0.25)
            if time.monotonic() >= next_trickle:  # one more byte from every slow client still open
                next_trickle += 1
                for sock in set(opened) - set(closed):
                    with contextlib.suppress(OSError):
                        sock.send(b"p" if opened[sock][0] == "headers" else b" ")
    finally:
        for sock in opened:
            sock.close()
        selector.close()
    assert len(closed) == 50, f"{50 - len(closed)} slow connections still open after {time.monotonic() - began:.0f} s"
    assert max(latencies) < 1.0, f"a valid request took {max(latencies):.2f} s next to 50 slow clients"
    for sock, (kind, _) in opened.items():
        if kind == "headers":  # no answer is possible: the request is not known yet
            assert closed[sock] < keepalive + 1.5, (
                f"a client stuck in its headers was closed after {closed[sock]:.1f} s"
            )
            assert received[sock] == b""
        else:
            assert BODY_TIMEOUT - 0.5 < answered[sock] < BODY_TIMEOUT + 1.5, f"408 after {answered[sock]:.1f} s"
            status, body = _status_and_json(received[sock])
            assert status == 408 and body == {"error": f"the request body did not arrive within {BODY_TIMEOUT:g} s"}
            assert closed[sock] < BODY_TIMEOUT + keepalive + 1.5, f"a slow body was closed after {closed[sock]:.1f} s"


def test_body_shorter_than_its_content_length_gets_400(served):
    """A client that sends part of the body it announced, then half-closes (no more to send, still
    reading): gunicorn hands the app the bytes that came, which may parse as a valid ride."""
    ride = json.dumps(RIDE).encode()
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(head % (len(ride) + 10) + ride)  # a whole ride, 10 bytes short of the length
        sock.shutdown(socket.SHUT_WR)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    status, body = _status_and_json(raw)
    assert status == 400, body
    assert body == {
        "error": f"the request body ended after {len(ride)} of the {len(ride) + 10} bytes its Content-Length announced"
    }
    # the whole body, on the same terms, is a prediction
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(head % len(ride) + ride)
        sock.shutdown(socket.SHUT_WR)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    status, body = _status_and_json(raw)
    assert status == 200 and "duration" in body


def _chunked(body: bytes, size: int = 8192):
    for i in range(0, len(body), size):
        yield body[i : i + size]


def test_chunked_body_over_the_limit_gets_413(served, trained_model):
    """A chunked body has no Content-Length: it used to be cut at the limit and answered 200."""
    rides = _random_rides(600, seed=3)
    small = json.dumps(rides).encode()  # ~45 KiB
    assert len(small) < MAX_CONTENT_LENGTH
    answer = requests.post(served.url + "/predict", data=_chunked(small), headers=JSON, timeout=30)
    assert answer.status_code == 200, answer.text
    expected = make_prediction(trained_model["pipeline"], rides)
    assert [a["duration"] for a in answer.json()] == pytest.approx(expected.tolist(), abs=1e-9)
    # valid JSON up to the limit, then spaces: cut at the limit, it would still parse
    big = json.dumps(rides).encode() + b" " * (MAX_CONTENT_LENGTH + 1000)
    answer = requests.post(served.url + "/predict", data=_chunked(big), headers=JSON, timeout=30)
    assert answer.status_code == 413
    assert answer.json() == {"error": f"the request body is larger than {MAX_CONTENT_LENGTH} bytes"}
    # exactly at the limit is allowed
    exact = json.dumps(rides).encode().ljust(MAX_CONTENT_LENGTH)
    answer = requests.post(served.url + "/predict", data=_chunked(exact), headers=JSON, timeout=30)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    "raw, status, words",
    [
        (b"GARBAGE\r\n\r\n", 400, "Invalid Request Line"),
        (b"GET /health HTTP/9.9\r\n\r\n", 400, "Invalid HTTP Version"),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 400, "Request Line is too large"),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(150)) + b"\r\n",
            431,
            "limit request headers fields",
        ),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "limit request headers fields size",
        ),
    ],
    ids=["request-line", "http-version", "long-request-line", "too-many-headers", "header-too-large"],
)
def test_broken_http_gets_gunicorns_4xx(served, raw, status, words):
    """Requests that are not HTTP get gunicorn's own answer (its page, not the app's JSON: the
    app never sees them), then a close; docs/web-service.md says what a proxy adds."""
    answer = _raw_exchange(served.port, raw)
    assert int(answer[9:12]) == status, answer[:300]
    assert words.encode() in answer and b"connection: close" in answer.lower()
    assert served.health()["status"] == "ok"


def test_stop_waits_at_most_keepalive_for_idle_clients():
    """A stop (docker stop, the tests) waits for an idle keep-alive connection no longer than
    `keepalive` (the worker's deadline for a next request), not `graceful_timeout`."""
    server = GunicornServer("benchmarks.web:create_hello_app()", port=free_port()).start()
    idle = requests.Session()
    assert idle.get(server.url + "/health", timeout=5).ok  # its connection stays open, idle
    start = time.monotonic()
    server.stop()
    took = time.monotonic() - start
    assert server.proc.returncode is not None
    # The margin is the workers' and the arbiter's own exit, seconds on a busy machine; still far from graceful_timeout.
    assert took < CONFIG["keepalive"] + 4 < CONFIG["graceful_timeout"], f"stopping took {took:.1f} s"
