"""The online deployment: a Flask app served by gunicorn (course part 3).

- `app`: `create_app()`, `POST /predict`, `GET /health`, JSON errors.
- `payload`: the request checks (size, body deadline, JSON, rides).
- `server`: the command line that starts gunicorn (`python -m ride_duration.web serve`);
  gunicorn.conf.py runs gunicorn's stock gevent worker (docs/web-service.md).

gunicorn -c gunicorn.conf.py 'ride_duration.web:create_app()'
"""

from .app import create_app

__all__ = ["create_app"]
