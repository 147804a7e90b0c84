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


def pipfile_pins() -> dict:
    pipfile = tomllib.loads((REPO / "Pipfile").read_text())
    pins = {}
    for section in ("packages", "dev-packages"):
        for name, spec in pipfile[section].items():
            if norm(name) == SELF:
                assert spec == {"file": ".", "editable": True}, "the package must be an editable dev dependency"
                continue
            version = spec if isinstance(spec, str) else spec["version"]
            assert version.startswith("=="), f"{name} is not pinned in Pipfile"
            pins[norm(name)] = version[2:]
    return pins


def test_pyproject_and_pipfile_name_the_same_pins():
    assert pyproject_pins() == pipfile_pins()


def test_pipfile_lock_agrees_with_pins_and_constraints():
    lock = json.loads((REPO / "Pipfile.lock").read_text())
    locked = {}
    for section in ("default", "develop"):
        for name, spec in lock[section].items():
            if "version" in spec:
                locked[norm(name)] = spec["version"].removeprefix("==")
    for name, version in pyproject_pins().items():
        assert locked.get(name) == version, f"Pipfile.lock has {name} {locked.get(name)}, pins say {version}"
    constraints = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = parse_req(line)
            constraints[name] = version
    for name, version in pyproject_pins().items():
        assert constraints.get(name) == version, f"constraints.txt has {name} {constraints.get(name)}"
    # every transitive pin both files name must agree too (same environment either way)
    differ = {n: (v, locked[n]) for n, v in constraints.items() if n in locked and locked[n] != v}
    assert not differ, f"constraints.txt and Pipfile.lock disagree: {differ}"


def test_environment_yml_installs_the_package_with_dev_extra():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "-e .[dev]" in pip and "-c constraints.txt" in pip
    assert (REPO / "Pipfile").read_text().count('python_version = "3.11"') == 1
