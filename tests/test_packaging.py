"""Build the sdist + wheel, check them, install the wheel outside the repo and predict; and every
image's locked install resolves to wheels on its own base image (its Python, its glibc)."""

import json
import re
import shlex
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker

from workbench.images import BASES, base_image

REPO = Path(__file__).resolve().parents[1]

LOCK_SECTION = {"packages": "default", "dev-packages": "develop"}  # other categories keep their name


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], check=True, capture_output=True)
    return out


def test_sdist_and_wheel_carry_version_and_pass_twine(dist):
    version = (REPO / "ride_duration" / "VERSION").read_text().strip()
    wheel = next(dist.glob("*.whl"))
    sdist = next(dist.glob("*.tar.gz"))
    assert wheel.name == f"ride_duration_prediction-{version}-py3-none-any.whl"
    assert "ride_duration/VERSION" in zipfile.ZipFile(wheel).namelist()
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert any(n.endswith("ride_duration/VERSION") for n in names)
    assert not any("__pycache__" in n for n in names)
    check = subprocess.run(
        [sys.executable, "-m", "twine", "check", *map(str, dist.iterdir())], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "PASSED" in check.stdout


def test_wheel_installs_in_fresh_venv_and_predicts(dist, tmp_path, synthetic_months, see_these_packages):
    """A fresh venv outside the repo gets only the wheel; third-party packages come from
    this environment's site-packages through a .pth line (no re-download), while the
    editable install of the repo is NOT visible (its finder is not processed)."""
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    site = see_these_packages(python, "deps.pth")
    code = f"""
import ride_duration, sys
assert '{REPO}' not in ride_duration.__file__, ride_duration.__file__
from ride_duration.config import get_settings
from ride_duration.train import train
from ride_duration.predict import make_prediction
r = train({str(synthetic_months[(2021, 1)])!r}, {str(synthetic_months[(2021, 2)])!r}, get_settings(), params={{"n_estimators": 10}})
p = make_prediction(r.pipeline, [{{"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}}])
print(ride_duration.__version__, ride_duration.__file__, round(float(p[0]), 3))
"""
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    version, location, prediction = result.stdout.split()
    assert version == (REPO / "ride_duration" / "VERSION").read_text().strip()
    assert location.startswith(site)
    assert 1 < float(prediction) < 60


def image_install(dockerfile: Path) -> tuple[str, list[str]]:
    """(base image, locked categories) from a Dockerfile's FROM and its `pipenv install --categories` line."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    base = base_image(dockerfile)
    (line,) = [line for line in text.splitlines() if "pipenv install" in line and not line.startswith("#")]
    words = shlex.split(line)
    return base, words[words.index("--categories") + 1].split()


def locked_pins(categories: list[str], python: str) -> list[str]:
    """What `pipenv install --deploy --categories ...` installs from Pipfile.lock on Linux x86_64
    under `python`: every pin of those sections whose markers hold there."""
    lock = json.loads((REPO / "Pipfile.lock").read_text())
    target = {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    pins = {}
    for category in categories:
        for name, spec in lock[LOCK_SECTION.get(category, category)].items():
            if "version" in spec and (not spec.get("markers") or Marker(spec["markers"]).evaluate(target)):
                pins[name] = f"{name}{spec['version']}"
    return sorted(pins.values())


def resolve_on(base: str, pins: list[str], target: Path) -> subprocess.CompletedProcess:
    """pip's answer to installing `pins` on `base`: wheels only (the images have no compiler), for
    the base's Python and every manylinux tag its glibc runs; --dry-run, nothing installed."""
    python, glibc = BASES[base]
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check"]
    command += ["--only-binary=:all:", "--no-deps", "--target", str(target), "--python-version", python]
    command += ["--implementation", "cp", "--abi", f"cp{python.replace('.', '')}"]
    command += [arg for platform in platforms for arg in ("--platform", platform)]
    return subprocess.run([*command, *pins], capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("image", ["streaming", "web-service"])
def test_each_image_resolves_its_locked_install_on_its_base(image, tmp_path):
    base, categories = image_install(REPO / "docker" / image / "Dockerfile")
    assert base in BASES, f"{image}: base {base} has no known Python and glibc here"
    pins = locked_pins(categories, BASES[base][0])
    assert any(pin.startswith("numpy==") for pin in pins)
    done = resolve_on(base, pins, tmp_path)
    assert done.returncode == 0, f"{image} on {base}:\n{done.stderr[-2000:]}"


def test_the_former_lambda_base_cannot_install_the_lambda_pins(tmp_path):
    """The check has teeth: Amazon Linux 2 (glibc 2.26) has no wheel of the locked numpy."""
    _, categories = image_install(REPO / "docker" / "streaming" / "Dockerfile")
    done = resolve_on("public.ecr.aws/lambda/python:3.11", locked_pins(categories, "3.11"), tmp_path)
    assert done.returncode != 0
    assert "No matching distribution found for numpy==" in done.stderr
