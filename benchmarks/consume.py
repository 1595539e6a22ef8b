"""Throughput of ``oodmon consume`` on librdkafka's mock cluster, beside bare polling+decoding.

    .venv/bin/python benchmarks/consume.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/consume.py --quick    # fewer messages

For each shape (batch 1 x 10 classes, batch 32 x 1000 classes) the same KServe response events
(CloudEvents binary mode, JSON OIP body) are read by one consumer twice, side by side:

* ``poll+decode``: consume the messages and decode each (CloudEvents SDK, JSON, OIP -> NumPy),
  nothing else: the floor any Kafka consumer of these messages pays;
* ``consume``: the full path of ``oodmon consume``: decode, one detector call per model per
  poll, metrics, flagged rows into an SQLite label queue, offsets committed per batch.

Timing runs from the first non-empty poll to the last message (group joining excluded).
Then the full path for 1 x 10 with one and with two consumer processes in one group, to see
how it scales on this machine (2 cores shared with whatever else runs). Results go to stdout
as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from kafka_mock import FAST_GROUP, MockCluster, response_event  # noqa: E402

from oodmon import OCS, Detector  # noqa: E402
from oodmon.consume import ConsumeConfig, ScoringConsumer, decode_message  # noqa: E402

SEED = 0


@dataclass(frozen=True)
class Shape:
    rows: int
    classes: int
    messages: int

    @property
    def name(self) -> str:
        return f"{self.rows} x {self.classes}"


def detector(classes: int) -> Detector:
    gen = torch.Generator().manual_seed(SEED)
    counts = torch.randint(1, 100, (classes,), generator=gen).tolist()
    logits = torch.randn(2000, classes, generator=gen) * 3
    return Detector(OCS.cross_entropy(counts=counts), alpha=0.05).fit(logits)


def events(shape: Shape, prefix: str) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    gen = torch.Generator().manual_seed(SEED + 1)
    out = []
    for i in range(shape.messages):
        logits = torch.randn(shape.rows, shape.classes, generator=gen) * 3
        logits = logits.double().round(decimals=2)  # short JSON numbers: ~200 KB at 32 x 1000
        out.append(response_event(f"{prefix}{i}", logits.tolist()))
    return out


def time_bare(cluster: MockCluster, topic: str, n: int) -> float:
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": cluster.bootstrap,
            "group.id": f"bare-{topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **FAST_GROUP,
        }
    )
    consumer.subscribe([topic])
    seen, start = 0, None
    deadline = time.monotonic() + 120
    while seen < n and time.monotonic() < deadline:
        messages = consumer.consume(500, 0.5)
        if messages and start is None:
            start = time.perf_counter()
        for m in messages:
            coordinates = f"{m.topic()}/{m.partition()}/{m.offset()}"
            decode_message(m.topic(), m.key(), m.value(), m.headers(), coordinates)
        seen += len(messages)
    elapsed = time.perf_counter() - (start or time.perf_counter())
    consumer.close()
    if seen < n:
        raise RuntimeError(f"bare consumer read {seen} of {n} messages")
    return elapsed


def time_full(cluster: MockCluster, topic: str, n: int, det: Detector, queue: Path) -> float:
    config = ConsumeConfig(
        cluster.bootstrap, (topic,), {None: det}, group=f"full-{topic}", queue=str(queue),
        kafka=FAST_GROUP,
    )  # fmt: skip
    consumer = ScoringConsumer(config)
    consumer.open()
    seen, start = 0, None
    deadline = time.monotonic() + 120
    try:
        while seen < n and time.monotonic() < deadline:
            # the clock starts where time_bare's does: when the first poll brought messages
            messages = consumer._consumer.consume(config.max_poll, config.poll_timeout)
            if messages:
                if start is None:
                    start = time.perf_counter()
                seen += consumer.process(messages).messages
    finally:
        elapsed = time.perf_counter() - (start or time.perf_counter())
        consumer.close()
    if seen < n:
        raise RuntimeError(f"consumer read {seen} of {n} messages")
    return elapsed


# ---------------------------------------------------------------------- scaling


def worker(args: argparse.Namespace) -> None:
    """One group member in its own process: report when assigned, then first/last times."""
    torch.set_num_threads(1)
    config = ConsumeConfig(
        args.bootstrap, (args.topic,), {None: detector(args.classes)}, group=args.group,
        queue=args.queue, kafka=FAST_GROUP,
    )  # fmt: skip
    consumer = ScoringConsumer(config)
    consumer.open()
    first = last = None
    seen = 0
    idle_since = time.monotonic()
    while True:
        messages = consumer._consumer.consume(config.max_poll, config.poll_timeout)
        assigned = consumer._consumer.assignment()
        print(json.dumps({"assigned": len(assigned)}), flush=True)
        if not messages:
            # done: messages came and then nothing for 3 s
            if first is not None and time.monotonic() - idle_since > 3:
                break
            continue
        first = first or time.time_ns()  # wall clock: comparable across processes
        seen += consumer.process(messages).messages
        idle_since = time.monotonic()
        last = time.time_ns()
    consumer.close()
    print(json.dumps({"first": first, "last": last, "seen": seen}), flush=True)


def time_group(cluster: MockCluster, members: int, shape: Shape, queue: Path) -> float:
    topic = f"group{members}-{time.monotonic_ns()}"
    cluster.create_topic(topic)
    command = [
        sys.executable, __file__, "--worker", "--bootstrap", cluster.bootstrap, "--topic", topic,
        "--group", topic, "--classes", str(shape.classes), "--queue", str(queue),
    ]  # fmt: skip
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(members)]
    latest = [0] * members

    def read(i: int, out: list[dict[str, int]]) -> None:
        assert procs[i].stdout is not None
        for line in procs[i].stdout:
            record = json.loads(line)
            if "assigned" in record:
                latest[i] = record["assigned"]
            else:
                out.append(record)

    results: list[dict[str, int]] = []
    readers = [
        threading.Thread(target=read, args=(i, results), daemon=True) for i in range(members)
    ]
    for r in readers:
        r.start()
    deadline = time.monotonic() + 120
    while not (all(latest) and sum(latest) == 4) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # let the group settle
    cluster.produce(topic, events(shape, "g"))
    for p in procs:
        p.wait(600)
    for r in readers:
        r.join(10)
    seen = sum(r["seen"] for r in results)
    if seen < shape.messages:
        raise RuntimeError(f"group of {members} read {seen} of {shape.messages}")
    first = min(r["first"] for r in results)
    last = max(r["last"] for r in results)
    return (last - first) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(1)
    scale = 0.25 if args.quick else 1.0
    # 40 large messages (8 MB): on librdkafka's mock cluster, longer runs of ~200 KB messages
    # stall a few messages short of the end (a mock limit; not seen with small messages)
    shapes = [Shape(1, 10, int(10_000 * scale)), Shape(32, 1000, 40)]
    cluster = MockCluster()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            topic = f"bench-{shape.rows}x{shape.classes}"
            cluster.produce(topic, events(shape, "e"))
            det = detector(shape.classes)
            bare = time_bare(cluster, topic, shape.messages)
            full = time_full(cluster, topic, shape.messages, det, Path(tmp) / f"{topic}.db")
            rows.append((shape, bare, full))
        print("| shape | messages | poll+decode msg/s | consume msg/s | consume rows/s | ratio |")
        print("|---|---|---|---|---|---|")
        for shape, bare, full in rows:
            n = shape.messages
            print(
                f"| {shape.name} | {n} | {n / bare:,.0f} | {n / full:,.0f} | "
                f"{n * shape.rows / full:,.0f} | {full / bare:.2f}x |"
            )
        small = Shape(1, 10, int(10_000 * scale))
        one = time_group(cluster, 1, small, Path(tmp) / "g1.db")
        two = time_group(cluster, 2, small, Path(tmp) / "g2.db")
        print()
        print("| consumers (processes), 1 x 10 | msg/s | speed-up |")
        print("|---|---|---|")
        print(f"| 1 | {small.messages / one:,.0f} | 1.00x |")
        print(f"| 2 | {small.messages / two:,.0f} | {one / two:.2f}x |")
    cluster.close()


if __name__ == "__main__":
    main()
