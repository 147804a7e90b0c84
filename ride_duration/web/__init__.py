"""The online deployment: a Flask app served by gunicorn (course part 3).

- `app`: `create_app()`, `POST /predict`, `GET /health`, the request checks.
- `worker`: the gevent worker with header and body deadlines (gunicorn.conf.py names it).
- `server`: the command line that starts gunicorn (`python -m ride_duration.web serve`).

gunicorn -c gunicorn.conf.py 'ride_duration.web:create_app()'
"""

from .app import create_app

__all__ = ["create_app"]
