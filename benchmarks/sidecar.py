"""Throughput and latency of the real ``oodmon sidecar`` process over loopback.

    .venv/bin/python benchmarks/sidecar.py [--seconds 5] [--clients 8]

Starts the sidecar with a 10-class and a 1000-class detector, posts binary-mode KServe response
CloudEvents of batch 1 x 10 and 32 x 1000 from keep-alive connections (an asyncio client of a
few dozen lines, so that the client costs little of the shared CPU), and reports events/s,
p50/p99 latency, and the sidecar's CPU per event (from /proc) beside the CPU that
``json.loads`` of the same bodies costs (the JSON library the sidecar uses: the bound a
receiver cannot beat). Targets (issue 11): CPU ratio within 3x, >= 2,000 events/s at 1 x 10.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from oodmon import OCS, Detector  # noqa: E402
from oodmon.events import RESPONSE_TYPE, encode_event  # noqa: E402
from oodmon.oip import encode_tensor  # noqa: E402

SEED = 0
SCENARIOS = (("small", 1, 10), ("large", 32, 1000))


@dataclass
class Result:
    name: str
    events: int
    seconds: float
    latencies: np.ndarray
    server_cpu: float
    json_cpu_per_event: float
    body_bytes: int

    def row(self) -> str:
        rate = self.events / self.seconds
        cpu = self.server_cpu / self.events
        p50, p99 = np.percentile(self.latencies, [50, 99]) * 1e3
        return (
            f"| {self.name} | {self.body_bytes:,} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | "
            f"{cpu * 1e6:,.0f} | {self.json_cpu_per_event * 1e6:,.1f} | "
            f"{cpu / self.json_cpu_per_event:.1f}x |"
        )


def logits(n: int, k: int, rng: np.random.Generator, ood: bool = False) -> np.ndarray:
    z = rng.normal(size=(n, k)).astype(np.float32)
    if not ood:
        z[np.arange(n), rng.integers(0, k, n)] += 5.0
    return z


def build_detectors(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(SEED)
    paths = {}
    for name, _, k in SCENARIOS:
        detector = Detector(OCS.cross_entropy(counts=[1] * k), alpha=0.05)
        detector.fit(logits(2000, k, rng))
        paths[name] = detector.save(root / f"{name}.json")
    return paths


def bodies(name: str, rows: int, k: int, count: int) -> list[tuple[bytes, bytes]]:
    """(raw HTTP request, JSON body) pairs; one in ten batches is OOD."""
    rng = np.random.default_rng(SEED + rows)
    out = []
    for i in range(count):
        data = {
            "model_name": name,
            "outputs": [encode_tensor("logits", logits(rows, k, rng, i % 10 == 0))],
        }
        headers, body = encode_event(RESPONSE_TYPE, "/bench", f"{name}-{i}", data)
        lines = [b"POST / HTTP/1.1", b"host: 127.0.0.1", f"content-length: {len(body)}".encode()]
        lines += [f"{k_}: {v}".encode() for k_, v in headers.items()]
        out.append((b"\r\n".join(lines) + b"\r\n\r\n" + body, body))
    return out


def json_cpu(pool: list[tuple[bytes, bytes]], min_seconds: float = 1.0) -> float:
    """CPU seconds per ``json.loads`` of the bodies, single thread."""
    n = 0
    start = time.process_time()
    while time.process_time() - start < min_seconds:
        for _, body in pool:
            json.loads(body)
        n += len(pool)
    return (time.process_time() - start) / n


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def client(
    port: int, pool: list[tuple[bytes, bytes]], deadline: float, offset: int,
    latencies: list[float],
) -> int:  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    try:
        while time.perf_counter() < deadline:
            raw, _ = pool[(offset + sent) % len(pool)]
            start = time.perf_counter()
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reply = await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the sidecar answered {head[:40]!r}: {reply[:200]!r}")
            latencies.append(time.perf_counter() - start)
            sent += 1
    finally:
        writer.close()
    return sent


async def drive(
    port: int, pool: list[tuple[bytes, bytes]], seconds: float, clients: int
) -> tuple[int, float, list[float]]:
    latencies: list[float] = []
    start = time.perf_counter()
    counts = await asyncio.gather(*(
        client(port, pool, start + seconds, i * 7, latencies) for i in range(clients)
    ))  # fmt: skip
    return sum(counts), time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario")
    parser.add_argument("--clients", type=int, default=8, help="keep-alive connections")
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_detectors(Path(tmp))
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [
            sys.executable, "-m", "oodmon.cli", "sidecar", "--port", str(port),
            *(f"--detector={name}={path}" for name, path in paths.items()),
        ]  # fmt: skip
        proc = subprocess.Popen(command, cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("the sidecar did not start") from None
                    time.sleep(0.2)
            results = []
            for name, rows, k in SCENARIOS:
                pool = bodies(name, rows, k, 64)
                asyncio.run(drive(port, pool, args.warmup, args.clients))
                cpu0 = process_cpu(proc.pid)
                events, seconds, latencies = asyncio.run(
                    drive(port, pool, args.seconds, args.clients)
                )
                cpu = process_cpu(proc.pid) - cpu0
                results.append(Result(
                    f"{rows} x {k}", events, seconds, np.asarray(latencies), cpu,
                    json_cpu(pool), len(pool[0][1]),
                ))  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(30)

    print(f"\noodmon sidecar over loopback: {args.clients} keep-alive clients, "
          f"{args.seconds:g} s per scenario, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| batch | body bytes | events/s | p50 ms | p99 ms | sidecar CPU/event us "
          "| json.loads CPU/event us | CPU ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        print(result.row())


if __name__ == "__main__":
    main()
