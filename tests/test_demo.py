"""`oodmon demo` as a user runs it: a subprocess, scraped while it runs, its queue checked after."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from oodmon.label_queue import LabelQueue

pytestmark = pytest.mark.slow


class Demo:
    """A running `oodmon demo` whose stdout lines are read on a thread."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oodmon.cli", "demo", "--quick", "--port", "0",
             "--no-progress", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 240.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            match = re.search(pattern, line)
            if match:
                return match
        pytest.fail(f"demo never printed {pattern!r}; output:\n{''.join(self.output)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def demo_factory() -> Iterator[type[Demo]]:
    started: list[Demo] = []

    class Tracked(Demo):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            started.append(self)

    yield Tracked
    for demo in started:
        demo.stop()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def predictions(text: str) -> float:
    match = re.search(
        r'^oodmon_predictions_total\{[^}]*model="mnist-cnn"[^}]*\} (\S+)$', text, re.M
    )
    return float(match.group(1)) if match else 0.0


def test_demo_serves_metrics_while_running_and_fills_the_queue(
    demo_factory: type[Demo], tmp_path: Path
) -> None:
    work = tmp_path / "demo"
    demo = demo_factory("--workdir", str(work), "--serve", "--phase-seconds", "1.5",
                        "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    url = demo.wait_for(r"metrics: (http://127\.0\.0\.1:\d+/metrics)").group(1)
    during = []
    while demo.proc.poll() is None and not any("serving" in line for line in demo.output):
        during.append(predictions(scrape(url)))
        time.sleep(0.3)
    demo.wait_for(r"serving .* until Ctrl-C")
    final_text = scrape(url)
    final = predictions(final_text)

    summary = json.loads((work / "summary.json").read_text())
    phases = summary["phases"]
    assert phases[0]["phase"] == "in-distribution"
    total = sum(p["samples"] for p in phases)
    assert final == total == 200 * 5 + 100
    assert any(0 < value < final for value in during), f"no scrape saw the run mid-way: {during}"
    # in-distribution traffic is flagged at about alpha; shifted traffic far more often
    in_dist, shifted = phases[0], phases[1:]
    assert in_dist["flag_rate"] < 0.15
    assert max(p["flag_rate"] for p in shifted) > 0.5
    assert all(p["flag_rate"] > 2 * in_dist["flag_rate"] for p in shifted)
    assert all(p["mean_distance"] < in_dist["mean_distance"] for p in shifted)
    assert re.search(r'oodmon_flagged_total\{.*model="mnist-cnn".*\} [1-9]', final_text)

    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(timeout=60) == 0

    with LabelQueue(work / "label_queue.sqlite", read_only=True) as label_queue:
        items = label_queue.items()
        stats = label_queue.stats()
    assert len(items) == stats.queued == phases[-1]["queue_depth"] > 0
    p_values = [item.p_value for item in items]
    assert p_values == sorted(p_values)  # most OOD first
    assert {item.model for item in items} == {"mnist-cnn"}
    assert (work / "detector.json").exists() and (work / "demo.png").stat().st_size > 10_000


def test_ctrl_c_mid_scenario_cleans_up_and_reuses_the_cache(
    demo_factory: type[Demo], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = demo_factory("--workdir", str(tmp_path / "a"), "--cache-dir", str(cache))
    first.wait_for(r"model: trained")
    assert first.proc.wait(timeout=240) == 0

    second = demo_factory("--workdir", str(tmp_path / "b"), "--cache-dir", str(cache),
                          "--phase-seconds", "20")  # fmt: skip
    second.wait_for(r"model: loaded from cache")
    url = second.wait_for(r"metrics: (\S+)").group(1)
    deadline = time.monotonic() + 60
    while predictions(scrape(url)) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    second.proc.send_signal(signal.SIGINT)
    assert second.proc.wait(timeout=60) == 130
    assert any("interrupted" in line for line in second.output)
    with LabelQueue(tmp_path / "b" / "label_queue.sqlite", read_only=True) as label_queue:
        label_queue.stats()  # opens cleanly after the interrupt


def test_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "oodmon.cli", "demo", "--quick", "--no-progress",
             "--port", str(port), "--workdir", str(tmp_path / "w"), "--epochs", "1"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_summary_table_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    from oodmon.demo.walkthrough import _print_summary

    rows = [
        {"phase": "in-distribution", "samples": 1000, "flag_rate": 0.05, "mean_distance": 2.1,
         "queue_depth": 50},
        {"phase": "rotated 180°", "samples": 1000, "flag_rate": 0.36, "mean_distance": 1.7,
         "queue_depth": 410},
    ]  # fmt: skip
    _print_summary(rows, 0.05)
    out = capsys.readouterr().out
    header, rule = out.strip().splitlines()[:2]
    assert len(header) == len(rule) == len(out.strip().splitlines()[2])  # columns line up
    assert "LOWER = closer to the OCS = more OOD" in out
    assert "queue (total)" in header and "cumulative" in out
    assert "alpha = 0.05" in out and "180° vs 60°" in out and "experiments/README.md" in out


def test_hints_name_a_command_that_runs() -> None:
    import shlex

    from oodmon.demo.walkthrough import _cli

    result = subprocess.run(
        [*shlex.split(_cli()), "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("oodmon ")
