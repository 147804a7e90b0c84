"""The workbench: local stand-ins for AWS and the servers the course runs on a laptop.

Never installed in an image and not part of the `ride_duration` wheel:
- `stack`: S3 (SeaweedFS), Kinesis (moto), MLflow and Prefect servers on 127.0.0.1;
- `event_source`: the Kinesis event source mapping that invokes the stream function;
- `invoke`: the Lambda invoke endpoint the image's Runtime Interface Emulator serves;
- `streams`: putting rides on a stream, reading predictions and dead letters back;
- `gunicorn`: a gunicorn server owned by a test, the benchmark or a notebook;
- `workers`: local Prefect workers on the batch work pool (`make workers N=2`);
- `lambda_steps`: the course's Lambda function in its four steps (notebook 04);
- `process`: start a server process, wait until it answers, stop it.
"""
