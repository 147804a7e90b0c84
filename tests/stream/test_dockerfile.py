"""The Lambda image, checked without a Docker engine.

Verified here: the Dockerfile's base, CMD and install steps; every COPY source
exists and is not dockerignored; the lock is what `pipenv install --deploy`
accepts (`pipenv verify`) and pins the versions this environment was tested
with; the COPYed files alone build the package, which installs with
`--no-deps` into a fresh venv (no system site-packages, the repo's editable
install invisible) where `lambda_function.lambda_handler` imports from it.
Then the image's own pip/pipenv steps (`--categories "stream"`) are replayed into
another fresh venv of the base image's Python (3.12), beside boto3 as the base image
carries it: no pandas, scikit-learn, MLflow, web server or Prefect there, at most
LAMBDA_PACKAGES_MB of the function's own packages, and the handler loads the session's
model's serving form from S3, answers the course's event and writes nothing outside
/tmp; a model without a serving form is refused in one sentence.
NOT verified: the image build itself (tests/test_packaging.py checks that its pins have
wheels for the base image's Python and glibc).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from workbench.images import base_python_version, image_python

from .conftest import REPO

DOCKERFILE = REPO / "docker" / "streaming" / "Dockerfile"
# The Lambda base image's Python (public.ecr.aws/lambda/python:3.12), installed beside this one.
BASE_PYTHON = image_python(DOCKERFILE)
# What the base image carries that the function uses: boto3 (and botocore, its dependencies).
BASE_PACKAGES = ("boto3",)
LAMBDA_PACKAGES_MB = 150  # the function's own installed packages
HEAVY = ("pandas", "sklearn", "scipy", "mlflow", "skops", "pyarrow")


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def copies(path: Path) -> list[tuple[list[str], str]]:
    out = []
    for keyword, rest in instructions(path):
        if keyword == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            out.append((parts[:-1], parts[-1]))
    return out


def test_base_image_cmd_and_install_steps():
    steps = instructions(DOCKERFILE)
    assert steps[0] == ("FROM", "public.ecr.aws/lambda/python:3.12")
    assert steps[-1] == ("CMD", '["lambda_function.lambda_handler"]')
    runs = [rest for keyword, rest in steps if keyword == "RUN"]
    # pipenv pinned to the version that verified the lock here (same as the web image)
    assert any(f"pip install --no-cache-dir pipenv=={version('pipenv')}" in r for r in runs)
    assert any('pipenv install --system --deploy --categories "stream"' in r for r in runs)
    env = " ".join(rest for keyword, rest in steps if keyword == "ENV")
    assert "HOME=/tmp" in env and "MLFLOW_DISABLE_TELEMETRY=true" in env
    assert any("pip install" in r and "--no-deps /build" in r for r in runs)
    assert (["docker/streaming/lambda_function.py"], "${LAMBDA_TASK_ROOT}/") in copies(DOCKERFILE)


def test_copy_sources_exist_and_are_not_ignored():
    ignored = [
        line.strip()
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for sources, _ in copies(DOCKERFILE):
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository (build context = repo root)"
            assert not any(fnmatch.fnmatch(source, pattern) or source.startswith(pattern + "/") for pattern in ignored)


def test_every_image_installs_from_the_same_lock():
    for dockerfile in sorted((REPO / "docker").glob("*/Dockerfile")):
        text = dockerfile.read_text()
        if "pipenv" in text:
            assert "--deploy" in text, dockerfile
            assert any(sources[:2] == ["Pipfile", "Pipfile.lock"] for sources, _ in copies(dockerfile)), dockerfile


@pytest.fixture(scope="module")
def locked_requirements(tmp_path_factory) -> dict:
    """`pipenv verify` (what --deploy checks) and the pins of every image's category (offline)."""
    work = tmp_path_factory.mktemp("pipenv")
    for name in ("Pipfile", "Pipfile.lock"):
        shutil.copy(REPO / name, work / name)
    pipenv = [sys.executable, "-m", "pipenv"]
    env = {**os.environ, "PIPENV_VERBOSITY": "-1", "PIPENV_IGNORE_VIRTUALENVS": "1"}
    verify = subprocess.run(
        [*pipenv, "verify"], cwd=work, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    reqs = subprocess.run(
        [*pipenv, "requirements", "--categories", "packages web stream batch"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert reqs.returncode == 0, reqs.stderr
    pins = {}
    for line in reqs.stdout.splitlines():
        match = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^;\s]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


def test_lock_pins_what_the_tests_ran_with(locked_requirements):
    for name in ("numpy", "pandas", "scikit-learn", "skops", "mlflow-skinny", "boto3", "flask"):
        assert locked_requirements[name] == version(name), name
    mismatched = {}
    for name, pinned in locked_requirements.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # platform-specific wheels of other OSes
        if installed != pinned:
            mismatched[name] = (pinned, installed)
    assert not mismatched, f"Pipfile.lock and this environment differ: {mismatched}"


def test_package_from_copied_files_installs_no_deps_and_handler_imports(tmp_path, see_these_packages):
    # The build context the Dockerfile assembles in /build, from its own COPY lines.
    build = tmp_path / "build"
    build.mkdir()
    for sources, dest in copies(DOCKERFILE):
        if not dest.startswith("/build"):
            continue
        target = build / dest.removeprefix("/build").strip("/")
        for source in sources:
            src = REPO / source
            if src.is_dir():  # COPY dir dest: the folder's contents go to dest
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:  # COPY file... dir/: into the folder
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, target / src.name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(build)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False, system_site_packages=False)
    py = fresh / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(next(wheels.glob("*.whl"))),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    # The locked third-party packages (the `pipenv install --system` layer) come from this
    # environment through a plain path line: its editable finder for the repo is not run.
    see_these_packages(py, "locked_deps.pth")
    task_root = tmp_path / "task"
    task_root.mkdir()
    shutil.copy(REPO / "docker" / "streaming" / "lambda_function.py", task_root)
    check = (
        "import json, lambda_function, ride_duration, ride_duration.stream as s;"
        "print(json.dumps({'file': ride_duration.__file__,"
        " 'same': lambda_function.lambda_handler is s.lambda_handler}))"
    )
    out = subprocess.run(
        [str(py), "-c", check],
        cwd=task_root,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["same"] is True
    assert result["file"].startswith(str(fresh)), result["file"]  # the installed copy, not the checkout


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory):
    """The Dockerfile's COPY and pip/pipenv RUN steps replayed into a fresh venv of the base image's
    Python, which sees boto3 (the lock's pin) in a folder of its own, as the base image has it."""
    if BASE_PYTHON is None:
        pytest.skip(f"no Python {base_python_version(DOCKERFILE)} (the Lambda base image's) on this machine")
    root = tmp_path_factory.mktemp("lambda-image")
    fresh, task_root, base_site = root / "venv", root / "var" / "task", root / "var" / "runtime"
    task_root.mkdir(parents=True)
    subprocess.run([str(BASE_PYTHON), "-m", "venv", str(fresh)], check=True, timeout=300)
    lock = json.loads((REPO / "Pipfile.lock").read_text())
    base_pins = [f"{name}{lock['default'][name]['version']}" for name in BASE_PACKAGES]
    subprocess.run(
        [str(fresh / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "--target", str(base_site)]
        + base_pins,
        check=True,
        timeout=600,
    )
    site = Path(
        subprocess.run(
            [str(fresh / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "lambda_runtime.pth").write_text(f"{base_site}\n")
    before = _dists(site)  # pip, which the base image has too
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIPENV_ACTIVE", "PIP_REQUIRE_VIRTUALENV")},
        "PATH": f"{fresh / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(fresh),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIPENV_VERBOSITY": "-1",
    }

    def where(path: str) -> Path:
        path = path.replace("${LAMBDA_TASK_ROOT}", "/var/task")
        return root / path.lstrip("/") if path.startswith("/") else task_root / path

    for keyword, rest in instructions(DOCKERFILE):
        if keyword == "COPY":
            *sources, dest = shlex.split(rest)
            target = where(dest)
            for source in sources:
                src = REPO / source
                if src.is_dir():
                    shutil.copytree(src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, target / src.name)
        elif keyword == "RUN":
            for step in rest.split("&&"):
                step = step.strip()
                if not step.startswith(("pip ", "pipenv ")):
                    continue  # rm: image housekeeping
                # Absolute paths in the image (/build) are under `root` here.
                step = re.sub(r"(?<=\s)(/\S+)", lambda m: str(root / m.group(1).lstrip("/")), step)
                done = subprocess.run(
                    shlex.split(step), cwd=task_root, env=env, capture_output=True, text=True, timeout=900, check=False
                )
                assert done.returncode == 0, f"RUN {step}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return {
        "python": fresh / "bin" / "python",
        "task_root": task_root,
        "env": env,
        "root": root,
        "site": site,
        "own": sorted(_dists(site) - before),
    }


def _dists(site: Path) -> set[str]:
    return {path.name for path in site.iterdir() if path.name.endswith(".dist-info")}


def _size_mb(site: Path, dists: list[str]) -> float:
    """Installed size of these distributions: the files their RECORD lists."""
    total = 0
    for dist in dists:
        for line in (site / dist / "RECORD").read_text().splitlines():
            path = site / line.split(",")[0]
            if path.is_file():
                total += path.stat().st_size
    return total / 1e6


def test_image_install_is_lean(image_venv):
    """The function's own packages, beside the base image's Python and boto3: the serving form's needs."""
    own = image_venv["own"]
    names = {re.sub(r"-[^-]+\.dist-info$", "", d).lower().replace("_", "-") for d in own}
    assert {"numpy", "pyyaml", "python-dotenv", "ride-duration-prediction"} <= names
    assert not names & {"pandas", "scikit-learn", "scipy", "mlflow-skinny", "skops", "boto3", "botocore"}
    assert _size_mb(image_venv["site"], own) <= LAMBDA_PACKAGES_MB, (own, _size_mb(image_venv["site"], own))


def test_image_install_has_the_handler_and_nothing_of_web_or_batch(image_venv):
    check = (
        "import importlib.util, json, lambda_function, ride_duration.stream as s;"
        "print(json.dumps({'file': s.__file__, 'same': lambda_function.lambda_handler is s.lambda_handler,"
        " 'absent': [m for m in ('prefect', 'papermill', 'gunicorn', 'gevent', 'flask', 'pyarrow', 's3fs',"
        " 'pipenv', 'pytest', 'moto', 'workbench', 'benchmarks', 'pandas', 'sklearn', 'mlflow', 'skops')"
        " if importlib.util.find_spec(m) is None]}))"
    )
    out = subprocess.run(
        [str(image_venv["python"]), "-c", check],
        cwd=image_venv["task_root"],
        env=image_venv["env"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["same"] is True
    assert result["file"].startswith(str(image_venv["python"].parents[1])), result["file"]
    assert result["absent"] == [
        "prefect",
        "papermill",
        "gunicorn",
        "gevent",
        "flask",
        "pyarrow",
        "s3fs",
        "pipenv",
        "pytest",
        "moto",
        "workbench",
        "benchmarks",
        "pandas",
        "sklearn",
        "mlflow",
        "skops",
    ]


def _files(*folders: Path) -> dict:
    return {path: path.stat().st_mtime_ns for folder in folders for path in folder.rglob("*")}


def _run_handler(image_venv, env: dict, event: dict) -> subprocess.CompletedProcess:
    run = (
        "import json, sys, lambda_function;"
        "response = lambda_function.lambda_handler(json.load(sys.stdin), None);"
        f"response['heavy'] = [m for m in {HEAVY!r} if m in sys.modules];"
        "print(json.dumps(response))"
    )
    return subprocess.run(
        [str(image_venv["python"]), "-c", run],
        cwd=image_venv["task_root"],
        env=env,
        input=json.dumps(event),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_image_install_loads_the_model_from_s3_and_answers_the_course_event(
    image_venv, stack, trained_model, canonical_event, tmp_path
):
    """The container's cold path: MODEL_ID + EXPERIMENT_ID (the serving form straight from S3 with
    boto3 and numpy), TEST_RUN so predictions are returned, not written; HOME=/tmp as in the image,
    and nothing written anywhere else (the installed packages and the task root are unchanged)."""
    logged = trained_model["logged"]
    home = tmp_path / "tmp"
    home.mkdir()
    env = {
        **image_venv["env"],
        **stack.env(),
        "HOME": str(home),
        "PYTHONDONTWRITEBYTECODE": "1",
        "MODEL_ID": logged.model_id,
        "EXPERIMENT_ID": str(logged.experiment_id),
        "TEST_RUN": "True",
    }
    env.pop("MODEL_URI", None)
    before = _files(image_venv["root"])
    out = _run_handler(image_venv, env, canonical_event)
    assert out.returncode == 0, out.stderr[-3000:]
    response = json.loads(out.stdout.strip().splitlines()[-1])
    (prediction,) = response["predictions"]
    assert prediction["version"] == logged.run_id
    assert prediction["prediction"]["ride_id"] == 256
    assert 1 <= prediction["prediction"]["ride_duration"] <= 60
    assert prediction["source"]["sequence_number"] == canonical_event["Records"][0]["kinesis"]["sequenceNumber"]
    assert response["heavy"] == []  # the serving form needs none of them
    assert _files(image_venv["root"]) == before


@pytest.mark.parametrize(
    "uri, sentence",
    [
        ("{folder}", "has no serving form"),
        ("models:/NYCRideDurationModel@production", "is a registry reference, which needs MLflow"),
    ],
    ids=["no-serving-form", "registry"],
)
def test_image_install_refuses_a_model_it_cannot_serve(image_venv, canonical_event, tmp_path, uri, sentence):
    """A model without the serving form (only MLmodel and the skops file) is refused at start, in one sentence."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("run_id: 0123\n")
    (folder / "model.skops").write_bytes(b"not read")
    env = {**image_venv["env"], "HOME": str(tmp_path), "MODEL_URI": uri.format(folder=folder), "TEST_RUN": "True"}
    out = _run_handler(image_venv, env, canonical_event)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ride_duration.registry.ModelNotFound: model ") and sentence in last, last
