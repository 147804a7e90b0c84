"""gunicorn settings shared by `make serve` and the Docker image.

The service faces clients directly, so it runs gunicorn's gevent worker (a
greenlet per connection, `ride_duration.web.worker.ServiceWorker`): a slow or
stalled client holds a socket, never a worker. With gthread (2 workers x 2
threads) four clients sending a body slowly froze the service.

Deadlines for slow or idle clients (see ride_duration/web/worker.py):
- `keepalive` seconds to send a request line and headers, on a new connection
  too (gevent's header-read timeout), else the connection is closed;
- WEB_BODY_TIMEOUT seconds (default 10) to send the body, else 408 and close.

Two workers, one per core. The model is loaded once in the master
(`preload_app`) and forked into the workers; gevent patches the standard
library in each worker after the fork, and the request path (Flask, numpy) does
no I/O of its own. Each value can be overridden by environment (or on the
gunicorn command line).
"""

import os

wsgi_app = "ride_duration.web:create_app()"
bind = os.environ.get("WEB_BIND", "0.0.0.0:9696")
workers = int(os.environ.get("WEB_WORKERS", "2"))  # one per core
worker_class = "ride_duration.web.worker.ServiceWorker"  # gevent + deadlines + JSON errors
worker_connections = int(os.environ.get("WEB_WORKER_CONNECTIONS", "1000"))  # per worker
preload_app = True  # load the model once, fail fast if it cannot be loaded
keepalive = int(os.environ.get("WEB_KEEPALIVE", "5"))  # also the deadline for a request's headers
timeout = 30  # async workers: only the worker's heartbeat, not a request's duration
graceful_timeout = 10
accesslog = os.environ.get("WEB_ACCESS_LOG") or None  # "-" for stdout; off: a line per request
errorlog = "-"
loglevel = os.environ.get("WEB_LOG_LEVEL", "info")
# gunicorn 26's control socket (~/.gunicorn/gunicorn.ctl) is one path shared by
# every gunicorn of a user; we do not use it, and tests run several servers.
control_socket_disable = True
