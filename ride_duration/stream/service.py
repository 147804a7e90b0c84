"""The Lambda's logic, apart from where the model and the events come from (testable alone)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .codec import (
    BadRecord,
    InvalidEvent,
    _records,
    _short,
    decode_record,
    prediction_event,
    record_source,
    sequence_number,
)
from .writer import PutRecordsFailed

log = logging.getLogger(__name__)

KNOWN_GOOD_FEATURES = {"PU_DO": "130_205", "trip_distance": 3.66}


@dataclass
class _Item:
    """One record on its way through the handler."""

    seq: str
    record: dict
    ride_id: object = None
    features: dict | None = None
    reason: str | None = None  # why it can never be scored: it is dead-lettered
    event: dict | None = None  # its prediction event
    dead_letter: str | None = None  # where it was dead-lettered


def _read(index: int, record) -> _Item:
    seq = sequence_number(record)
    if seq is None:
        # Without an identifier the record can be neither dead-lettered nor retried alone.
        raise InvalidEvent(f"record {index} has no kinesis.sequenceNumber: not a Kinesis record")
    item = _Item(seq, record)
    try:
        item.ride_id, _, item.features = decode_record(record)
    except BadRecord as exc:
        item.reason = str(exc)
    except Exception as exc:  # noqa: BLE001  decoding depends on the record alone: it would fail on every retry
        item.reason = f"record cannot be read: {type(exc).__name__}: {_short(exc)}"
    return item


class ModelService:
    """The Lambda's logic, independent of where the model and the events come from.

    `model` needs only `.predict(list_of_feature_dicts)`; `callbacks` are called
    with the list of prediction events (after prediction, before returning);
    `dead_letters(record, reason)` stores a record that can never be scored and
    returns where (see `S3DeadLetters`; None: only logged).
    """

    def __init__(self, model, version, callbacks=(), dead_letters=None):
        self.model = model
        self.version = version
        self.callbacks = list(callbacks)
        self.dead_letters = dead_letters

    def predict(self, features: list[dict]) -> np.ndarray:
        if not features:
            return np.empty(0)
        durations = np.asarray(self.model.predict(features), dtype=float)
        if durations.shape != (len(features),):
            raise ValueError(f"the model returned {durations.size} prediction(s) for {len(features)} ride(s)")
        return durations

    def lambda_handler(self, event, context=None) -> dict:
        items = [_read(i, record) for i, record in enumerate(_records(event))]
        self._predict([item for item in items if item.reason is None])
        # A transient fault at a record sends it and every later record back to AWS for a retry.
        retry_from = self._dead_letter(items)
        retry_from = min(retry_from, self._write(items[:retry_from]))
        done = items[:retry_from]
        response = {"predictions": [item.event for item in done if item.event]}
        dead = [{"itemIdentifier": i.seq, "reason": i.reason, "location": i.dead_letter} for i in done if i.reason]
        if dead:
            response["deadLetters"] = dead  # not part of AWS's contract: for people reading the response
        if retry_from < len(items):
            # AWS's partial batch response (needs ReportBatchItemFailures on the mapping).
            response["batchItemFailures"] = [{"itemIdentifier": item.seq} for item in items[retry_from:]]
        return response

    def _predict(self, items: list[_Item]) -> None:
        """One model call for the batch. If it raises: a model that also fails on a known-good
        ride is broken (the exception fails the invocation, AWS retries the batch); otherwise
        each ride is predicted alone and the rides the model fails on are dead-lettered."""
        if not items:
            return
        try:
            durations = self.predict([item.features for item in items])
        except Exception as exc:  # noqa: BLE001  a ride's or the model's fault: told apart below
            log.warning(
                "the model failed on a batch of %d ride(s) (%s: %s); predicting them one at a time",
                len(items),
                type(exc).__name__,
                _short(exc),
            )
            self.predict([KNOWN_GOOD_FEATURES])
            durations = [self._predict_one(item) for item in items]
        for item, duration in zip(items, map(float, durations)):
            if item.reason is not None:
                continue
            if math.isfinite(duration):
                item.event = prediction_event(item.ride_id, duration, self.version, record_source(item.record))
            else:  # not JSON, and no duration at all
                item.reason = f"the model predicted {duration!r} minutes for this ride"

    def _predict_one(self, item: _Item) -> float:
        try:
            return float(self.predict([item.features])[0])
        except Exception as exc:  # noqa: BLE001  the model works (known-good ride): this ride is at fault
            item.reason = f"the model failed on this ride: {type(exc).__name__}: {_short(exc)}"
            return math.nan

    def _dead_letter(self, items: list[_Item]) -> int:
        """Store the unscorable records in order; the position of the first one that could
        not be stored (a transient fault: it is retried), else len(items)."""
        for position, item in enumerate(items):
            if item.reason is None:
                continue
            if self.dead_letters is not None:
                try:
                    item.dead_letter = self.dead_letters(item.record, item.reason)
                except Exception as exc:  # noqa: BLE001  transient: the record is retried, not lost
                    log.warning(
                        "record %d (sequenceNumber %s): its dead letter could not be written (%s: %s); "
                        "the batch is retried from it",
                        position,
                        item.seq,
                        type(exc).__name__,
                        _short(exc),
                    )
                    return position
            log.warning(
                "record %d (sequenceNumber %s) dead-lettered%s: %s",
                position,
                item.seq,
                f" to {item.dead_letter}" if item.dead_letter else " (no dead-letter location: logged only)",
                item.reason,
            )
        return len(items)

    def _write(self, items: list[_Item]) -> int:
        """Hand the prediction events to the callbacks; the position of the first event the
        writer could not write (it is retried), else len(items). Other errors fail the invocation."""
        positions = [position for position, item in enumerate(items) if item.event]
        events = [items[position].event for position in positions]
        if not events:
            return len(items)
        for callback in self.callbacks:
            try:
                callback(events)
            except PutRecordsFailed as exc:
                log.warning("%s; the batch is retried from the first of them", exc)
                return positions[exc.failed[0]] if exc.failed else positions[0]
        return len(items)
