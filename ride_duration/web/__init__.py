"""The online deployment: a Flask app served by gunicorn (course part 3).

python -m ride_duration.web serve [--host 0.0.0.0] [--port 9696]
gunicorn -c gunicorn.conf.py 'ride_duration.web:create_app()'
"""

from .app import APP_NAME, InvalidRides, create_app, create_hello_app, validate_rides
from .server import APP_SPEC, GunicornServer, ServerError, gunicorn_command, gunicorn_config_path, serve

__all__ = [
    "APP_NAME",
    "APP_SPEC",
    "GunicornServer",
    "InvalidRides",
    "ServerError",
    "create_app",
    "create_hello_app",
    "gunicorn_command",
    "gunicorn_config_path",
    "serve",
    "validate_rides",
]
