import math

import numpy as np
import pandas as pd
import pytest

from ride_duration.config import get_settings
from ride_duration.features import add_duration, prepare_features
from ride_duration.predict import make_prediction
from ride_duration.tlc import load_training_dataframe

EXAMPLE = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}


def _trips(minutes):
    pickup = pd.Timestamp("2021-01-01 10:00")
    return pd.DataFrame(
        {
            "lpep_pickup_datetime": [pickup] * len(minutes),
            "lpep_dropoff_datetime": [pickup + pd.Timedelta(minutes=m) for m in minutes],
            "PULocationID": [1] * len(minutes),
            "DOLocationID": [2] * len(minutes),
            "trip_distance": [1.0] * len(minutes),
        }
    )


def test_duration_filter_keeps_both_bounds(tmp_path):
    minutes = [0.99, 1.0, 30, 60.0, 60.01, -5]
    path = tmp_path / "trips.parquet"
    _trips(minutes).to_parquet(path)
    df = load_training_dataframe(path, get_settings())
    assert df["duration"].tolist() == pytest.approx([1.0, 30.0, 60.0])


def test_duration_filter_custom_bounds():
    df = add_duration(_trips([5, 10, 15]), y_min=6, y_max=15)
    assert df["duration"].tolist() == pytest.approx([10.0, 15.0])


def test_load_training_dataframe_names_missing_column(tmp_path):
    path = tmp_path / "bad.parquet"
    _trips([5]).drop(columns=["trip_distance"]).to_parquet(path)
    with pytest.raises(ValueError, match="trip_distance"):
        load_training_dataframe(path, get_settings())


def test_features_from_dicts_and_dataframe_agree():
    rides = [EXAMPLE, {"PULocationID": 1, "DOLocationID": 265, "trip_distance": 0}]
    expected = [{"PU_DO": "130_205", "trip_distance": 3.66}, {"PU_DO": "1_265", "trip_distance": 0.0}]
    assert prepare_features(rides) == expected
    assert prepare_features(pd.DataFrame(rides)) == expected
    assert prepare_features(EXAMPLE) == expected[:1]


def test_features_accept_numpy_and_integral_floats():
    ride = {"PULocationID": np.int64(130), "DOLocationID": 205.0, "trip_distance": np.float32(2.5)}
    assert prepare_features([ride]) == [{"PU_DO": "130_205", "trip_distance": 2.5}]


@pytest.mark.parametrize(
    "ride, field",
    [
        ({"DOLocationID": 205, "trip_distance": 3.66}, "PULocationID"),
        ({"PULocationID": 130, "trip_distance": 3.66}, "DOLocationID"),
        ({"PULocationID": 130, "DOLocationID": 205}, "trip_distance"),
        ({**EXAMPLE, "trip_distance": "far"}, "trip_distance"),
        ({**EXAMPLE, "trip_distance": True}, "trip_distance"),
        ({**EXAMPLE, "trip_distance": math.nan}, "trip_distance"),
        ({**EXAMPLE, "trip_distance": math.inf}, "trip_distance"),
        ({**EXAMPLE, "PULocationID": 1.5}, "PULocationID"),
        ({**EXAMPLE, "DOLocationID": None}, "DOLocationID"),
    ],
)
def test_bad_ride_names_ride_and_field(ride, field):
    with pytest.raises(ValueError) as excinfo:
        prepare_features([EXAMPLE, ride])
    assert "ride 1" in str(excinfo.value) and field in str(excinfo.value)


def test_bad_dataframe_names_field():
    df = pd.DataFrame([EXAMPLE, {**EXAMPLE, "trip_distance": "x"}])
    with pytest.raises(ValueError, match=r"ride 1: field 'trip_distance'"):
        prepare_features(df)
    with pytest.raises(ValueError, match="DOLocationID"):
        prepare_features(df.drop(columns=["DOLocationID"]))


def test_not_a_list_of_rides():
    with pytest.raises(ValueError, match="ride 0"):
        prepare_features(["130_205"])
    with pytest.raises(ValueError, match="list of ride objects"):
        prepare_features("130_205")


