"""gunicorn settings: the one configuration of `make serve`, `python -m ride_duration.web
serve` and the Docker image (none of them passes settings on its command line).

The service faces clients directly, so it runs gunicorn's stock gevent worker (a
greenlet per connection): a slow or stalled client holds a socket, never a worker.
With gthread (2 workers x 2 threads) four clients sending a body slowly froze the
service. Every value below is a documented gunicorn setting
(https://gunicorn.org/reference/settings/); docs/web-service.md says what each
guarantees, which test proves it, and what a reverse proxy adds.

Deadlines for slow or idle clients:
- `keepalive` seconds to send a request line and headers, on a new connection too
  (the gevent worker's header read), else the connection is closed;
- WEB_BODY_TIMEOUT seconds (default 10) to send the body, else the app answers 408
  (`ride_duration.web.payload.read_body`, with gevent's `Timeout`).

Two workers, one per core. The model is loaded once in the master (`preload_app`)
and forked into the workers; the request path (Flask, numpy) does no I/O of its own.
"""

import os
import warnings

from ride_duration.config import web_bind

wsgi_app = "ride_duration.web:create_app()"
bind = web_bind()  # WEB_BIND, default 0.0.0.0:9696: the only place the address is decided
workers = int(os.environ.get("WEB_WORKERS", "2"))  # one per core
worker_class = "gevent"
worker_connections = int(os.environ.get("WEB_WORKER_CONNECTIONS", "1000"))  # per worker
preload_app = True  # load the model once, fail fast if it cannot be loaded
# Also the deadline for a request's headers, and what a stop waits for an idle keep-alive client.
keepalive = int(os.environ.get("WEB_KEEPALIVE", "2"))
timeout = 30  # async workers: only the worker's heartbeat, not a request's duration
graceful_timeout = 10
accesslog = os.environ.get("WEB_ACCESS_LOG") or None  # "-" for stdout; off: a line per request
errorlog = "-"
loglevel = os.environ.get("WEB_LOG_LEVEL", "info")
# gunicorn 26's control socket (~/.gunicorn/gunicorn.ctl) is one path shared by
# every gunicorn of a user; the service does not use it, and tests run several servers.
control_socket_disable = True

# With preload_app the master has imported ssl (urllib3, while loading the model) before
# gevent patches each worker; a worker makes no outbound connection, so gevent's warning
# about it is noise in the service log. The filter is inherited by the forked workers.
warnings.filterwarnings("ignore", message="Monkey-patching ssl after ssl has already been imported")
