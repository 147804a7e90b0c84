"""The Lambda image's entry point: `CMD ["lambda_function.lambda_handler"]`.

All logic lives in the installed package (`ride_duration.stream`); the model is
loaded on the first invocation and cached for the container's lifetime.
"""

from ride_duration.stream import lambda_handler  # noqa: F401  (the handler AWS calls)
