"""The images' base images as this machine stands in for them without Docker: each base's Python
and glibc (which wheels it can install), and an interpreter of that Python installed here (pyenv),
for replaying an image's install. The image tests, tests/test_packaging.py and `make bench-images`
all ask here."""

from __future__ import annotations

import os
import re
from pathlib import Path

# Each base image: its Python and its glibc's minor version (a manylinux_2_<minor> wheel needs at most that).
BASES = {
    "public.ecr.aws/lambda/python:3.12": ("3.12", 34),  # Amazon Linux 2023: glibc 2.34
    "python:3.12-slim": ("3.12", 36),  # Debian bookworm: glibc 2.36
    "public.ecr.aws/lambda/python:3.11": ("3.11", 26),  # Amazon Linux 2: glibc 2.26 (the former Lambda base)
}


def base_image(dockerfile: Path) -> str:
    """The image a Dockerfile builds on: its first FROM."""
    found = re.search(r"^FROM\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
    if found is None:
        raise ValueError(f"{dockerfile} has no FROM line")
    return found.group(1)


def base_python_version(dockerfile: Path) -> str:
    base = base_image(dockerfile)
    if base not in BASES:
        raise KeyError(f"{dockerfile}: its base {base} has no known Python and glibc in workbench/images.py")
    return BASES[base][0]


def local_python(version: str) -> Path | None:
    """The newest interpreter of `version` ("3.12") under pyenv here, or None."""
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"), "versions")
    found = sorted(
        versions.glob(f"{version}.*/bin/python{version}"),
        key=lambda path: [int(part) for part in path.parents[1].name.split(".") if part.isdigit()],
    )
    return found[-1] if found else None


def image_python(dockerfile: Path) -> Path | None:
    """An interpreter here of the Python the Dockerfile's base image runs, or None."""
    return local_python(base_python_version(dockerfile))
