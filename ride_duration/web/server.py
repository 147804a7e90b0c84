"""Starting the service under gunicorn: `python -m ride_duration.web serve` (and `make serve`).

The Flask development server is never used: gunicorn is the only way this
package serves HTTP. The image runs gunicorn directly (its CMD), with the same
gunicorn.conf.py, which alone decides the address (WEB_BIND).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..config import repo_root

APP_SPEC = "ride_duration.web:create_app()"
CONFIG_NAME = "gunicorn.conf.py"


class ServerError(RuntimeError):
    pass


def gunicorn_config_path() -> Path:
    """The repo's gunicorn.conf.py (checkout root), else the one in the cwd (the image's /app)."""
    for folder in (repo_root(), Path.cwd()):
        if folder is not None and (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    raise ServerError(f"no {CONFIG_NAME} in the checkout or the current folder")


def gunicorn_command(app: str = APP_SPEC, *, config: Path | None | bool = True, args: tuple = ()) -> list[str]:
    """`python -m gunicorn -c gunicorn.conf.py [args] APP`.

    config=True: the repo's config; a path: that file; None/False: gunicorn's defaults.
    """
    cmd = [sys.executable, "-m", "gunicorn"]
    if config is True:
        config = gunicorn_config_path()
    if config:
        cmd += ["-c", str(config)]
    return [*cmd, *args, app]


def serve(app: str = APP_SPEC) -> None:
    """Replace this process with gunicorn (what `make serve` runs), on WEB_BIND."""
    cmd = gunicorn_command(app)
    os.execv(cmd[0], cmd)
