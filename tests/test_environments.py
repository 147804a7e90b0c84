"""pyproject.toml, Pipfile (+ lock), environment.yml and constraints.txt install the same pins."""

import json
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SELF = "ride-duration-prediction"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_req(req: str) -> tuple[str, str]:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]+\])?==([^;\s]+)", req.strip())
    assert match, f"not an exact pin: {req!r}"
    return norm(match.group(1)), match.group(3)


def pyproject_pins() -> dict:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for items in project["optional-dependencies"].values():
        reqs += [r for r in items if not norm(r).startswith(SELF)]
    return dict(parse_req(r) for r in reqs)


# The Pipfile's categories: [packages] every image, then one per deployment, then dev.
CATEGORIES = ("packages", "web", "stream", "batch", "dev-packages")
LOCK_SECTIONS = ("default", "web", "stream", "batch", "develop")
# Transitive pins the Pipfile adds to [packages] (not in pyproject.toml): [packages] is locked
# alone first and pins every other category, so it must not pick a newer version than
# another category allows. They must equal constraints.txt's pins.
PIPFILE_ONLY = {"botocore", "fastapi"}


def constraints_pins() -> dict:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = parse_req(line)
            pins[name] = version
    return pins


def pipfile_pins(only_pyproject: bool = True) -> dict:
    pipfile = tomllib.loads((REPO / "Pipfile").read_text())
    assert [c for c in pipfile if c not in ("source", "requires", "pipenv")] == list(CATEGORIES)
    pins = {}
    for section in CATEGORIES:
        for name, spec in pipfile[section].items():
            if norm(name) == SELF:
                assert spec == {"file": ".", "editable": True}, "the package must be an editable dev dependency"
                continue
            version = spec if isinstance(spec, str) else spec["version"]
            assert version.startswith("=="), f"{name} is not pinned in Pipfile"
            if section == "stream":  # the Lambda's own set repeats [packages]'s pins: it installs [stream] alone
                assert pins.get(norm(name), version[2:]) == version[2:], f"{name}: [stream] and [packages] differ"
            else:
                assert norm(name) not in pins, f"{name} is in two Pipfile categories"
            if not (only_pyproject and norm(name) in PIPFILE_ONLY):
                pins[norm(name)] = version[2:]
    return pins


def test_pyproject_and_pipfile_name_the_same_pins():
    assert pyproject_pins() == pipfile_pins()


def test_pipfile_only_pins_follow_constraints():
    constraints, pins = constraints_pins(), pipfile_pins(only_pyproject=False)
    assert {n: pins[n] for n in PIPFILE_ONLY} == {n: constraints[n] for n in PIPFILE_ONLY}


def test_each_image_category_holds_its_own_packages():
    pipfile = tomllib.loads((REPO / "Pipfile").read_text())
    names = {c: {norm(n) for n in pipfile[c]} for c in CATEGORIES}
    assert {"flask", "gunicorn", "gevent"} <= names["web"]
    assert {"prefect", "papermill", "pyarrow", "s3fs"} <= names["batch"]
    heavy = {"flask", "gunicorn", "gevent", "prefect", "papermill", "pyarrow", "s3fs"}
    assert not heavy & names["packages"], "the web image installs packages + web"
    # The Lambda image installs [stream] alone: the serving form's needs, boto3 is its base image's.
    assert names["stream"] == {"numpy", "pyyaml", "python-dotenv"}


def test_pipfile_lock_agrees_with_pins_and_constraints():
    lock = json.loads((REPO / "Pipfile.lock").read_text())
    assert [s for s in lock if s != "_meta"] == sorted(LOCK_SECTIONS), "one lock section per Pipfile category"
    locked = {}
    for section in LOCK_SECTIONS:
        for name, spec in lock[section].items():
            if "version" in spec:
                version = spec["version"].removeprefix("==")
                # the sections are installed together (the dev environment): one version each
                assert locked.setdefault(norm(name), version) == version, f"{name}: two versions in the lock"
    for name, version in pipfile_pins(only_pyproject=False).items():
        assert locked.get(name) == version, f"Pipfile.lock has {name} {locked.get(name)}, pins say {version}"
    constraints = constraints_pins()
    for name, version in pyproject_pins().items():
        assert constraints.get(name) == version, f"constraints.txt has {name} {constraints.get(name)}"
    # every transitive pin both files name must agree too (same environment either way)
    differ = {n: (v, locked[n]) for n, v in constraints.items() if n in locked and locked[n] != v}
    assert not differ, f"constraints.txt and Pipfile.lock disagree: {differ}"


def test_environment_yml_installs_the_package_with_dev_extra():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps  # the course's workstation; the images run 3.12 (the Pipfile)
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "-e .[dev]" in pip and "-c constraints.txt" in pip
    # The Pipfile's Python is the images' (python:3.12-slim, public.ecr.aws/lambda/python:3.12).
    assert (REPO / "Pipfile").read_text().count('python_version = "3.12"') == 1
    for dockerfile in ("web-service", "streaming"):
        assert ":3.12" in (REPO / "docker" / dockerfile / "Dockerfile").read_text().split("\nFROM ")[1].split()[0]
