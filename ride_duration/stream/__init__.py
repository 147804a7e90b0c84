"""The streaming deployment: a Lambda function on a Kinesis stream.

AWS invokes `lambda_handler(event, context)` with a batch of up to 100 Kinesis
records (`event["Records"][i]["kinesis"]["data"]` is base64 JSON
`{"ride": {...}, "ride_id": ...}`). The handler predicts every valid ride with
ONE model call and writes one prediction event per ride to the predictions
stream with `put_records` (not one `put_record` per ride, as in 2022).

One record's fault never costs another record its prediction. AWS's contract
for Kinesis event sources, followed here:
- a record that can never be scored (not base64, not JSON, JSON nested too
  deep or with an int past Python's digit limit, a bad `ride_id`, a ride
  outside the contract of `features.check_ride`, a ride the model fails on) is
  written ONCE to the dead-letter location, `DEAD_LETTER_URI` (default
  `s3://<PREDICTIONS_BUCKET>/dead-letter/<INPUT_STREAM_NAME>/`), one object per
  record at `<shardId>/<arrival time>-<sequenceNumber>.json` (a retried batch
  overwrites it; a stream created again under the same name never does),
  with the record's `kinesis` fields as received, the reason and the time; it
  is NOT retried, so it is not in `batchItemFailures`;
- a transient fault (prediction events still refused by `put_records` after
  the retries, a dead letter that could not be written) is reported in AWS's
  partial batch response `batchItemFailures` (enable ReportBatchItemFailures
  on the mapping): the record it hit and every record after it, since AWS
  retries from the lowest reported sequence number anyway; the handler does no
  work past that record, so retries repeat as little as possible;
- a model that is unavailable (it cannot load, or fails on a known-good ride)
  fails the invocation: AWS retries the whole batch.
If the batch's model call raises, each ride is predicted alone, so a ride the
model cannot handle is dead-lettered and the others are still predicted.

Seams, as in the 2022 "best practices" module:
- `ModelService(model, version, callbacks, dead_letters=None)`: the handler
  logic; `callbacks` receive the prediction events (e.g. a `KinesisWriter`),
  `dead_letters(record, reason)` stores an unscorable record (`S3DeadLetters`;
  without one it is only logged and listed in the response's `deadLetters`),
  so the handler is testable without a stream, the writer without a model.
- module-level state is only the once-per-container cache (`get_service`).

The package: `codec` (records in, events out), `writer` (Kinesis and S3 dead
letters), `service` (the logic), `handler` (the entry point AWS calls). The local
event-source runner and invoke endpoint are stand-ins for AWS and live in
`workbench/`, outside what the image installs.
"""

from .handler import build_service, get_service, lambda_handler
from .service import ModelService
from .writer import KinesisWriter, S3DeadLetters

__all__ = ["KinesisWriter", "ModelService", "S3DeadLetters", "build_service", "get_service", "lambda_handler"]
