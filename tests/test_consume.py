"""oodmon consume: decoding, scoring, the commit barrier and consumer groups on librdkafka's
mock cluster (the real Kafka protocol on 127.0.0.1, no broker).

In-process tests run a :class:`ScoringConsumer` on a thread; end-to-end tests start two
``oodmon consume`` processes in one group and kill, stop and count them. Every wait has a
deadline, so a broken consumer fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import numpy as np
import pytest
import torch
from conftest import id_logits

from oodmon import Detector, LabelQueue
from oodmon.consume import (
    CONSUMER_METRICS,
    REJECT_REASONS,
    ConsumeConfig,
    KafkaEvent,
    QueueRefusedError,
    Rejected,
    ScoringConsumer,
    consumer_metrics_table,
    decode_message,
)
from oodmon.label_queue import QueueUnavailableError

if os.environ.get("CI"):
    import confluent_kafka  # noqa: F401  (CI installs oodmon[kafka]: a missing client fails)
else:
    pytest.importorskip("confluent_kafka", reason="pip install 'oodmon[kafka]'")

import kafka_mock
from kafka_mock import FAST_GROUP, MockCluster, ce_headers, request_event, response_event

REPO = Path(__file__).resolve().parents[1]
TOPIC = "payload-logs"


@pytest.fixture(scope="module")
def cluster() -> Iterator[MockCluster]:
    yield from kafka_mock.serve()


def unique_topic(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def poison_messages() -> list[tuple[str, tuple[bytes | None, bytes | None, Any]]]:
    """One message per reason a consumer must skip, with the reason it must count."""
    wide = json.loads(response_event("w", [[0.0] * 11])[1])
    return [
        ("not_json", (b"p1", b"\x08\x01protobuf?", ce_headers("p1", "response"))),
        ("missing_headers", (b"p2", b'{"outputs": []}', [("ce_id", b"p2")])),
        ("unknown_type", (b"p3", b"{}", [
            *ce_headers("p3", "request")[:2], ("ce_type", b"com.example.other"),
            ("ce_source", b"x")])),
        ("bad_payload", (b"p4", b'{"no": "outputs"}', ce_headers("p4", "response"))),
        ("wrong_shape", (b"p5", json.dumps(wide).encode(), ce_headers("p5", "response"))),
    ]  # fmt: skip


# ---------------------------------------------------------------------- decoding


def test_decode_binary_structured_and_seldon() -> None:
    key, value, headers = response_event("e1", [[1.0, 2.0, 3.0]], model="m", version="7")
    event = decode_message(TOPIC, key, value, headers, f"{TOPIC}/0/5")
    assert isinstance(event, KafkaEvent)
    assert (event.kind, event.id, event.model, event.version) == ("response", "e1", "m", "7")
    np.testing.assert_array_equal(event.array, [[1.0, 2.0, 3.0]])

    structured = {
        "specversion": "1.0",
        "id": "e2",
        "source": "s",
        "type": "org.kubeflow.serving.inference.request",
        "datacontenttype": "application/json",
        "data": {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [4, 5]}]},
    }
    event = decode_message(
        TOPIC,
        None,
        json.dumps(structured).encode(),
        [("content-type", b"application/cloudevents+json")],
        "t/0/1",
    )
    assert isinstance(event, KafkaEvent) and (event.kind, event.id) == ("request", "e2")
    np.testing.assert_array_equal(event.array, [[4.0, 5.0]])

    body = json.loads(response_event("ignored", [[0.5, 0.5]])[1])
    del body["model_name"]
    seldon = "seldon.prod.model.iris.outputs"
    event = decode_message(seldon, b"req-9", json.dumps(body).encode(), None, f"{seldon}/1/2")
    assert isinstance(event, KafkaEvent)
    assert (event.kind, event.id, event.model) == ("response", "req-9", "iris")
    inputs = decode_message(
        "seldon.prod.model.iris.inputs",
        b"ignored-key",
        json.loads(json.dumps(request_event("x", [[1.0]])[1].decode())).encode(),
        [("x-request-id", b"req-9")],
        "c",
    )
    assert isinstance(inputs, KafkaEvent) and (inputs.kind, inputs.id) == ("request", "req-9")


def test_decode_without_an_id_uses_the_message_coordinates() -> None:
    body = json.loads(response_event("x", [[0.5, 0.5]])[1])
    event = decode_message(
        "seldon.ns.model.m.outputs", None, json.dumps(body).encode(), [], "c/3/9"
    )
    assert isinstance(event, KafkaEvent) and event.id == "c/3/9"


@pytest.mark.parametrize("reason", [r for r, _ in poison_messages() if r != "wrong_shape"])
def test_decode_rejects_with_a_reason_and_a_message(reason: str) -> None:
    key, value, headers = dict(poison_messages())[reason]
    rejected = decode_message(TOPIC, key, value, headers, "c")
    assert isinstance(rejected, Rejected)
    assert rejected.reason == reason and rejected.reason in REJECT_REASONS
    assert rejected.detail.startswith("Expected")


def test_metric_specs_and_readme_table() -> None:
    names = [spec.name for spec in CONSUMER_METRICS]
    assert all(name.startswith("oodmon_consumer_") for name in names)
    for spec in CONSUMER_METRICS:
        assert spec.name.endswith("_total") == (spec.type == "counter")
    readme = (REPO / "README.md").read_text()
    assert consumer_metrics_table() in readme, "README's consumer metrics table is stale"


def test_config_validation(detector: Detector) -> None:
    with pytest.raises(ValueError, match="Expected at least one topic"):
        ConsumeConfig("h:1", (), {None: detector})
    with pytest.raises(ValueError, match="dead-letter topic other than"):
        ConsumeConfig("h:1", ("a",), {None: detector}, dead_letter_topic="a")
    with pytest.raises(ValueError, match="`max_poll` to be a positive integer"):
        ConsumeConfig("h:1", ("a",), {None: detector}, max_poll=0)


# ---------------------------------------------------------------------- in process


def start(consumer: ScoringConsumer) -> tuple[threading.Event, threading.Thread, list[Exception]]:
    stop, errors = threading.Event(), []

    def target() -> None:
        try:
            consumer.run(stop)
        except Exception as err:
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return stop, thread, errors


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def all_committed(cluster: MockCluster, group: str, topic: str) -> bool:
    """Every message of every partition is committed (an empty partition has no offset)."""
    committed, end = cluster.committed(group, topic), cluster.end_offsets(topic)
    return all(committed[p] == end[p] or (end[p] == 0 and committed[p] < 0) for p in end)


def sample(consumer: ScoringConsumer, name: str, **labels: str) -> float:
    return consumer.metrics.registry.get_sample_value(name, labels) or 0.0


def test_scores_joins_queues_and_commits(
    cluster: MockCluster, detector: Detector, tmp_path: Path
) -> None:
    topic = unique_topic("joined")
    n = 300
    logits = id_logits(n, seed=5)
    logits[::7] = 0.0  # flat outputs sit on the OCS: flagged
    inputs = np.arange(n * 3, dtype=np.float32).reshape(n, 1, 3)  # distinct per event
    messages = []
    for i in range(n):
        messages.append(request_event(f"e{i}", inputs[i].tolist()))
        messages.append(response_event(f"e{i}", [logits[i].tolist()]))
    cluster.produce(topic, messages)
    queue = tmp_path / "queue.db"
    config = ConsumeConfig(
        cluster.bootstrap, (topic,), {"digits": detector}, queue=str(queue), kafka=FAST_GROUP
    )
    consumer = ScoringConsumer(config)
    stop, thread, errors = start(consumer)
    try:
        wait_for("every message", lambda: sample(
            consumer, "oodmon_consumer_messages_total", topic=topic) >= 2 * n)  # fmt: skip
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and not errors, errors

    verdict = detector.predict(logits).to_host()
    labels = {"model": "digits", "model_version": "1"}
    assert sample(consumer, "oodmon_predictions_total", **labels) == n
    flagged = sample(consumer, "oodmon_flagged_total", reason=detector.score, **labels)
    assert flagged == verdict.flag.sum() > n // 7 - 1
    with LabelQueue(queue) as q:
        items = q.items(limit=None)
        assert sorted(item.id for item in items) == sorted(
            f"e{i}:0" for i in np.flatnonzero(verdict.flag)
        )
        for item in items:  # each flagged row carries the input of its request
            stored = q.get(item.id)
            assert stored is not None and stored.input is not None
            np.testing.assert_array_equal(stored.input, inputs[int(item.id[1:-2])][0])
    assert all_committed(cluster, "oodmon", topic)
    assert sample(consumer, "oodmon_consumer_commits_total") >= 1


def test_poison_is_counted_dead_lettered_unchanged_and_committed(
    cluster: MockCluster, detector: Detector
) -> None:
    topic, dead = unique_topic("poison"), unique_topic("dead")
    cluster.create_topic(dead)
    poison = poison_messages()
    good = [response_event(f"g{i}", [row]) for i, row in enumerate(id_logits(40, 3).tolist())]
    # every poison message sits in partition 0, in front of good events of the same partition
    cluster.produce(topic, [m for _, m in poison] + good[:20], partition=0)
    cluster.produce(topic, good[20:])
    config = ConsumeConfig(
        cluster.bootstrap, (topic,), {None: detector}, dead_letter_topic=dead, kafka=FAST_GROUP
    )
    consumer = ScoringConsumer(config)
    stop, thread, errors = start(consumer)
    try:
        total = len(poison) + 40
        wait_for("every message", lambda: sample(
            consumer, "oodmon_consumer_messages_total", topic=topic) >= total)  # fmt: skip
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert sample(consumer, "oodmon_predictions_total", model="digits", model_version="1") == 40
    for reason in REJECT_REASONS:
        expected = sum(r == reason for r, _ in poison)
        assert sample(consumer, "oodmon_consumer_rejected_total", reason=reason) == expected
    assert sample(consumer, "oodmon_consumer_dead_letters_total") == len(poison)
    assert all_committed(cluster, "oodmon", topic)
    delivered = cluster.read_all(dead, len(poison))
    got = sorted((m.key(), m.value(), tuple(m.headers() or ())) for m in delivered)
    assert got == sorted((k, v, tuple(h or ())) for _, (k, v, h) in poison)


def test_unknown_model_is_rejected_without_a_default_detector(
    cluster: MockCluster, detector: Detector
) -> None:
    topic = unique_topic("models")
    cluster.produce(topic, [response_event("a", [[0.0] * 10], model="other")])
    consumer = ScoringConsumer(
        ConsumeConfig(cluster.bootstrap, (topic,), {"digits": detector}, kafka=FAST_GROUP)
    )
    stop, thread, errors = start(consumer)
    try:
        wait_for("the message", lambda: sample(
            consumer, "oodmon_consumer_rejected_total", reason="unknown_model") == 1)  # fmt: skip
    finally:
        stop.set()
        thread.join(30)
    assert not errors and all_committed(cluster, "oodmon", topic)


class DownQueue:
    """A label queue whose database is unreachable."""

    calls = 0

    def add(self, items: Any) -> Any:
        DownQueue.calls += 1
        raise QueueUnavailableError("connection refused")

    def close(self) -> None:
        pass


def test_no_commit_until_the_queue_accepts_the_flags(
    cluster: MockCluster, detector: Detector, tmp_path: Path
) -> None:
    topic = unique_topic("barrier")
    cluster.produce(topic, [response_event(f"f{i}", [[0.0] * 10]) for i in range(8)], partition=2)
    config = ConsumeConfig(
        cluster.bootstrap, (topic,), {None: detector}, queue=str(tmp_path / "q.db"),
        kafka=FAST_GROUP,
    )  # fmt: skip
    consumer = ScoringConsumer(config)
    consumer._queue = DownQueue()  # type: ignore[assignment]
    stop, thread, errors = start(consumer)
    try:
        wait_for("scoring and retries", lambda: DownQueue.calls >= 3)
    finally:
        stop.set()
        thread.join(30)
    assert sample(consumer, "oodmon_predictions_total", model="digits", model_version="1") == 8
    assert len(errors) == 1 and isinstance(errors[0], QueueRefusedError)
    assert "not committed" in str(errors[0])
    assert cluster.committed("oodmon", topic)[2] < 0  # nothing committed: read again later


def test_exposition_passes_promtool(cluster: MockCluster, detector: Detector) -> None:
    from prometheus_client import generate_latest
    from prometheus_server import run_promtool

    consumer = ScoringConsumer(ConsumeConfig(cluster.bootstrap, ("t",), {None: detector}))
    consumer.metrics.set_lag("t", 0, 5)
    consumer.metrics.monitor.record_error("m", "1", "X")
    done = run_promtool(["check", "metrics"], stdin=generate_latest(consumer.metrics.registry))
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    consumer.close()


# ---------------------------------------------------------------------- two processes


class ConsumerProcess:
    """One ``oodmon consume`` subprocess, its stderr in a file."""

    def __init__(self, name: str, args: list[str], tmp_path: Path) -> None:
        self.log = tmp_path / f"{name}.log"
        with self.log.open("w") as stderr:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "oodmon.cli", "consume", *args, "--metrics-port", "0"],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        text = self.wait_for_log(r"metrics at (\S+)", 90)
        self.url = text

    def wait_for_log(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log.read_text())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"consumer exited: {self.log.read_text()}")
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in {timeout}s: {self.log.read_text()}")

    def partitions(self) -> set[int] | None:
        """Partitions owned now (from the last assigned/revoked line), None before the first."""
        lines = re.findall(r"(assigned|revoked) ?(.*)", self.log.read_text())
        if not lines:
            return None
        what, parts = lines[-1]
        return set() if what == "revoked" else {int(p.split("/")[-1]) for p in parts.split(", ")}

    def scrape(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        with urlopen(self.url, timeout=10) as response:
            text = response.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"no stop on {sig}: {self.log.read_text()}") from None


@pytest.fixture
def group(
    cluster: MockCluster, detector: Detector, tmp_path: Path
) -> Iterator[tuple[str, list[ConsumerProcess], Path]]:
    """Two ``oodmon consume`` processes in one group on a fresh topic, both with partitions."""
    topic = unique_topic("group")
    cluster.create_topic(topic)
    path = detector.save(tmp_path / "detector.json")
    queue = tmp_path / "queue.db"
    LabelQueue(queue).close()  # created once, before two writers race to create it
    settings = [f"-X{k}={v}" for k, v in FAST_GROUP.items()]
    args = [
        "--bootstrap-servers", cluster.bootstrap, "--topic", topic, "--group", topic,
        "--detector", str(path), "--queue", str(queue), "--max-poll", "50", *settings,
    ]  # fmt: skip
    members: list[ConsumerProcess] = []
    try:
        for name in ("a", "b"):
            members.append(ConsumerProcess(name, args, tmp_path))

        def balanced() -> bool:
            owned = [m.partitions() for m in members]
            return all(owned) and sorted(p for o in owned for p in o or ()) == [0, 1, 2, 3]

        wait_for("both consumers to own partitions", balanced, 90)
        yield topic, members, queue
    finally:
        for member in members:
            if member.process.poll() is None:
                member.process.kill()
                member.process.wait(10)


def flagged_ids(detector: Detector, logits: torch.Tensor, prefix: str) -> list[str]:
    verdict = detector.predict(logits).to_host()
    return sorted(f"{prefix}{i}:0" for i in np.flatnonzero(verdict.flag))


def shifted_logits(n: int, seed: int) -> torch.Tensor:
    logits = id_logits(n, seed)
    logits[::5] *= 0.05  # close to flat: many flags
    return logits


@pytest.mark.slow
def test_two_consumers_score_every_event_once_and_stop_cleanly(
    cluster: MockCluster, detector: Detector, group: tuple[str, list[ConsumerProcess], Path]
) -> None:
    topic, members, queue = group
    n = 2000
    logits = shifted_logits(n, seed=11)
    poison = poison_messages()
    events = [response_event(f"e{i}", [row]) for i, row in enumerate(logits.tolist())]
    for part in range(4):  # poison in front of and among the events of every partition
        cluster.produce(topic, [m for _, m in poison] + events[part::4], partition=part)
    total = n + 4 * len(poison)

    def consumed() -> float:
        return sum(m.scrape("oodmon_consumer_messages_total") for m in members)

    wait_for(f"{total} messages", lambda: consumed() >= total, 120)
    scored = [m.scrape("oodmon_predictions_total") for m in members]
    assert sum(scored) == n and all(scored)  # exactly once, and both did their share
    for reason, _ in poison:
        rejected = sum(m.scrape("oodmon_consumer_rejected_total", reason=reason) for m in members)
        assert rejected == 4, reason
    assert [m.stop(signal.SIGTERM) for m in members] == [0, 0]
    assert all("stopped after" in m.log.read_text() for m in members)
    assert cluster.committed(topic, topic) == cluster.end_offsets(topic)
    with LabelQueue(queue, read_only=True) as q:
        assert sorted(i.id for i in q.items(limit=None)) == flagged_ids(detector, logits, "e")


@pytest.mark.slow
def test_sigkill_mid_stream_the_survivor_takes_over_and_nothing_is_lost(
    cluster: MockCluster, detector: Detector, group: tuple[str, list[ConsumerProcess], Path]
) -> None:
    topic, (victim, survivor), queue = group
    owned = victim.partitions()
    assert owned
    n = 8000
    logits = shifted_logits(n, seed=12)
    events = [response_event(f"k{i}", [row]) for i, row in enumerate(logits.tolist())]
    producer = threading.Thread(target=cluster.produce, args=(topic, events), daemon=True)
    producer.start()
    wait_for("the victim to be mid-stream", lambda: victim.scrape(
        "oodmon_consumer_messages_total") >= 200, 60)  # fmt: skip
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)
    at_kill = cluster.committed(topic, topic)
    producer.join(60)
    end = cluster.end_offsets(topic)
    assert any(0 <= at_kill[p] < end[p] or at_kill[p] < 0 for p in owned), "not mid-stream"

    wait_for("the survivor to commit everything", lambda: (
        cluster.committed(topic, topic) == end), 120)  # fmt: skip
    assert survivor.partitions() == {0, 1, 2, 3}
    survivor_messages = survivor.scrape("oodmon_consumer_messages_total")
    committed_by_victim = sum(max(at_kill[p], 0) for p in owned)
    # the survivor read its own partitions and everything the victim had not committed (more
    # only if a commit was refused during the rebalance: at least once, never less)
    assert survivor_messages + committed_by_victim >= n
    with LabelQueue(queue, read_only=True) as q:
        ids = [item.id for item in q.items(limit=None)]
    assert sorted(ids) == flagged_ids(detector, logits, "k")  # each flagged id exactly once
    assert survivor.stop(signal.SIGTERM) == 0
