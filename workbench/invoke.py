"""The Lambda invoke endpoint, as the Runtime Interface Emulator in the image serves it:
`POST /2015-03-31/functions/function/invocations` on port 8080."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import requests
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from ride_duration.config import get_settings
from ride_duration.registry import ModelNotFound
from ride_duration.stream import get_service, lambda_handler

from .process import Server
from .stack import activate_if_running

log = logging.getLogger(__name__)

INVOKE_PATH = "/2015-03-31/functions/function/invocations"


def create_invoke_app(handler=None):
    """A Flask app answering like the Lambda Runtime Interface Emulator (RIE)."""
    app = Flask(__name__)
    app.json.sort_keys = False  # keep the handler's key order, as Lambda returns it
    handler = handler or lambda_handler

    @app.post(INVOKE_PATH)
    def invoke():
        try:
            event = json.loads(request.get_data())
        except (ValueError, RecursionError):
            event = None
        if event is None:  # Lambda's Invoke API refuses a payload that is not JSON (InvalidRequestContentException)
            return jsonify(errorType="InvalidRequestContent", errorMessage="the request body must be a JSON event"), 400
        try:
            return jsonify(handler(event, None))
        except Exception as exc:
            # As Lambda and the RIE: the invocation itself succeeded (200); the function's error
            # is the body, flagged by X-Amz-Function-Error. The server keeps serving.
            log.exception("handler failed")
            response = jsonify(errorType=type(exc).__name__, errorMessage=str(exc))
            response.headers["X-Amz-Function-Error"] = "Unhandled"
            return response, 200

    return app


def serve_invoke(host: str = "127.0.0.1", port: int = 8080, handler=None) -> None:
    # Load the model before accepting requests, as the first (cold) invocation would.
    if handler is None:
        get_service()
    server = make_server(host, port, create_invoke_app(handler), threaded=False)
    print(f"invoke endpoint: http://{host}:{port}{INVOKE_PATH}", flush=True)
    server.serve_forever()


def start_invoke_server(port: int, *, test_run: bool = True, timeout: float = 120, env: dict | None = None) -> Server:
    """`python -m workbench.invoke` as a subprocess, returned once it answers; the caller
    stops it (`server.stop()`). A separate process, like the image's RIE."""
    env = {"TEST_RUN": "True" if test_run else "", **(env or {})}
    server = Server(
        [sys.executable, "-m", "workbench.invoke", "--port", str(port)],
        ready_url=f"http://127.0.0.1:{port}/",
        name="the invoke server",
        log_path=get_settings().local_dir / "logs" / f"invoke-server-{port}.log",
        env=env,
        ready=lambda: _answers(port),
    )
    return server.start(timeout)


def _answers(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=1)  # any answer, even a 404: it is serving
        return True
    except requests.ConnectionError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workbench.invoke", description="The Lambda invoke endpoint (like the RIE in the image)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--test-run", action="store_true", help="do not write predictions (TEST_RUN=True)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    activate_if_running()
    if args.test_run:
        os.environ["TEST_RUN"] = "True"
    try:
        serve_invoke(args.host, args.port)
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
