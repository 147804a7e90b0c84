"""What the trained model must do, whatever its exact numbers: checks that survive a
retraining but catch a broken feature pipeline (e.g. distance dropped, zones swapped)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ride_duration.config import get_settings
from ride_duration.predict import make_prediction
from ride_duration.tlc import load_training_dataframe

EXAMPLE_RIDE = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}


def test_the_course_example_ride_stays_near_18_minutes(real_pipeline):
    (minutes,) = make_prediction(real_pipeline["pipeline"], [EXAMPLE_RIDE])
    assert abs(minutes - 18.24) < 0.5  # the course's figure; retraining moves it by hundredths


def test_longer_trips_predict_longer_durations_on_average(real_pipeline):
    feb = load_training_dataframe(real_pipeline["feb"], get_settings())
    feb = feb[feb["trip_distance"].between(0.5, 20)].sample(5000, random_state=1)
    rides = feb[["PULocationID", "DOLocationID", "trip_distance"]]
    base = make_prediction(real_pipeline["pipeline"], rides)
    longer = make_prediction(real_pipeline["pipeline"], rides.assign(trip_distance=rides["trip_distance"] * 2))
    assert longer.mean() > base.mean() + 2  # minutes
    assert (longer >= base - 1e-9).mean() > 0.9  # and for nearly every single ride
    # Mean prediction rises with distance band, as the real durations do.
    bands = pd.cut(rides["trip_distance"], [0.5, 1, 2, 4, 8, 20])
    means = pd.Series(base, index=rides.index).groupby(bands, observed=True).mean().to_numpy()
    assert np.all(np.diff(means) > 0), means
