"""NYC TLC monthly trip files: official URL, mirror, checksums, synthetic fallback.

Order of sources for a month: the verified cache, the mirror (`TLC_MIRROR`, a
folder or a URL prefix), the official CloudFront URL, each fetched by pooch (a
temporary file renamed once whole and matching the TLC's published sha256, a
progress bar while it downloads). If none answers and the
synthetic fallback is allowed (`TLC_SYNTHETIC_FALLBACK`, on by default), a
synthetic month with the same 20-column schema is written under a name that
says so, and a loud warning says results will not match the course.

Every synthetic file this module writes carries a marker in its parquet footer
(`SYNTHETIC_MARKER`), so `describe_file` can tell it from real data wherever it
is later read from: provenance is a property of the file, not of its name or of
the caller remembering it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .aws import storage_options
from .config import Settings, get_settings, in_checkout
from .features import add_duration, check_columns

# Imported inside functions, to keep them lazy: pooch (downloads, cache and checksums, with
# tqdm's progress bars), pyarrow (parquet footers; not in the web or Lambda images), fsspec
# (remote inputs only).

log = logging.getLogger(__name__)

BASE_URL = "https://d37ci6vzurychx.cloudfront.net/trip-data"
ZONES_URL = "https://d37ci6vzurychx.cloudfront.net/misc/taxi_zone_lookup.csv"
# (The 2022 course read from s3.amazonaws.com/nyc-tlc, which now answers 403.)
ZONES_FILE = "taxi_zone_lookup.csv"

# sha256 of the official files we know (shared/data/SOURCES.md).
KNOWN_SHA256 = {
    "green_tripdata_2021-01.parquet": "b8e2c9496c5eada0f10adbd88f98d91721ec6fe2787a2b355cf0ccfa9678ee7b",
    "green_tripdata_2021-02.parquet": "fd43c7afa2002716c8afadfd57665ab9c9ad99be419570a9b0a08de15cbeb64e",
    ZONES_FILE: "5e8f5ff10175d75f468c6fbdf0f68ca93e77ecd48942718d5403f8b7232e90b0",
}

GREEN_COLUMNS = [
    "VendorID",
    "lpep_pickup_datetime",
    "lpep_dropoff_datetime",
    "store_and_fwd_flag",
    "RatecodeID",
    "PULocationID",
    "DOLocationID",
    "passenger_count",
    "trip_distance",
    "fare_amount",
    "extra",
    "mta_tax",
    "tip_amount",
    "tolls_amount",
    "ehail_fee",
    "improvement_surcharge",
    "total_amount",
    "payment_type",
    "trip_type",
    "congestion_surcharge",
]

TAXI_TYPES = ("green", "yellow", "fhv", "fhvhv")

# Parquet footer key of the files write_synthetic_month writes; its value is JSON
# saying how the month was generated.
SYNTHETIC_MARKER = b"ride_duration.synthetic"
SYNTHETIC_SUFFIX = ".synthetic.parquet"


class DataUnavailable(RuntimeError):
    """No source could provide a month (and the synthetic fallback is off)."""

    def __init__(self, message: str, tried: list[str] | None = None):
        super().__init__(message)
        self.tried = tried or []


class ChecksumMismatch(RuntimeError):
    """A fetched file's sha256 is not the one the TLC published (`KNOWN_SHA256`)."""


def filename(taxi_type: str, year: int, month: int) -> str:
    if taxi_type not in TAXI_TYPES:
        raise ValueError(f"unknown taxi type {taxi_type!r}; expected one of {', '.join(TAXI_TYPES)}")
    if not 1 <= int(month) <= 12:
        raise ValueError(f"month must be 1..12, got {month!r}")
    return f"{taxi_type}_tripdata_{int(year):04d}-{int(month):02d}.parquet"


def official_url(taxi_type: str, year: int, month: int) -> str:
    return f"{BASE_URL}/{filename(taxi_type, year, month)}"


def mirror_location(mirror: str, name: str) -> str:
    return f"{mirror.rstrip('/')}/{name}" if "://" in mirror else str(Path(mirror) / name)


def sha256_of(path: Path) -> str:
    import pooch

    return pooch.file_hash(str(path), alg="sha256")


def _copy_local(url: str, output_file, pooch_instance, check_only: bool = False):
    """A pooch downloader for a mirror that is a folder (pooch's own speak http(s), ftp, sftp, doi)."""
    source = Path(url.removeprefix("file://"))
    if check_only:
        return source.is_file()
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    if hasattr(output_file, "write"):
        with open(source, "rb") as src:
            shutil.copyfileobj(src, output_file)
    else:
        shutil.copyfile(source, output_file)
    return None


