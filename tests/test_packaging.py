"""Build the sdist + wheel, check them, install the wheel outside the repo and predict."""

import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
