"""Ride duration prediction: one package shared by training, the web service,
the Lambda function and the batch flows of the course."""

from importlib import resources as _resources

__version__ = _resources.files(__name__).joinpath("VERSION").read_text().strip()
