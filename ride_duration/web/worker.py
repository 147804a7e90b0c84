"""The gunicorn worker the service runs: gunicorn's gevent worker, with a deadline
on request bodies and gunicorn's own error answers as JSON.

Why gevent: the service faces clients directly. With gthread (2 workers x 2
threads) four clients sending a body slowly held every thread and a valid
request waited until they gave up. Here every connection is a greenlet, so a
slow client costs a socket and a little memory, never a worker.

Deadlines, so a slow client is closed after a bounded time:
- request line and headers: `keepalive` seconds (gunicorn's gevent worker
  wraps each header read, the first request's too, in a gevent.Timeout);
- the body: BODY_TIMEOUT seconds from the end of the headers (WEB_BODY_TIMEOUT;
  gunicorn has no setting for it), answered 408 and closed;
- the whole request, response included: BODY_TIMEOUT + keepalive, a backstop for
  clients that do not read their answer.

gunicorn renders its own errors (malformed request line, 431, ...) as HTML in
`gunicorn.util.write_error`, its only writer of error pages; this worker
replaces it in its own process with the service's `{"error": ...}` shape.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings

import gevent
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import RequestTimeout

BODY_TIMEOUT = float(os.environ.get("WEB_BODY_TIMEOUT", "10"))  # 128 KiB at 13 KB/s
MAX_ERROR_LENGTH = 300  # same cap as the app's errors: gunicorn's messages quote the request


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's `util.write_error` with the service's JSON error body."""
    message = mesg or reason
    if len(message) > MAX_ERROR_LENGTH:
        message = message[: MAX_ERROR_LENGTH - 3] + "..."
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin1")
    util.write_nonblock(sock, head + body)


class DeadlineInput:
    """`wsgi.input` whose reads fail once the deadline has passed: werkzeug's 408
    RequestTimeout, which the app answers as JSON like its other HTTP errors."""

    def __init__(self, stream, seconds: float):
        self._stream = stream
        self.seconds = seconds
        self._deadline = time.monotonic() + seconds

    def _call(self, method, *args):
        remaining = self._deadline - time.monotonic()
        timer = gevent.Timeout(max(remaining, 0.001))
        timer.start()
        try:
            return method(*args)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise RequestTimeout(f"the request body did not arrive within {self.seconds:g} s") from None
        finally:
            timer.close()

    def read(self, size=None):
        return self._call(self._stream.read, size)

    def readline(self, size=None):
        return self._call(self._stream.readline, size)

    def readlines(self, hint=None):
        return self._call(self._stream.readlines, hint)

    def __iter__(self):
        return iter(self.readline, b"")


class _Deadlines:
    """WSGI wrapper: the body deadline, and the app's `Connection: close` honoured
    (gunicorn drops hop-by-hop headers, so it would keep the connection open)."""

    def __init__(self, app, seconds: float):
        self.app = app
        self.seconds = seconds

    def __call__(self, environ, start_response):
        environ["wsgi.input"] = DeadlineInput(environ["wsgi.input"], self.seconds)

        def start(status, headers, exc_info=None):
            if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
                response = getattr(start_response, "__self__", None)  # gunicorn's Response
                if response is not None and hasattr(response, "force_close"):
                    response.force_close()
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


def _end_reading(client) -> None:
    with contextlib.suppress(OSError, AttributeError):
        client.shutdown(socket.SHUT_RD)


class ServiceWorker(GeventWorker):
    """gunicorn's gevent worker with deadlines and JSON errors (see the module doc)."""

    def init_process(self):
        util.write_error = write_json_error  # this worker process only
        self._clients = {}  # greenlet -> its client socket
        self._idle = set()  # client sockets waiting for their next request
        super().init_process()

    def handle(self, listener, client, addr):
        self._clients[gevent.getcurrent()] = client
        try:
            super().handle(listener, client, addr)
        finally:
            self._clients.pop(gevent.getcurrent(), None)

    @contextlib.contextmanager
    def timeout_ctx(self):
        """gunicorn's wait for a request line and headers (keepalive seconds), which a
        shutdown ends at once: a stop must not wait for idle keep-alive clients."""
        client = self._clients.get(gevent.getcurrent())
        self._idle.add(client)
        try:
            if not self.alive:
                _end_reading(client)
            with gevent.Timeout(self.cfg.keepalive, False):
                yield
        finally:
            self._idle.discard(client)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        for client in list(self._idle):  # blocked in their header read: they see EOF and close
            _end_reading(client)

    def patch(self):
        # gevent warns that urllib3 imported ssl before the patch: with preload_app
        # the model is loaded (over HTTP/S3) in the master, before the fork. A worker
        # makes no outbound connection, so urllib3's unpatched ssl is never used here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Monkey-patching ssl after ssl has already been imported")
            super().patch()

    def load_wsgi(self):
        super().load_wsgi()
        self.wsgi = _Deadlines(self.wsgi, BODY_TIMEOUT)

    def handle_request(self, listener_name, req, sock, addr):
        timer = gevent.Timeout(BODY_TIMEOUT + self.cfg.keepalive)
        timer.start()
        try:
            keep_alive = super().handle_request(listener_name, req, sock, addr)
            # A greenlet runs until it blocks: a client whose next request is already
            # there would be served again and again while the others wait (p99 30-50 ms
            # under the benchmark, 2 ms with this turn-taking).
            gevent.sleep(0)
            return keep_alive
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self.log.info("closing %s: request not done within %g s", addr, timer.seconds)
            raise StopIteration() from None  # gunicorn's handle() closes the socket
        finally:
            timer.close()
