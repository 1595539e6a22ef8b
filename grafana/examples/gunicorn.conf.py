"""gunicorn settings for gunicorn_app.py with Prometheus multiprocess metrics.

    export PROMETHEUS_MULTIPROC_DIR=/tmp/oodmon-metrics
    gunicorn -c grafana/examples/gunicorn.conf.py --chdir grafana/examples gunicorn_app:app

uvicorn (``--workers N``) has no per-worker exit hook: wipe the directory before starting it
with ``python -c "from oodmon.metrics import prepare_multiprocess_dir as p; p()"``; the live
gauges of workers that died stay until the next restart.
"""

from __future__ import annotations

from typing import Any

from oodmon.metrics import child_exit as _mark_worker_dead
from oodmon.metrics import prepare_multiprocess_dir

bind = "127.0.0.1:8000"  # loopback; use "0.0.0.0:8000" to serve other hosts
workers = 4
# Restarting workers now and then bounds memory, but each restart leaves its counter files
# behind (they hold its share of the totals), so keep restarts rare: every .db file is read at
# every scrape.
max_requests = 0


def on_starting(server: Any) -> None:
    """In the master, before any worker: start from an empty metrics directory."""
    prepare_multiprocess_dir()


def child_exit(server: Any, worker: Any) -> None:
    """In the master, after a worker exited: drop its live gauges, keep its counters."""
    _mark_worker_dead(server, worker)
