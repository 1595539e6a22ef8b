"""librdkafka's in-process mock cluster: the real Kafka protocol on 127.0.0.1, no broker.

A client configured with ``test.mock.num.brokers`` starts a mock cluster inside its own
process and serves it on a loopback port; any other client, in this process or another
(``oodmon consume`` subprocesses), connects to that address for as long as the creating
client lives. Topics are created on first use with the mock's default of 4 partitions.

Used by the tests and by ``benchmarks/consume.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

#: Partitions the mock cluster gives a topic it creates on first use.
MOCK_PARTITIONS = 4

#: Group settings that make rebalances fast enough for tests (defaults take 10-45 s).
FAST_GROUP = {
    "session.timeout.ms": "6000",
    "heartbeat.interval.ms": "500",
    "topic.metadata.refresh.interval.ms": "1000",
}


class MockCluster:
    """A mock Kafka cluster held by this process; ``close()`` (or exit) ends it."""

    def __init__(self, brokers: int = 1) -> None:
        # log_level 4 hides the "mock cluster enabled" notice on stderr
        self._holder = Producer({"test.mock.num.brokers": brokers, "log_level": 4})
        metadata = self._holder.list_topics(timeout=10)
        broker = next(iter(metadata.brokers.values()))
        self.bootstrap = f"{broker.host}:{broker.port}"

    def create_topic(self, name: str, timeout: float = 10.0) -> int:
        """Create ``name`` (4 partitions) by asking for its metadata; returns its partitions."""
        deadline = time.monotonic() + timeout
        while True:
            topic = self._holder.list_topics(name, timeout=timeout).topics[name]
            if topic.error is None and topic.partitions:
                return len(topic.partitions)
            if time.monotonic() > deadline:
                raise TimeoutError(f"mock topic {name} not created: {topic.error}")
            time.sleep(0.05)

    def producer(self, **config: Any) -> Producer:
        return Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, **config})

    def produce(
        self,
        topic: str,
        messages: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]],
        partition: int | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Produce ``(key, value, headers)`` messages and wait until all are acknowledged."""
        producer = self.producer()
        failures: list[str] = []

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for i, (key, value, headers) in enumerate(messages):
            kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": delivered}
            if headers:
                kwargs["headers"] = headers
            if partition is not None:
                kwargs["partition"] = partition
            while True:
                try:
                    producer.produce(topic, **kwargs)
                    break
                except BufferError:
                    producer.poll(0.05)
            if i % 1000 == 0:
                producer.poll(0)
        left = producer.flush(timeout)
        if left or failures:
            raise RuntimeError(f"{left} messages undelivered, failures: {failures[:3]}")

    def committed(self, group: str, topic: str, timeout: float = 10.0) -> dict[int, int]:
        """The committed offset of every partition of ``topic`` for ``group`` (-1001: none)."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group})
        try:
            partitions = [TopicPartition(topic, p) for p in range(MOCK_PARTITIONS)]
            return {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout)}
        finally:
            consumer.close()

    def end_offsets(self, topic: str, timeout: float = 10.0) -> dict[int, int]:
        """The high watermark of every partition of ``topic``."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "offsets-probe"})
        try:
            return {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout)[1]
                for p in range(MOCK_PARTITIONS)
            }
        finally:
            consumer.close()

    def read_all(self, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
        """Every message of ``topic`` (at least ``expected`` of them), from the beginning."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"reader-{time.monotonic_ns()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe([topic])
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while len(messages) < expected and time.monotonic() < deadline:
                messages.extend(m for m in consumer.consume(500, 0.5) if m.error() is None)
        finally:
            consumer.close()
        return messages

    def close(self) -> None:
        self._holder.flush(1)
        del self._holder


def serve() -> Iterator[MockCluster]:
    """A pytest fixture body: one mock cluster, closed afterwards."""
    cluster = MockCluster()
    try:
        yield cluster
    finally:
        cluster.close()


def response_event(
    event_id: str, logits: Sequence[Sequence[float]], model: str = "digits", version: str = "1"
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A KServe logger response event in CloudEvents binary mode, as a Kafka message."""
    body = {
        "model_name": model,
        "model_version": version,
        "id": event_id,
        "outputs": [
            {
                "name": "logits",
                "shape": [len(logits), len(logits[0])],
                "datatype": "FP32",
                "data": [list(map(float, row)) for row in logits],
            }
        ],
    }
    return event_id.encode(), json.dumps(body).encode(), ce_headers(event_id, "response")


def request_event(
    event_id: str, inputs: Sequence[Sequence[float]]
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A KServe logger request event in CloudEvents binary mode, as a Kafka message."""
    body = {
        "id": event_id,
        "inputs": [
            {
                "name": "x",
                "shape": [len(inputs), len(inputs[0])],
                "datatype": "FP32",
                "data": [list(map(float, row)) for row in inputs],
            }
        ],
    }
    return event_id.encode(), json.dumps(body).encode(), ce_headers(event_id, "request")


def ce_headers(event_id: str, kind: str) -> list[tuple[str, bytes]]:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", event_id.encode()),
        ("ce_type", f"org.kubeflow.serving.inference.{kind}".encode()),
        ("ce_source", b"http://digits-predictor.default/"),
        ("content-type", b"application/json"),
    ]
