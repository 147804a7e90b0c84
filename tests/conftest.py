"""Shared fixtures: real local servers on free ports, a small synthetic month,
and one trained + registered model per test session."""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

import pytest

from ride_duration import config
from ride_duration.config import get_settings
from ride_duration.tlc import write_synthetic_month
from workbench.stack import LocalStack, free_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_RIDE = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}


@pytest.fixture(scope="session")
def synthetic_months(tmp_path_factory) -> dict:
    """Small synthetic green-taxi months (same schema as TLC), for fast training."""
    folder = tmp_path_factory.mktemp("synthetic")
    return {
        (2021, 1): write_synthetic_month(folder / "green_tripdata_2021-01.parquet", 2021, 1, n_rows=4000),
        (2021, 2): write_synthetic_month(folder / "green_tripdata_2021-02.parquet", 2021, 2, n_rows=3000),
    }


@pytest.fixture(scope="session")
def real_data_dir() -> Path | None:
    """The folder with the real TLC files (TLC_MIRROR), or None when not set."""
    mirror = os.environ.get("TLC_MIRROR")
    if mirror and Path(mirror, "green_tripdata_2021-01.parquet").is_file():
        return Path(mirror).resolve()
    return None


@pytest.fixture(scope="session")
def real_pipeline(real_data_dir):
    """The course's model trained on the real January, Feb kept for checks (20 s quiet, 75 s busy, 2 cores)."""
    if real_data_dir is None:
        pytest.skip("TLC_MIRROR is not set: no real data")
    from ride_duration.train import train

    jan, feb = (real_data_dir / f"green_tripdata_2021-0{m}.parquet" for m in (1, 2))
    return {"pipeline": train(jan, feb, get_settings()).pipeline, "feb": feb}


@pytest.fixture(scope="session")
def see_these_packages():
    """`see(python, name) -> its site-packages`: a fresh venv sees this environment's installed packages through
    a .pth line (no re-download), while this environment's editable finder for the repo
    is not run, so the venv's own install of the package is the one imported."""

    def see(python: Path, name: str) -> str:
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        Path(site, name).write_text(sysconfig.get_paths()["purelib"] + "\n")
        return site

    return see


def _start_stack(tmp_path_factory, services) -> LocalStack:
    # SeaweedFS's internal block of ports is chosen free by LocalStack itself.
    ports = {name: free_port() for name in ("s3", "kinesis", "mlflow", "prefect")}
    stack = LocalStack(local_dir=tmp_path_factory.mktemp("stack"), ports=ports, quiet=True)
    stack.up(services)
    return stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """SeaweedFS (S3), moto (Kinesis) and mlflow server on free ports; env points at them."""
    saved = dict(os.environ)
    stack = _start_stack(tmp_path_factory, ("s3", "mlflow"))
    stack.activate()
    yield stack
    stack.down()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def settings(stack) -> config.Settings:
    return config.get_settings()


@pytest.fixture(scope="session")
def trained_model(stack, synthetic_months):
    """The reference pipeline trained once on a small synthetic month, logged,
    registered and promoted to `production` on the session's stack."""
    from ride_duration.train import log_to_mlflow, train

    result = train(synthetic_months[(2021, 1)], synthetic_months[(2021, 2)], get_settings())
    logged = log_to_mlflow(result, promote=True, settings=get_settings())
    return {"result": result, "logged": logged, "pipeline": result.pipeline}


# Tests that start a server or a subprocess, or build and install packages; the rest
# form `make test-fast`. A test that needs the session's stack is marked by its fixtures.
# real_pipeline: trains on the real January (~75 s), too slow for the fast tier.
_SERVER_FIXTURES = {"stack", "http_folder", "real_pipeline"}
_SERVER_MODULES = {
    "test_dockerfile.py",
    "test_gunicorn.py",
    "test_packaging.py",
    "test_invoke.py",
    "test_scripts.py",
    "test_report.py",
    "test_flows.py",
    "test_stack_and_registry.py",
    "test_train.py",
    "test_model_behaviour.py",
    "test_xdist_groups.py",
}


def _xdist_group(item) -> str:
    """`make test` spreads the tests over processes (pytest-xdist, `--dist loadgroup`) by these groups, so
    an expensive fixture is made once: the batch package's Prefect server, the real-data model, a module's own."""
    if "batch" in item.path.parent.parts[-1:]:
        return "batch"
    if "real_pipeline" in getattr(item, "fixturenames", ()):
        return "real-data"
    return str(item.path.relative_to(REPO))


# tryfirst: pytest-xdist reads the xdist_group marks in its own hook of this name, so they must be set before.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in _SERVER_MODULES:
            item.add_marker(pytest.mark.integration)
        item.add_marker(pytest.mark.xdist_group(_xdist_group(item)))
