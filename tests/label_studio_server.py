"""A throwaway Label Studio server for tests: ``label-studio start`` on a temporary data dir.

Usage in a test module::

    import label_studio_server

    @pytest.fixture(scope="module")
    def studio():
        yield from label_studio_server.serve()

Label Studio has its own pinned dependencies, so it lives in its own virtual environment
(``.ci/run`` makes ``.ls-venv``); the executable is ``$OODMON_LABEL_STUDIO`` or
``.ls-venv/bin/label-studio`` at the repository root. The server listens on 127.0.0.1 and a
free port, keeps its SQLite database and media in a temporary directory, makes no calls home
(version check and analytics off), and gets one admin user with a legacy token (enabled for
its organization); a personal access token is then created through the API, as a user would
in the web UI. ``serve()`` skips when Label Studio is missing or cannot start, except under
CI (``CI`` set), where it fails instead. The server is always stopped (its process group,
which this module started) and its directory deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Seconds to wait for a fresh server (first start migrates its database: ~1 min idle,
#: several on a loaded machine). ``OODMON_LABEL_STUDIO_TIMEOUT`` overrides it.
START_TIMEOUT = float(os.environ.get("OODMON_LABEL_STUDIO_TIMEOUT", "900"))


def find_executable() -> Path | None:
    """``$OODMON_LABEL_STUDIO``, else ``.ls-venv/bin/label-studio``, else None."""
    given = os.environ.get("OODMON_LABEL_STUDIO")
    candidates = [Path(given)] if given else [REPO / ".ls-venv" / "bin" / "label-studio"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LabelStudioServer:
    """One Label Studio process with a throwaway data directory and admin user."""

    def __init__(self, executable: Path) -> None:
        self.executable = executable
        self.root = Path(tempfile.mkdtemp(prefix="oodmon-ls-"))
        self.log = self.root / "server.log"
        self.port = 0
        self.email = "annotator@oodmon.test"
        self.password = uuid.uuid4().hex
        self.legacy_token = uuid.uuid4().hex
        self.personal_token = ""
        self.start_seconds = 0.0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.root / "data"),
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("DJANGO_DB", "DATABASE_URL", "POSTGRE_HOST", "LABEL_STUDIO_API_KEY"):
            env.pop(name, None)  # always its own SQLite file
        command = [
            str(self.executable),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--username",
            self.email,
            "--password",
            self.password,
            "--user-token",
            self.legacy_token,
            "--enable-legacy-api-token",
        ]
        began = time.monotonic()
        with open(self.log, "wb") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=env,
                start_new_session=True,  # its own process group, to stop it whole
            )
        self._wait_ready(began + timeout)
        self.start_seconds = time.monotonic() - began
        # a personal access token, made as the web UI makes it (POST /api/token/)
        answer = self.api("POST", "/api/token/", auth=f"Token {self.legacy_token}")
        self.personal_token = str(answer["token"])

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(
                    f"label-studio exited with {self._process.returncode}:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"label-studio did not answer /health within {START_TIMEOUT:.0f} s "
                    f"(OODMON_LABEL_STUDIO_TIMEOUT):\n{self.tail()}"
                )
            time.sleep(1.0)

    def api(self, method: str, path: str, body: Any = None, auth: str | None = None) -> Any:
        """One API call as the admin user (legacy token by default); decoded JSON."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", auth or f"Token {self.legacy_token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
        return json.loads(raw) if raw.strip() else None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=20)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def unavailable(reason: str) -> None:
    """Skip, or fail under CI, because Label Studio cannot be used."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the Label Studio tests must run)", pytrace=False)
    pytest.skip(reason)


def attach(url: str, legacy_token: str) -> LabelStudioServer:
    """A server someone else runs (``OODMON_LABEL_STUDIO_URL``, ``..._LEGACY_TOKEN`` and, if
    one exists already, ``..._PAT``), to rerun the tests without waiting for a fresh start; the
    tests never stop it."""
    server = LabelStudioServer(Path(os.devnull))
    server.port = int(url.rsplit(":", 1)[1].strip("/"))
    server.legacy_token = legacy_token
    server.email = str(server.api("GET", "/api/current-user/whoami")["email"])
    # Label Studio keeps one personal access token per user: reuse it when given
    pat = os.environ.get("OODMON_LABEL_STUDIO_PAT")
    server.personal_token = pat or str(server.api("POST", "/api/token/")["token"])
    return server


def serve() -> Iterator[LabelStudioServer]:
    """Generator body for a fixture: start, yield, always stop."""
    running = os.environ.get("OODMON_LABEL_STUDIO_URL")
    if running:
        server = attach(running, os.environ.get("OODMON_LABEL_STUDIO_LEGACY_TOKEN", ""))
        try:
            yield server
        finally:
            shutil.rmtree(server.root, ignore_errors=True)
        return
    executable = find_executable()
    if executable is None:
        unavailable(
            "Label Studio is not installed: `python3 -m venv .ls-venv && .ls-venv/bin/pip "
            "install label-studio` (or set OODMON_LABEL_STUDIO to its executable)"
        )
        return
    server = LabelStudioServer(executable)
    try:
        server.start()
    except Exception as err:
        server.stop()
        unavailable(f"Label Studio could not start: {err}")
    try:
        yield server
    finally:
        server.stop()
