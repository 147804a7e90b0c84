"""Data fetching against a real local HTTP server (the mirror-as-URL case)."""

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pandas as pd
import pytest

from ride_duration import config, tlc
from ride_duration.config import get_settings


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on a free port serving a folder; yields (folder, url)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty data cache; the official URL points at a closed local port (no internet here)."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TLC_MIRROR", raising=False)
    monkeypatch.setattr(tlc, "BASE_URL", "http://127.0.0.1:9/trip-data")
    return tmp_path / "cache"


def _month_bytes(tmp_path) -> bytes:
    path = tlc.write_synthetic_month(tmp_path / "m.parquet", 2020, 5, n_rows=500)
    return path.read_bytes()


def test_official_url():
    assert (
        tlc.official_url("green", 2021, 1)
        == "https://d37ci6vzurychx.cloudfront.net/trip-data/green_tripdata_2021-01.parquet"
    )
    with pytest.raises(ValueError, match="month"):
        tlc.filename("green", 2021, 13)
    with pytest.raises(ValueError, match="taxi type"):
        tlc.filename("purple", 2021, 1)


def test_download_from_mirror_url_verifies_checksum(http_folder, isolated, tmp_path, monkeypatch):
    folder, url = http_folder
    payload = _month_bytes(tmp_path)
    (folder / "green_tripdata_2020-05.parquet").write_bytes(payload)
    monkeypatch.setitem(tlc.KNOWN_SHA256, "green_tripdata_2020-05.parquet", hashlib.sha256(payload).hexdigest())
    monkeypatch.setenv("TLC_MIRROR", url)
    path = tlc.fetch_month("green", 2020, 5, allow_synthetic=False, progress=False, settings=get_settings())
    assert path == isolated / "green_tripdata_2020-05.parquet"
    assert path.read_bytes() == payload
    # a second call is served from the verified cache even with the mirror gone
    (folder / "green_tripdata_2020-05.parquet").unlink()
    assert tlc.fetch_month("green", 2020, 5, allow_synthetic=False, progress=False, settings=get_settings()) == path


