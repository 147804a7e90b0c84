"""put_records in chunks of 500, re-sending only the entries reported failed."""

from __future__ import annotations

import json

import pytest

from ride_duration.stream import KinesisWriter
from ride_duration.stream.codec import prediction_event
from ride_duration.stream.writer import PutRecordsFailed
from workbench.streams import read_stream


class FlakyKinesis:
    """A fake client whose put_records fails the entries chosen by `fail(attempt, entry)`."""

    def __init__(self, fail=lambda attempt, entry: False):
        self.fail = fail
        self.requests = []
        self.stored = []

    def put_records(self, StreamName, Records):
        attempt = len(self.requests) + 1
        self.requests.append([json.loads(r["Data"])["prediction"]["ride_id"] for r in Records])
        results = []
        for entry in Records:
            if self.fail(attempt, entry):
                results.append({"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "slow down"})
            else:
                self.stored.append(entry)
                results.append({"SequenceNumber": "1", "ShardId": "shardId-000000000000"})
        return {"FailedRecordCount": sum("ErrorCode" in r for r in results), "Records": results}


def events(n: int) -> list[dict]:
    return [prediction_event(i, float(i), "v") for i in range(n)]


def test_chunks_of_500():
    client = FlakyKinesis()
    writer = KinesisWriter("out", client, sleep=lambda s: None)
    writer(events(1201))
    assert [len(r) for r in client.requests] == [500, 500, 201]
    assert writer.calls == 3
    assert client.stored[0]["PartitionKey"] == "0"
    assert json.loads(client.stored[-1]["Data"])["prediction"] == {"ride_duration": 1200.0, "ride_id": 1200}


def test_resends_only_failed_entries_with_backoff():
    # Attempt 1 fails the odd ride ids, attempt 2 fails id 1 again, attempt 3 succeeds.
    def fail(attempt, entry):
        ride_id = int(entry["PartitionKey"])
        return (attempt == 1 and ride_id % 2 == 1) or (attempt == 2 and ride_id == 1)

    sleeps = []
    client = FlakyKinesis(fail)
    KinesisWriter("out", client, sleep=sleeps.append, base_delay=0.1)(events(6))
    assert client.requests == [[0, 1, 2, 3, 4, 5], [1, 3, 5], [1]]
    assert sorted(int(e["PartitionKey"]) for e in client.stored) == [0, 1, 2, 3, 4, 5]
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.1 and 0 <= sleeps[1] <= 0.2


def test_gives_up_loudly_after_bounded_attempts():
    client = FlakyKinesis(lambda attempt, entry: entry["PartitionKey"] == "2")
    with pytest.raises(PutRecordsFailed, match=r"1 of 4 prediction events .* after 3 attempts") as failed:
        KinesisWriter("out", client, max_attempts=3, sleep=lambda s: None)(events(4))
    assert client.requests == [[0, 1, 2, 3], [2], [2]]
    assert failed.value.failed == [2]  # the handler reports that ride's record for a retry


def test_failed_chunk_names_its_events_and_every_later_one():
    client = FlakyKinesis(lambda attempt, entry: entry["PartitionKey"] in {"503", "777"})
    with pytest.raises(PutRecordsFailed) as failed:
        KinesisWriter("out", client, max_attempts=2, sleep=lambda s: None)(events(1201))
    # chunk 1 written; chunk 2 left 503 and 777 unwritten; chunk 3 was never tried
    assert [len(r) for r in client.requests] == [500, 500, 2]
    assert failed.value.failed == [503, 777, *range(1000, 1201)]


def test_writes_to_real_local_kinesis(kinesis, make_stream):
    out = make_stream("writer")
    writer = KinesisWriter(out, kinesis)
    writer(events(3))
    assert writer.calls == 1
    assert [e["prediction"]["ride_id"] for e in read_stream(kinesis, out)] == [0, 1, 2]