def test_make_prediction_one_call_for_many(synthetic_months):
    from ride_duration.train import build_pipeline

    df = load_training_dataframe(synthetic_months[(2021, 1)], get_settings())
    pipeline = build_pipeline({"n_estimators": 5})
    pipeline.fit(prepare_features(df), df["duration"])
    rides = df.head(5)
    preds = make_prediction(pipeline, rides)
    assert preds.shape == (5,)
    assert preds.tolist() == pytest.approx(make_prediction(pipeline, rides.to_dict("records")).tolist())
    assert make_prediction(pipeline, []).shape == (0,)
    with pytest.raises(ValueError, match="trip_distance"):
        make_prediction(pipeline, [{"PULocationID": 1, "DOLocationID": 2}])


# ----------------------------------------------------------------------------- one contract: scalar and vectorised
# (ride, the problem both definitions name, or None for a valid ride)
CONTRACT = [
    (EXAMPLE, None),
    ({"PULocationID": 1, "DOLocationID": 265, "trip_distance": 0}, None),
    ({**EXAMPLE, "trip_distance": 500.0}, None),
    ({**EXAMPLE, "DOLocationID": 12.0}, None),  # an integral float is a zone id
    ({**EXAMPLE, "PULocationID": None}, "field 'PULocationID' is missing"),
    ({**EXAMPLE, "DOLocationID": None}, "field 'DOLocationID' is missing"),
    ({**EXAMPLE, "trip_distance": None}, "field 'trip_distance' is missing"),
    ({**EXAMPLE, "PULocationID": 0}, "field 'PULocationID' must be a TLC zone id between 1 and 265"),
    ({**EXAMPLE, "PULocationID": -1}, "field 'PULocationID' must be a TLC zone id between 1 and 265"),
    ({**EXAMPLE, "DOLocationID": 9999}, "field 'DOLocationID' must be a TLC zone id between 1 and 265"),
    ({**EXAMPLE, "PULocationID": 2**70}, "field 'PULocationID' must be a TLC zone id between 1 and 265"),
    ({**EXAMPLE, "PULocationID": 1.5}, "field 'PULocationID' must be an integer"),
    ({**EXAMPLE, "trip_distance": -5.0}, "field 'trip_distance' must be between 0 and 500 miles"),
    ({**EXAMPLE, "trip_distance": 500.0000001}, "field 'trip_distance' must be between 0 and 500 miles"),
    ({**EXAMPLE, "trip_distance": 1e39}, "field 'trip_distance' must be between 0 and 500 miles"),
    ({**EXAMPLE, "trip_distance": 3.5e38}, "field 'trip_distance' must be between 0 and 500 miles"),
    ({**EXAMPLE, "trip_distance": math.inf}, "field 'trip_distance' must be finite"),
    ({**EXAMPLE, "trip_distance": -math.inf}, "field 'trip_distance' must be finite"),
    ({**EXAMPLE, "trip_distance": "far"}, "field 'trip_distance' must be a number"),
    ({**EXAMPLE, "trip_distance": True}, "field 'trip_distance' must be a number"),
    ({**EXAMPLE, "PULocationID": "7"}, "field 'PULocationID' must be a number"),
]


@pytest.mark.parametrize(("ride", "problem"), CONTRACT)
def test_check_ride_and_ride_problems_agree(ride, problem):
    """The web and the stream hold each ride to `check_ride`, batch holds a month to
    `ride_problems`: the same verdict and the same sentence, ride by ride, alone in a
    frame and mixed into one frame with every other ride of the table."""
    from ride_duration.features import InvalidRide, check_ride, ride_problems

    table = [c.values[0] if hasattr(c, "values") else c[0] for c in CONTRACT]
    position = next(i for i, r in enumerate(table) if r is ride)
    if problem is None:
        check_ride(ride, 0)
    else:
        with pytest.raises(InvalidRide) as info:
            check_ride(ride, position)
        message = str(info.value)
        assert message == f"ride {position}: {problem}" or message.startswith(f"ride {position}: {problem}, got ")
    for frame, row in ((pd.DataFrame([ride]), 0), (pd.DataFrame(table), position)):
        found = ride_problems(frame).iloc[row]
        assert (None if pd.isna(found) else found) == problem


def test_nan_is_missing_in_a_frame_and_not_finite_in_a_ride():
    """The one wording difference: in a DataFrame NaN is how a missing value reads."""
    from ride_duration.features import InvalidRide, check_ride, ride_problems

    ride = {**EXAMPLE, "trip_distance": math.nan}
    with pytest.raises(InvalidRide, match="ride 0: field 'trip_distance' must be finite, got nan"):
        check_ride(ride)
    assert ride_problems(pd.DataFrame([ride])).iloc[0] == "field 'trip_distance' is missing"
