"""Installed size of each image's dependency set, replayed from the one Pipfile.lock.

For each set: `pipenv requirements --categories ...` (what `pipenv install --deploy
--categories ...` installs from the lock) piped into `pip install -r` in a fresh venv
created without pip, then the package itself with --no-deps (the images' second step),
and the size of that venv's site-packages. "before" replays what every image installed
until the Pipfile had categories: all of them together (the old [packages] list).

    python -m benchmarks.images          (make bench-images; ~5 min on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.figures import record
from workbench.images import base_python_version, image_python

REPO = Path(__file__).resolve().parents[1]
BASELINE_MB = 1035  # the former [packages] set (with onnxruntime, skl2onnx), same replay
TARGET = 0.5  # the Lambda image's install: at most half of the baseline

LAMBDA_LIMIT_MB = 150  # the function's own packages (boto3 is the Lambda base image's)
# The images' Python (python:3.12-slim, public.ecr.aws/lambda/python:3.12): wheels differ per version.
DOCKERFILES = [REPO / "docker" / name / "Dockerfile" for name in ("web-service", "streaming")]

SETS = {
    "web": "packages web",  # docker/web-service/Dockerfile
    "lambda": "stream",  # docker/streaming/Dockerfile: the serving form's needs only
    "lambda-before": "packages stream",  # the Lambda image when it loaded any model (scikit-learn, MLflow)
    "batch": "packages batch",  # the Prefect flows
    "before": "packages web stream batch",  # one [packages] list for every image
}


def size_mb(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total / 1e6


def requirements(categories: str) -> str:
    env = {**os.environ, "PIPENV_VERBOSITY": "-1", "PIPENV_IGNORE_VIRTUALENVS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pipenv", "requirements", "--categories", categories],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def images_python() -> tuple[str, Path]:
    """The Python both images run and an interpreter of it here, else this one."""
    (version,) = {base_python_version(dockerfile) for dockerfile in DOCKERFILES}
    return version, image_python(DOCKERFILES[0]) or Path(sys.executable)


def replay(categories: str, work: Path, python: Path) -> dict:
    """A fresh venv of `python` (no pip in it) holding only this set: its site-packages size."""
    target = work / categories.replace(" ", "-")
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(target)], check=True)
    python = target / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    empty = size_mb(site)
    reqs = work / f"{target.name}.txt"
    reqs.write_text(requirements(categories))
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check"]
    start = time.monotonic()
    subprocess.run([*pip, "-r", str(reqs)], check=True)
    subprocess.run([*pip, "--no-deps", str(REPO)], check=True, capture_output=True)
    count = len([p for p in site.glob("*.dist-info")])
    return {"mb": size_mb(site) - empty, "dists": count, "seconds": time.monotonic() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    args = parser.parse_args(argv)
    image_version, python = images_python()
    version = subprocess.run([str(python), "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    print(f"python {version} (the images' {image_version}), Pipfile.lock replayed per image (site-packages, MB)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        for name in args.sets:
            results[name] = replay(SETS[name], Path(tmp), python)
            r = results[name]
            print(f"  replayed {name:<7} {r['mb']:7.0f} MB  {r['dists']:3d} distributions  ({r['seconds']:.0f} s)")
    before = results.get("before")
    print()
    print(f"{'image':<8} {'categories':<28} {'MB':>6} {'vs before':>10} {'vs 1,035 MB':>12}")
    for name, r in results.items():
        vs_before = f"{r['mb'] / before['mb']:.0%}" if before else "-"
        print(f"{name:<8} {SETS[name]:<28} {r['mb']:6.0f} {vs_before:>10} {r['mb'] / BASELINE_MB:>12.0%}")
    lam = results.get("lambda")
    if lam:
        limit = TARGET * BASELINE_MB
        verdict = "meets" if lam["mb"] <= limit else "MISSES"
        print(
            f"\nLambda image: {lam['mb']:.0f} MB = {lam['mb'] / BASELINE_MB:.1%} of the {BASELINE_MB:,} MB the image had on Python 3.11; "
            f"target <= {TARGET:.0%} ({limit:.0f} MB): {verdict} it; own packages <= {LAMBDA_LIMIT_MB} MB: "
            f"{'meets' if lam['mb'] <= LAMBDA_LIMIT_MB else 'MISSES'} it"
        )
        figures = {"python": version, **{f"{name}_mb": round(r["mb"]) for name, r in results.items()}}
        if "lambda-before" in results:
            figures["lambda_vs_before"] = round(lam["mb"] / results["lambda-before"]["mb"], 3)
        record("images", figures)
        return 0 if lam["mb"] <= min(limit, LAMBDA_LIMIT_MB) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