def test_fetch_without_progress_prints_nothing(isolated, tmp_path, monkeypatch, capfd):
    """A notebook cell that fetches a month from a mirror folder shows no stderr (pooch's own
    "Downloading data from ..." line included)."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    payload = _month_bytes(tmp_path)
    (mirror / "green_tripdata_2020-05.parquet").write_bytes(payload)
    monkeypatch.setitem(tlc.KNOWN_SHA256, "green_tripdata_2020-05.parquet", hashlib.sha256(payload).hexdigest())
    monkeypatch.setenv("TLC_MIRROR", str(mirror))
    path = tlc.fetch_month("green", 2020, 5, allow_synthetic=False, progress=False, settings=get_settings())
    assert path.read_bytes() == payload
    assert capfd.readouterr() == ("", "")


def test_checksum_mismatch_refuses_and_leaves_nothing(http_folder, isolated, tmp_path, monkeypatch):
    folder, url = http_folder
    payload = _month_bytes(tmp_path)
    (folder / "green_tripdata_2020-05.parquet").write_bytes(payload)
    monkeypatch.setitem(tlc.KNOWN_SHA256, "green_tripdata_2020-05.parquet", "0" * 64)
    monkeypatch.setenv("TLC_MIRROR", url)
    with pytest.raises(tlc.ChecksumMismatch) as excinfo:
        tlc.fetch_month("green", 2020, 5, allow_synthetic=False, progress=False, settings=get_settings())
    message = str(excinfo.value)
    assert "green_tripdata_2020-05.parquet" in message
    assert hashlib.sha256(payload).hexdigest() in message and "0" * 64 in message
    assert list(isolated.iterdir()) == []  # no partial file, no file under the final name


def test_mirror_folder_and_real_checksums(isolated, monkeypatch, real_data_dir):
    if real_data_dir is None:
        pytest.skip("TLC_MIRROR with the real files is not set")
    monkeypatch.setenv("TLC_MIRROR", str(real_data_dir))
    path = tlc.fetch_month("green", 2021, 2, allow_synthetic=False, progress=False, settings=get_settings())
    assert tlc.sha256_of(path) == tlc.KNOWN_SHA256[path.name]
    assert len(pd.read_parquet(path)) == 64_572
    zones = tlc.load_zones(get_settings())
    assert len(zones) == 265
    # pandas would read the literal "N/A" as missing without keep_default_na=False
    assert zones.set_index("LocationID").loc[265, "Zone"] == "Outside of NYC"
    assert "N/A" in zones.set_index("LocationID").loc[264, "Zone"]
    assert zones.isna().sum().sum() == 0


def test_unavailable_month_names_what_was_tried(isolated, monkeypatch, tmp_path):
    monkeypatch.setenv("TLC_MIRROR", str(tmp_path / "empty-mirror"))
    with pytest.raises(tlc.DataUnavailable) as excinfo:
        tlc.fetch_month("green", 2019, 7, allow_synthetic=False, progress=False, settings=get_settings())
    message = str(excinfo.value)
    assert str(tmp_path / "empty-mirror" / "green_tripdata_2019-07.parquet") in message
    assert "http://127.0.0.1:9/trip-data/green_tripdata_2019-07.parquet" in message


def test_synthetic_fallback_warns_and_matches_schema(isolated, real_data_dir):
    with pytest.warns(RuntimeWarning, match="SYNTHETIC"):
        path = tlc.fetch_month("green", 2019, 7, progress=False, settings=get_settings())
    assert path.name == "green_tripdata_2019-07.synthetic.parquet"
    df = pd.read_parquet(path)
    assert list(df.columns) == tlc.GREEN_COLUMNS and len(df.columns) == 20
    assert df["lpep_pickup_datetime"].dt.month.eq(7).all()
    duration = (df["lpep_dropoff_datetime"] - df["lpep_pickup_datetime"]).dt.total_seconds() / 60
    assert 0.7 < duration.between(1, 60).mean() < 1.0  # mostly kept by the course's filter
    assert df["PULocationID"].between(1, 265).all()
    if real_data_dir is not None:
        real = pd.read_parquet(real_data_dir / "green_tripdata_2021-01.parquet")
        assert dict(real.dtypes.astype(str)) == dict(df.dtypes.astype(str))


def test_fetch_month_cli_reports_failure(isolated, monkeypatch, capsys):
    monkeypatch.setenv("TLC_SYNTHETIC_FALLBACK", "0")
    assert tlc.main(["2019-07"]) == 1
    assert "green_tripdata_2019-07.parquet could not be had" in capsys.readouterr().out


def test_relative_mirror_resolves_against_repo(monkeypatch):
    root = config.repo_root()
    monkeypatch.chdir(Path("/"))
    monkeypatch.setenv("TLC_MIRROR", "ride_duration")
    assert config.get_settings().tlc_mirror == str(root / "ride_duration")


# ----------------------------------------------------------------------------- provenance
def test_synthetic_files_carry_a_marker_and_are_described_as_synthetic(tmp_path):
    """A synthetic month is recognised by its parquet footer, whatever its name or folder."""
    path = tlc.write_synthetic_month(tmp_path / "green_tripdata_2021-01.parquet", 2021, 1, n_rows=300)
    plain = tmp_path / "plain.parquet"
    pd.read_parquet(path).to_parquet(plain, index=False)  # same rows, written without the marker
    assert tlc.is_synthetic(path, get_settings()) and not tlc.is_synthetic(plain, get_settings())
    described = tlc.describe_file(path, get_settings())
    assert described == {
        "file": "green_tripdata_2021-01.parquet",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "size": path.stat().st_size,
        "rows": 300,
        "source": str(path),
        "synthetic": True,
        "verified": False,  # the official January has another checksum
    }
    assert tlc.describe_file(plain, get_settings())["synthetic"] is False
    assert (
        tlc.describe_file(plain, synthetic=True, settings=get_settings())["synthetic"] is True
    )  # a caller may say so, never hide it
    both = tlc.training_provenance(path, plain, get_settings())
    assert both["synthetic"] is True and both["train"]["synthetic"] and not both["valid"]["synthetic"]


def test_locate_month_names_its_source(http_folder, isolated, tmp_path, monkeypatch):
    folder, url = http_folder
    (folder / "green_tripdata_2020-05.parquet").write_bytes(_month_bytes(tmp_path))
    monkeypatch.setenv("TLC_MIRROR", url)
    first = tlc.locate_month("green", 2020, 5, allow_synthetic=False, progress=False, settings=get_settings())
    assert first.source == f"TLC_MIRROR {url}/green_tripdata_2020-05.parquet"
    again = tlc.locate_month("green", 2020, 5, allow_synthetic=False, progress=False, settings=get_settings())
    assert again.source == f"cache {isolated / 'green_tripdata_2020-05.parquet'}"
    assert tlc.describe_file(again, get_settings())["source"] == again.source
    # the mirror served a synthetic file: its marker says so even after the copy
    assert tlc.describe_file(again, get_settings())["synthetic"] is True

    monkeypatch.delenv("TLC_MIRROR")
    with pytest.warns(RuntimeWarning, match="SYNTHETIC"):
        fallback = tlc.locate_month("green", 2019, 7, progress=False, settings=get_settings())
    assert (fallback.source, fallback.synthetic) == ("synthetic fallback", True)
    assert tlc.describe_file(fallback, get_settings())["synthetic"] is True
    with pytest.raises(tlc.DataUnavailable) as excinfo:
        tlc.locate_month("green", 2019, 8, allow_synthetic=False, progress=False, settings=get_settings())
    [tried] = excinfo.value.tried  # what training's refusal lists
    assert tried.startswith("http://127.0.0.1:9/trip-data/green_tripdata_2019-08.parquet (")


def test_real_months_are_described_as_real_and_verified(isolated, monkeypatch, real_data_dir):
    if real_data_dir is None:
        pytest.skip("TLC_MIRROR with the real files is not set")
    monkeypatch.setenv("TLC_MIRROR", str(real_data_dir))
    january = tlc.locate_month("green", 2021, 1, allow_synthetic=False, progress=False, settings=get_settings())
    assert tlc.describe_file(january, get_settings()) == {
        "file": "green_tripdata_2021-01.parquet",
        "sha256": "b8e2c9496c5eada0f10adbd88f98d91721ec6fe2787a2b355cf0ccfa9678ee7b",
        "size": 1_333_519,
        "rows": 76_518,  # SOURCES.md
        "source": f"TLC_MIRROR {real_data_dir / 'green_tripdata_2021-01.parquet'}",
        "synthetic": False,
        "verified": True,
    }


def test_sources_inside_the_checkout_are_recorded_relative_to_it(tmp_path):
    """A model's recorded training source (and the notebooks that show it) names no machine path."""
    root = config.repo_root()
    assert config.in_checkout(root / "data" / "green_tripdata_2021-01.parquet") == "data/green_tripdata_2021-01.parquet"
    assert config.in_checkout(tmp_path / "m.parquet") == str(tmp_path / "m.parquet")
    assert config.in_checkout("https://example.org/m.parquet") == "https://example.org/m.parquet"
