"""docker/web-service/Dockerfile checked without a Docker engine.

We parse it, check that every COPY source exists in the build context (the repo
root) and is not excluded by its .dockerignore, that CMD, EXPOSE, HEALTHCHECK
and gunicorn.conf.py agree, and then replay its pip/pipenv steps into a fresh
virtualenv outside the repo (`pipenv install --categories "packages web"`: no
[batch] packages) and start the image's CMD from that venv.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from ride_duration.config import WEB_PORT
from ride_duration.web.server import APP_SPEC
from workbench.images import image_python
from workbench.stack import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker/web-service/Dockerfile"
IGNORE = REPO / "docker/web-service/Dockerfile.dockerignore"


def parse_dockerfile(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and continuations joined."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
    )
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


INSTRUCTIONS = parse_dockerfile()


def args_of(name: str) -> list[str]:
    return [rest for word, rest in INSTRUCTIONS if word == name]


def exec_form(rest: str) -> list[str]:
    return json.loads(rest)


def copy_sources() -> list[tuple[list[str], str]]:
    out = []
    for rest in args_of("COPY"):
        parts = exec_form(rest) if rest.startswith("[") else shlex.split(rest)
        assert not any(p.startswith("--from") for p in parts)
        out.append((parts[:-1], parts[-1]))
    return out


def ignored(name: str) -> bool:
    patterns = [ln.strip() for ln in IGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name, p.removeprefix("**/")) for p in patterns)


def test_base_user_port_and_healthcheck():
    # the Pipfile's Python, so the lock installs as it was resolved
    version = re.search(r'python_version = "([\d.]+)"', (REPO / "Pipfile").read_text()).group(1)
    assert args_of("FROM") == [f"python:{version}-slim"]
    users = args_of("USER")
    assert users and users[-1] not in ("root", "0")
    assert args_of("EXPOSE") == [str(WEB_PORT)]
    health = args_of("HEALTHCHECK")[0]
    command = exec_form(health[health.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"] and "curl" not in health
    compile(command[2], "healthcheck", "exec")  # valid Python
    # The port gunicorn listens on, from the one function gunicorn.conf.py also reads WEB_BIND with.
    assert "from ride_duration.config import web_bind" in command[2] and "9696" not in command[2]


def test_copy_sources_exist_in_the_context_and_are_not_ignored():
    sources = [src for srcs, _ in copy_sources() for src in srcs]
    assert {"Pipfile", "Pipfile.lock", "pyproject.toml", "ride_duration", "gunicorn.conf.py"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the build context"
        assert not ignored(src), f"COPY {src}: excluded by {IGNORE.name}"
    for big in (".venv", ".local", "data", ".git", "tests", "notebooks", ".env"):
        assert ignored(big), f"{big} should not be sent to the Docker daemon"


def test_installs_the_lock_the_course_way():
    runs = " && ".join(args_of("RUN"))
    assert re.search(r"pip install pipenv==[\d.]+", runs)
    assert 'pipenv install --system --deploy --categories "packages web"' in runs and "--dev" not in runs
    assert "pip install --no-deps /build" in runs
    lock = json.loads((REPO / "Pipfile.lock").read_text())
    for needed in ("scikit-learn", "skops", "mlflow-skinny", "boto3"):
        assert needed in lock["default"], f"{needed} must be in the lock's [packages] to be in the image"
    for needed in ("flask", "gunicorn", "gevent"):
        assert needed in lock["web"], f"{needed} must be in the lock's [web] category to be in the image"


def test_cmd_matches_the_gunicorn_config():
    cmd = exec_form(args_of("CMD")[-1])
    assert cmd[0] == "gunicorn" and cmd[-1] == APP_SPEC
    config_name = cmd[cmd.index("-c") + 1]
    workdir = args_of("WORKDIR")[-1]
    assert any(config_name in srcs and dst in ("./", ".", workdir, workdir + "/") for srcs, dst in copy_sources())
    assert not any(arg.startswith(("--bind", "-b")) for arg in cmd), "gunicorn.conf.py alone decides the address"
    config = runpy.run_path(str(REPO / config_name))
    assert config["wsgi_app"] == APP_SPEC
    assert config["bind"] == f"0.0.0.0:{WEB_PORT}"  # WEB_BIND's default; EXPOSE and HEALTHCHECK name that port
    assert config["preload_app"] is True and config["worker_class"] == "gevent"


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory):
    """Replay the Dockerfile's WORKDIR/COPY/pip steps into a fresh venv of the image's Python."""
    if os.environ.get("WEB_SKIP_INSTALL_TEST"):
        pytest.skip("WEB_SKIP_INSTALL_TEST is set")
    python = image_python(DOCKERFILE)
    if python is None:
        pytest.skip(f"no Python of the image's base ({args_of('FROM')[0]}) on this machine")
    root = tmp_path_factory.mktemp("image")
    venv, workdir = root / "venv", root / "app"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(venv),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIPENV_VERBOSITY": "-1",
        # The replay checks what installs, imports and serves; bytecode (compiled by pip on one core, most
        # of the install's time) would be thrown away with the venv. The image compiles it as pip does.
        "PIP_COMPILE": "0",
    }
    for var in ("PYTHONPATH", "PIPENV_ACTIVE", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(var, None)

    # The image's paths, moved under `root`.
    def where(path: str) -> Path:
        return workdir / path if not path.startswith("/") else root / path.lstrip("/")

    for word, rest in INSTRUCTIONS:
        if word == "WORKDIR":
            workdir = root / rest.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            *sources, dst = shlex.split(rest)
            target = where(dst)
            target.mkdir(parents=True, exist_ok=True)
            for src in sources:
                # Docker semantics: a directory's *contents* go to the destination.
                if (REPO / src).is_dir():
                    shutil.copytree(
                        REPO / src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy2(REPO / src, target / Path(src).name)
        elif word == "RUN":
            for step in rest.split("&&"):
                step = step.strip()
                if not step.startswith(("pip ", "pipenv ")):
                    continue  # rm, useradd: image housekeeping, not run on this machine
                # Absolute paths in the image (/build) are under `root` here.
                step = re.sub(r"(?<=\s)(/\S+)", lambda m: str(root / m.group(1).lstrip("/")), step)
                done = subprocess.run(
                    shlex.split(step), cwd=workdir, env=env, capture_output=True, text=True, check=False
                )
                assert done.returncode == 0, f"RUN {step} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return {"venv": venv, "workdir": workdir, "env": env}


def test_image_install_imports_the_entrypoint(image_venv):
    python = image_venv["venv"] / "bin/python"
    check = (
        "import ride_duration, ride_duration.web, gunicorn, gevent, flask, sklearn, skops; "
        "print(ride_duration.__file__)"
    )
    done = subprocess.run(
        [str(python), "-c", check],
        cwd=image_venv["workdir"],
        env=image_venv["env"],
        capture_output=True,
        text=True,
        check=False,
    )
    # "No module named 'ride_duration.web'": pyproject.toml must ship the subpackages
    # ([tool.setuptools.packages.find] include = ["ride_duration", "ride_duration.*"]).
    assert done.returncode == 0, done.stderr
    assert str(image_venv["venv"]) in done.stdout  # the installed copy, not the checkout
    pip = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        env=image_venv["env"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {p["name"].lower() for p in json.loads(pip.stdout)}
    assert "pytest" not in installed and "moto" not in installed  # no dev packages in the image
    # nor the [batch] category: the web image installs "packages web" only
    assert not {"prefect", "papermill", "pyarrow", "s3fs"} & installed, installed
    for module in ("prefect", "workbench", "benchmarks"):  # nor the local stand-ins or the benchmarks
        absent = subprocess.run(
            [str(python), "-c", f"import {module}"],
            cwd=image_venv["workdir"],
            env=image_venv["env"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert f"No module named '{module}'" in absent.stderr


def test_image_cmd_serves_and_healthcheck_passes(image_venv, stack, trained_model):
    """The image's CMD, run from the image venv in its WORKDIR, serves the registry model."""
    port = free_port()
    cmd = exec_form(args_of("CMD")[-1])
    cmd[0] = str(image_venv["venv"] / "bin" / cmd[0])
    env = {**image_venv["env"], **stack.env(), "WEB_BIND": f"127.0.0.1:{port}"}
    proc = subprocess.Popen(
        cmd, cwd=image_venv["workdir"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        health = exec_form(args_of("HEALTHCHECK")[0].split("CMD", 1)[1].strip())
        deadline, code = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            code = subprocess.run(
                [str(image_venv["venv"] / "bin/python"), *health[1:]], env=env, capture_output=True, check=False
            ).returncode
            if code == 0:
                break
            time.sleep(0.5)
        if code != 0:
            proc.terminate()
            pytest.fail(f"HEALTHCHECK never passed; gunicorn said:\n{proc.communicate(timeout=30)[0][-3000:]}")
        answer = requests.post(
            f"http://127.0.0.1:{port}/predict",
            json={"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66},
            timeout=10,
        ).json()
        assert answer["model_version"] == trained_model["logged"].run_id
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "Using worker: gevent" in output, output[-2000:]
    assert f"Listening at: http://127.0.0.1:{port}" in output, output[-2000:]
