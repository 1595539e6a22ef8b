"""Test helper: find ``prometheus``/``promtool`` and run a throwaway Prometheus server.

Policy for a missing binary: under CI (``CI`` set) the test fails with a clear message, because
the CI image installs Debian's ``prometheus`` package (see ``.ci/run``); on a workstation it
is skipped with the reason. ``OODMON_PROMETHEUS`` / ``OODMON_PROMTOOL`` point at other builds.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

_ENV = {"prometheus": "OODMON_PROMETHEUS", "promtool": "OODMON_PROMTOOL"}


def find_tool(name: str) -> str | None:
    """Path of ``prometheus`` or ``promtool``, or None if it is not installed."""
    override = os.environ.get(_ENV[name])
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which(name) or (
        f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None
    )


def require_tool(name: str) -> str:
    """The tool's path; fails the test under CI, skips it elsewhere, if it is missing."""
    path = find_tool(name)
    if path is None:
        message = (
            f"`{name}` not found (set {_ENV[name]} or install Debian's `prometheus` package: "
            "apt-get install prometheus)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the Prometheus tests, not skip them.")
        pytest.skip(message)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def run_promtool(args: Sequence[str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run promtool; the caller asserts on ``returncode`` and reads stdout/stderr."""
    promtool = require_tool("promtool")
    return subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, timeout=60, check=False
    )


class PrometheusServer:
    """A running Prometheus; build it with :func:`prometheus_server`."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>`` and return ``data``; raises on an API error."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            body = http_get(url, timeout=10.0)
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            err.close()
            raise AssertionError(f"Prometheus rejected {url}: {err.code} {detail}") from err
        payload = json.loads(body)
        if payload.get("status") != "success":
            raise AssertionError(f"Prometheus query failed: {payload}")
        return payload["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the result vector (or a one-element list for a scalar)."""
        data = self.api("query", query=expr, time=None if at is None else f"{at:.3f}")
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def wait_for(
        self, what: str, predicate: Callable[[], bool], timeout: float = 20.0, every: float = 0.25
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(every)
        raise AssertionError(f"Timed out after {timeout:.0f}s waiting for {what}.\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "Prometheus log:\n" + "\n".join(text[-lines:])


@contextmanager
def prometheus_server(
    targets: Sequence[str],
    rule_files: Sequence[str | os.PathLike[str]] = (),
    scrape_interval: str = "1s",
) -> Iterator[PrometheusServer]:
    """Start Prometheus on a free loopback port scraping ``targets`` (``host:port``).

    Its config and TSDB live in a temporary directory; the server is always stopped and the
    directory removed, whatever the test does.
    """
    binary = require_tool("prometheus")
    with tempfile.TemporaryDirectory(prefix="oodmon-prometheus-") as tmp:
        root = Path(tmp)
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": [
                {
                    "job_name": "oodmon",
                    "scrape_interval": scrape_interval,
                    "scrape_timeout": scrape_interval,
                    "static_configs": [{"targets": list(targets)}],
                }
            ],
        }
        # JSON is YAML: no YAML writer needed.
        (root / "prometheus.yml").write_text(json.dumps(config, indent=1))
        log = root / "prometheus.log"
        port = free_port()
        with open(log, "wb") as log_file:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=root,
            )
        server = PrometheusServer(f"http://127.0.0.1:{port}", process, log)
        try:
            server.wait_for("Prometheus to be ready", lambda: _ready(server), timeout=30.0)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _ready(server: PrometheusServer) -> bool:
    if server.process.poll() is not None:
        raise AssertionError(
            f"Prometheus exited with code {server.process.returncode}.\n{server.tail()}"
        )
    try:
        return http_get(f"{server.url}/-/ready", timeout=1.0).strip() != b""
    except urllib.error.HTTPError as err:  # 503 while starting
        err.close()
        return False
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False
