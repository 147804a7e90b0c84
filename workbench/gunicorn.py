"""A gunicorn server owned by its caller (tests, the benchmark, notebook 03).

with GunicornServer(port=free_port()) as server:
    requests.post(server.url + "/predict", json=ride)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Self

import requests

from ride_duration.web.server import APP_SPEC, ServerError, gunicorn_command

from .process import ProcessFailed, Server, log_tail


class GunicornServer(Server):
    """gunicorn on 127.0.0.1:<port>, ready once `/health` answers; `stop()` ends master and workers."""

    def __init__(
        self,
        app: str = APP_SPEC,
        *,
        port: int,
        config: Path | None | bool = True,
        args: tuple = (),
        env: dict | None = None,
        log_path: Path | None = None,
    ):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="gunicorn-", suffix=".log")
            os.close(fd)
        bind = f"127.0.0.1:{port}"
        cmd = gunicorn_command(app, config=config, args=args if config else ("--bind", bind, *args))
        # With the repo's config, the address comes the way it does for `make serve` and the image: WEB_BIND.
        env = {**(env or {}), "WEB_BIND": bind}
        # Without -c, gunicorn still reads ./gunicorn.conf.py: start it in a neutral folder then.
        cwd = None if "-c" in cmd else tempfile.gettempdir()
        super().__init__(cmd, ready_url=self.url + "/health", name="gunicorn", log_path=log_path, env=env, cwd=cwd)

    def start(self, timeout: float = 60) -> Self:
        try:
            return super().start(timeout)
        except ProcessFailed as exc:
            raise ServerError(str(exc)) from None

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=5).json()

    def log_tail(self, chars: int = 3000) -> str:
        return log_tail(self.log_path, chars)

    def stop(self, timeout: float = 15) -> int | None:
        """Stop gunicorn (master and workers); drop the log we made for it."""
        code = super().stop(timeout)
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
        return code