def _retrieve(source: str, name: str, folder: Path, progress: bool, timeout: float) -> Path:
    """`source` (URL or local path) into `folder/name` through pooch: a temporary file renamed
    once whole and matching its known sha256 (`KNOWN_SHA256`), else ChecksumMismatch."""
    import pooch

    # pooch announces each download on stderr; our own log line says where the file came from.
    pooch.get_logger().setLevel(logging.WARNING)
    expected = KNOWN_SHA256.get(name)
    if "://" not in source or source.startswith("file://"):
        downloader = _copy_local
    else:
        # Plain text bar (tqdm's, not the notebook widget): it reads the same in a terminal,
        # in Jupyter and in a notebook rendered on GitHub.
        downloader = pooch.HTTPDownloader(
            progressbar=progress, timeout=timeout, headers={"User-Agent": "ride-duration-course"}
        )
    try:
        fetched = pooch.retrieve(
            source,
            known_hash=f"sha256:{expected}" if expected else None,
            fname=name,
            path=folder,
            downloader=downloader,
        )
    except ValueError as exc:
        if expected is None or expected not in str(exc):
            raise
        got = re.search(r"got ([0-9a-f]{64})", str(exc))  # pooch names the hash it computed
        raise ChecksumMismatch(
            f"{name} from {source}: sha256 {got.group(1) if got else '(another)'} does not match "
            f"the known {expected}; file refused"
        ) from None
    return Path(fetched)


@dataclass(frozen=True)
class MonthFile:
    """A monthly file and where it came from: `cache <path>`, `TLC_MIRROR <location>`,
    `official URL <url>` or `synthetic fallback`."""

    path: Path
    source: str

    @property
    def synthetic(self) -> bool:
        return self.source == SYNTHETIC_SOURCE


SYNTHETIC_SOURCE = "synthetic fallback"


def _fetch(
    name: str, official: str, settings: Settings, progress: bool, timeout: float
) -> tuple[MonthFile | None, list[str]]:
    target = settings.data_dir / name
    expected = KNOWN_SHA256.get(name)
    if target.is_file():
        actual = sha256_of(target) if expected else None
        if actual == expected:
            return MonthFile(target, f"cache {in_checkout(target)}"), []
        log.warning(
            "%s: sha256 %s of the cached file does not match the known %s; fetching it again", name, actual, expected
        )
        target.unlink()
    sources = []
    if settings.tlc_mirror:
        sources.append(("TLC_MIRROR", mirror_location(settings.tlc_mirror, name)))
    sources.append(("official URL", official))
    tried = []
    for kind, source in sources:
        try:
            path = _retrieve(source, name, settings.data_dir, progress, timeout)
            log.info("fetched %s from %s", name, source)
            return MonthFile(path, f"{kind} {in_checkout(source)}"), tried
        except (OSError, ValueError) as exc:  # requests' errors are OSErrors; a hash mismatch is not
            tried.append(f"{source} ({exc})")
    return None, tried


