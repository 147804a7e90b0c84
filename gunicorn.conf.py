"""gunicorn settings shared by `make serve` and the Docker image.

Chosen with the benchmark (ride_duration/web/bench.py) on 2 cores, 8 keep-alive
connections: 2 workers x 2 threads gave the best p99 (7.5 ms; 2x4: 11.5 ms,
4x2: 12.8 ms, 1x8: 28 ms and a quarter of the throughput: the GIL). The model is
loaded once in the master (`preload_app`) and forked into the workers; gthread
workers keep client connections alive (sync workers close after every response).
Each value can be overridden by environment (or on the gunicorn command line).
"""

import os

wsgi_app = "ride_duration.web:create_app()"
bind = os.environ.get("WEB_BIND", "0.0.0.0:9696")
workers = int(os.environ.get("WEB_WORKERS", "2"))  # one per core
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "2"))  # idle keep-alive connections wait in the poller, not a thread
preload_app = True  # load the model once, fail fast if it cannot be loaded
keepalive = 5
timeout = 30
graceful_timeout = 10
accesslog = os.environ.get("WEB_ACCESS_LOG") or None  # "-" for stdout; off: a line per request
errorlog = "-"
loglevel = os.environ.get("WEB_LOG_LEVEL", "info")
# gunicorn 26's control socket (~/.gunicorn/gunicorn.ctl) is one path shared by
# every gunicorn of a user; we do not use it, and tests run several servers.
control_socket_disable = True
