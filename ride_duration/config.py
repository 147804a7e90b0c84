"""The one place that reads settings.

Every setting comes from the environment, optionally seeded from a `.env` file
(python-dotenv, which never overrides variables that are already set). Names
follow AWS and MLflow conventions where one exists (`AWS_ENDPOINT_URL`,
`MLFLOW_TRACKING_URI`, `MLFLOW_S3_ENDPOINT_URL`), so the same code talks to the
local stack or to AWS depending only on what is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dotenv import load_dotenv

PACKAGE_DIR = Path(__file__).resolve().parent

# Course vocabulary (COURSE_OUTLINE.md); defaults, each overridable by env.
EXPERIMENT_NAME = "nyc-taxi-experiment"
MODEL_NAME = "NYCRideDurationModel"
MODEL_ALIAS = "production"
MLFLOW_BUCKET = "mlflow-models-ride-duration"
PREDICTIONS_BUCKET = "nyc-duration-prediction"
INPUT_STREAM = "ride_events"
PREDICTIONS_STREAM = "ride_predictions"

# Ports of the local stack (conventional; see README).
AWS_PORT = 4566  # moto: Kinesis and every AWS API but S3 (LocalStack's edge port)
S3_PORT = 4572  # SeaweedFS's S3 gateway (LocalStack's historic S3 port)
MLFLOW_PORT = 5000
PREFECT_PORT = 4200
WEB_PORT = 9696
# The web service's address: WEB_BIND, read by gunicorn.conf.py only (make serve,
# `python -m ride_duration.web serve` and the image all start gunicorn with it).
WEB_BIND = f"0.0.0.0:{WEB_PORT}"
WEB_BODY_TIMEOUT = 10.0  # seconds for a request body to arrive (WEB_BODY_TIMEOUT): 128 KiB at 13 KB/s


def repo_root() -> Path | None:
    """The source checkout this package lives in, or None for an installed wheel."""
    candidate = PACKAGE_DIR.parent
    if (candidate / "pyproject.toml").is_file() and (candidate / "ride_duration").is_dir():
        return candidate
    return None


def in_checkout(location) -> str:
    """A path inside the source checkout relative to it (what the model records, logs and notebooks show
    should not name the machine it ran on); anything else as given."""
    root = repo_root()
    if root is not None and "://" not in str(location):
        path = Path(location).resolve()
        if path.is_relative_to(root):
            return str(path.relative_to(root))
    return str(location)


def _default_home() -> Path:
    # Inside a checkout everything local lives beside the code (ignored by git);
    # an installed wheel uses the user's cache instead of site-packages.
    root = repo_root()
    if root is not None:
        return root
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ride-duration"


def _flag(value: str | None, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _resolve_path(value: str) -> str:
    """Make a relative local path absolute (against the cwd, else the repo root),
    so notebooks that run from `notebooks/` see the same folder as `make`."""
    if "://" in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if path.exists():
        return str(path.resolve())
    root = repo_root()
    if root is not None and (root / path).exists():
        return str((root / path).resolve())
    return str(path.resolve())


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    local_dir: Path
    tlc_mirror: str | None
    synthetic_fallback: bool
    aws_endpoint_url: str | None
    aws_region: str
    mlflow_tracking_uri: str
    mlflow_s3_endpoint_url: str | None
    mlflow_bucket: str
    predictions_bucket: str
    experiment_name: str
    model_name: str
    model_alias: str
    model_uri: str | None
    model_id: str | None
    experiment_id: str | None
    input_stream: str
    predictions_stream: str
    test_run: bool
    # Batch scoring reads `<prefix>/<taxi>_tripdata_<YYYY>-<MM>.parquet` (s3://, URL or folder) when set.
    batch_input_prefix: str | None = None
    # Where the stream function writes records it can never score (see `dead_letter_prefix`).
    dead_letter_uri: str | None = None

    @property
    def registry_uri(self) -> str:
        return f"models:/{self.model_name}@{self.model_alias}"

    @property
    def dead_letter_prefix(self) -> str:
        """`s3://bucket/prefix/` for the stream's dead letters: DEAD_LETTER_URI, else
        `s3://<PREDICTIONS_BUCKET>/dead-letter/<INPUT_STREAM_NAME>/` (what the IAM policy allows)."""
        uri = self.dead_letter_uri or f"s3://{self.predictions_bucket}/dead-letter/{self.input_stream}/"
        return uri if uri.endswith("/") else uri + "/"


def load_env_file(path: str | os.PathLike | None = None) -> None:
    """Load `.env` (from the cwd or the repo root) without overriding the environment."""
    if path is not None:
        load_dotenv(path, override=False)
        return
    for candidate in (Path.cwd() / ".env", (repo_root() or Path.cwd()) / ".env"):
        if candidate.is_file():
            load_dotenv(candidate, override=False)
            return


def web_bind() -> str:
    """Where the web service listens: WEB_BIND (`host:port`, `.env` too), default 0.0.0.0:9696."""
    load_env_file()
    return os.environ.get("WEB_BIND") or WEB_BIND


def web_body_timeout() -> float:
    """Seconds a request body may take to arrive before the service answers 408 (WEB_BODY_TIMEOUT)."""
    load_env_file()
    return float(os.environ.get("WEB_BODY_TIMEOUT") or WEB_BODY_TIMEOUT)


def get_settings() -> Settings:
    """Read the settings now (not at import), so tests and notebooks can change env."""
    load_env_file()
    env = os.environ.get
    home = _default_home()
    mirror = env("TLC_MIRROR") or None
    endpoint = env("AWS_ENDPOINT_URL") or None
    return Settings(
        data_dir=Path(_resolve_path(env("DATA_DIR") or str(home / "data"))),
        local_dir=Path(_resolve_path(env("LOCAL_DIR") or str(home / ".local"))),
        tlc_mirror=_resolve_path(mirror) if mirror else None,
        synthetic_fallback=_flag(env("TLC_SYNTHETIC_FALLBACK"), default=True),
        aws_endpoint_url=endpoint,
        aws_region=env("AWS_DEFAULT_REGION") or env("AWS_REGION") or "eu-west-1",
        mlflow_tracking_uri=env("MLFLOW_TRACKING_URI") or f"http://127.0.0.1:{MLFLOW_PORT}",
        mlflow_s3_endpoint_url=env("MLFLOW_S3_ENDPOINT_URL") or env("AWS_ENDPOINT_URL_S3") or endpoint,
        mlflow_bucket=env("MLFLOW_BUCKET") or MLFLOW_BUCKET,
        predictions_bucket=env("PREDICTIONS_BUCKET") or PREDICTIONS_BUCKET,
        experiment_name=env("EXPERIMENT_NAME") or EXPERIMENT_NAME,
        model_name=env("MODEL_NAME") or MODEL_NAME,
        model_alias=env("MODEL_ALIAS") or MODEL_ALIAS,
        model_uri=env("MODEL_URI") or None,
        model_id=env("MODEL_ID") or None,
        experiment_id=env("EXPERIMENT_ID") or None,
        input_stream=env("INPUT_STREAM_NAME") or INPUT_STREAM,
        predictions_stream=env("PREDICTIONS_STREAM_NAME") or PREDICTIONS_STREAM,
        test_run=_flag(env("TEST_RUN")),
        batch_input_prefix=_resolve_path(env("BATCH_INPUT_PREFIX")) if env("BATCH_INPUT_PREFIX") else None,
        dead_letter_uri=env("DEAD_LETTER_URI") or None,
    )