def locate_month(
    taxi_type: str,
    year: int,
    month: int,
    *,
    settings: Settings,
    allow_synthetic: bool | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> MonthFile:
    """`fetch_month`, also saying where the file came from (training records it)."""
    name = filename(taxi_type, year, month)
    found, tried = _fetch(name, official_url(taxi_type, year, month), settings, progress, timeout)
    if found is not None:
        return found
    allow = settings.synthetic_fallback if allow_synthetic is None else allow_synthetic
    if not allow or taxi_type != "green":
        raise DataUnavailable(
            f"{name} could not be had; tried: "
            + "; ".join(tried)
            + ". Set TLC_MIRROR to a folder or URL prefix holding the file.",
            tried,
        )
    synthetic = settings.data_dir / name.replace(".parquet", SYNTHETIC_SUFFIX)
    message = (
        f"\n{'!' * 78}\n!! {name} is not available (tried: {'; '.join(tried)}).\n"
        f"!! Using a SYNTHETIC month with the same schema instead: {synthetic}\n"
        f"!! Results (RMSE, predictions) will NOT match the course's figures.\n{'!' * 78}"
    )
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.warning(message)
    if not synthetic.is_file() or not is_synthetic(synthetic, settings):  # (re)write files from before the marker
        write_synthetic_month(synthetic, year, month)
    return MonthFile(synthetic, SYNTHETIC_SOURCE)


def fetch_month(
    taxi_type: str,
    year: int,
    month: int,
    *,
    settings: Settings,
    allow_synthetic: bool | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Local path of a verified monthly file; downloads or synthesises it if needed."""
    return locate_month(
        taxi_type, year, month, settings=settings, allow_synthetic=allow_synthetic, progress=progress, timeout=timeout
    ).path


def fetch_zones(settings: Settings, progress: bool = False, timeout: float = 30.0) -> Path:
    found, tried = _fetch(ZONES_FILE, ZONES_URL, settings, progress, timeout)
    if found is None:
        raise DataUnavailable(f"{ZONES_FILE} could not be had; tried: " + "; ".join(tried), tried)
    return found.path


def load_zones(settings: Settings) -> pd.DataFrame:
    """The zone lookup. `keep_default_na=False`: zones 264/265 contain a literal `N/A`
    that pandas would otherwise turn into a missing value."""
    return pd.read_csv(fetch_zones(settings), keep_default_na=False)


def synthetic_month(year: int, month: int, n_rows: int = 60_000, seed: int = 42) -> pd.DataFrame:
    """A month of green-taxi-like trips: same 20 columns and dtypes as the TLC files.

    Distributions are rough but realistic: a few busy zones dominate, distance is
    log-normal, duration grows with distance at city speeds plus noise.
    """
    rng = np.random.default_rng(seed + year * 12 + month)
    start = pd.Timestamp(year=year, month=month, day=1)
    seconds_in_month = int(((start + pd.offsets.MonthBegin(1)) - start).total_seconds())
    pickup = start + pd.to_timedelta(rng.integers(0, seconds_in_month, n_rows), unit="s")
    zones = np.arange(1, 266)
    weights = rng.pareto(1.2, zones.size) + 0.05
    weights /= weights.sum()
    pu = rng.choice(zones, n_rows, p=weights)
    do = np.where(rng.random(n_rows) < 0.3, pu, rng.choice(zones, n_rows, p=weights))
    distance = np.round(rng.lognormal(mean=0.8, sigma=0.8, size=n_rows), 2)
    speed_mph = rng.normal(12, 3, n_rows).clip(4, 30)
    minutes = distance / speed_mph * 60 + rng.exponential(3, n_rows)
    minutes = np.where(rng.random(n_rows) < 0.03, rng.uniform(0, 200, n_rows), minutes)
    dropoff = pickup + pd.to_timedelta(np.round(minutes * 60), unit="s")
    fare = np.round(2.5 + distance * 2.5 + minutes * 0.5, 2)
    tip = np.round(np.where(rng.random(n_rows) < 0.4, fare * 0.2, 0.0), 2)
    df = pd.DataFrame(
        {
            "VendorID": rng.choice([1, 2], n_rows, p=[0.2, 0.8]).astype("int64"),
            "lpep_pickup_datetime": pickup.astype("datetime64[us]"),
            "lpep_dropoff_datetime": dropoff.astype("datetime64[us]"),
            "store_and_fwd_flag": rng.choice(["N", "Y"], n_rows, p=[0.99, 0.01]).astype(object),
            "RatecodeID": np.ones(n_rows),
            "PULocationID": pu.astype("int64"),
            "DOLocationID": do.astype("int64"),
            "passenger_count": rng.choice([1.0, 2.0, 3.0, 5.0], n_rows, p=[0.8, 0.1, 0.05, 0.05]),
            "trip_distance": distance,
            "fare_amount": fare,
            "extra": np.full(n_rows, 0.5),
            "mta_tax": np.full(n_rows, 0.5),
            "tip_amount": tip,
            "tolls_amount": np.zeros(n_rows),
            "ehail_fee": pd.Series([None] * n_rows, dtype=object),
            "improvement_surcharge": np.full(n_rows, 0.3),
            "total_amount": np.round(fare + tip + 1.3, 2),
            "payment_type": rng.choice([1.0, 2.0], n_rows, p=[0.6, 0.4]),
            "trip_type": np.ones(n_rows),
            "congestion_surcharge": np.zeros(n_rows),
        }
    )
    return df[GREEN_COLUMNS]


def write_synthetic_month(path: Path, year: int, month: int, n_rows: int = 60_000, seed: int = 42) -> Path:
    """Write a synthetic month, marked as such in its parquet footer (`SYNTHETIC_MARKER`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    table = pa.Table.from_pandas(synthetic_month(year, month, n_rows=n_rows, seed=seed), preserve_index=False)
    marker = {
        "generator": "ride_duration.tlc.synthetic_month",
        "year": int(year),
        "month": int(month),
        "n_rows": int(n_rows),
        "seed": int(seed),
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), SYNTHETIC_MARKER: json.dumps(marker)})
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- provenance
def _open(path: str, settings: Settings):
    """A binary file object for a local path, file://, http(s):// or s3:// location."""
    if "://" not in path or path.startswith("file://"):
        return open(path.removeprefix("file://"), "rb")
    import fsspec  # lazy: only for remote inputs

    return fsspec.open(path, "rb", **(storage_options(path, settings) or {})).open()


def _parquet_facts(path: str, settings: Settings) -> tuple[str, int, int, bool]:
    """(sha256, size in bytes, rows, marked synthetic) of a parquet file, read once."""
    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    buffer = io.BytesIO()
    with _open(path, settings) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            buffer.write(chunk)
    buffer.seek(0)
    meta = pq.ParquetFile(buffer).metadata
    marked = SYNTHETIC_MARKER in (meta.metadata or {})
    return digest.hexdigest(), buffer.getbuffer().nbytes, meta.num_rows, marked


def is_synthetic(path, settings: Settings) -> bool:
    """True for a file written by `write_synthetic_month` (its footer marker), or
    an older synthetic fallback file (its name)."""
    import pyarrow.parquet as pq

    path = str(path)
    if path.endswith(SYNTHETIC_SUFFIX):
        return True
    with _open(path, settings) as f:
        return SYNTHETIC_MARKER in (pq.ParquetFile(f).metadata.metadata or {})


def describe_file(file, settings: Settings, source: str | None = None, synthetic: bool | None = None) -> dict:
    """Provenance of one data file: name, sha256, size, rows, source, real or synthetic.

    `file` is a path/URL or a `MonthFile` (which knows its source). `synthetic=None`
    detects it (`is_synthetic`); a caller may only make it True, never hide a marker.
    """
    if isinstance(file, MonthFile):
        source = source or file.source
        file = file.path
    location = str(file)
    sha256, size, rows, marked = _parquet_facts(location, settings)
    name = location.rstrip("/").rsplit("/", 1)[-1]
    if source is None:
        cached = "://" not in location and Path(location).resolve().parent == settings.data_dir.resolve()
        source = "data cache" if cached else location  # no machine path in what the model records
    known = KNOWN_SHA256.get(name)
    return {
        "file": name,
        "sha256": sha256,
        "size": size,
        "rows": rows,
        "source": source,
        "synthetic": bool(synthetic) or marked or location.endswith(SYNTHETIC_SUFFIX) or source == SYNTHETIC_SOURCE,
        # Matches the TLC's published checksum: True/False for the files we know one of, else None.
        "verified": None if known is None else sha256 == known,
    }


def training_provenance(train_file, valid_file, settings: Settings, synthetic: bool | None = None) -> dict:
    """What a model was trained and validated on, in the shape MLflow records
    (`metadata["training_data"]` of the logged model): `{"synthetic": bool,
    "train": describe_file(...), "valid": describe_file(...)}`."""
    train = describe_file(train_file, settings, synthetic=synthetic)
    valid = describe_file(valid_file, settings, synthetic=synthetic)
    return {"synthetic": train["synthetic"] or valid["synthetic"], "train": train, "valid": valid}


def read_parquet(path, settings: Settings, columns=None) -> pd.DataFrame:
    """Read parquet from a local path, an http(s):// URL or an s3:// URL."""
    path = str(path)
    return pd.read_parquet(path, columns=columns, storage_options=storage_options(path, settings))


def load_training_dataframe(
    path, settings: Settings, y_min: float = 1, y_max: float = 60, columns=None
) -> pd.DataFrame:
    """A green-taxi month with the target `duration` in minutes, filtered to [y_min, y_max]."""
    df = read_parquet(path, settings, columns=columns)
    check_columns(df, source=str(path))
    return add_duration(df, y_min=y_min, y_max=y_max)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fetch NYC TLC monthly files into the data cache.")
    parser.add_argument("months", nargs="*", default=["2021-01", "2021-02"], help="YYYY-MM (default: 2021-01 2021-02)")
    parser.add_argument("--taxi-type", default="green")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = get_settings()
    try:
        for value in args.months:
            year, month = (int(x) for x in value.split("-"))
            print(fetch_month(args.taxi_type, year, month, settings=settings))
        print(fetch_zones(settings))
    except (DataUnavailable, ChecksumMismatch, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    return 0


def describe_training_data(training_data: dict | None) -> str:
    """One line per file, for people: name, real/synthetic, rows, sha256 prefix, source."""
    if not training_data:
        return "training data: not recorded (the model was logged before provenance was recorded)"
    lines = []
    for part, label in (("train", "trained on"), ("valid", "validated on")):
        f = training_data[part]
        kind = "SYNTHETIC" if f["synthetic"] else "real"
        lines.append(
            f"{label:12s} {f['file']} ({kind}, {f['rows']:,} rows, sha256 {f['sha256'][:12]}, from {f['source']})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
