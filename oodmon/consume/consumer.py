"""The consumer loop: poll a batch, score it, queue its flags, dead-letter, then commit.

:class:`ScoringConsumer` is one member of a consumer group; the package docstring
(:mod:`oodmon.consume`) describes the at-least-once delivery it keeps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oodmon.consume.config import ConsumeConfig
from oodmon.consume.decode import KafkaEvent, Rejected, decode_message
from oodmon.consume.metrics import ConsumerMetrics
from oodmon.errors import OodmonError
from oodmon.events import JoinBuffer
from oodmon.label_queue import LabelQueue, QueueItem, QueueUnavailableError
from oodmon.label_queue.writer import observation_items
from oodmon.metrics import MetricsServer, serve
from oodmon.monitor import Monitor
from oodmon.verdict import Observation

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_VERSION",
    "MAX_MODEL_VERSIONS",
    "BatchResult",
    "QueueRefusedError",
    "ScoringConsumer",
]

logger = logging.getLogger("oodmon")

#: ``model_version`` label when a payload names no version.
DEFAULT_VERSION = "unversioned"
#: ``model`` label for rows scored by the default detector when the payload names no model.
DEFAULT_MODEL = "default"

#: ``(model, version)`` pairs one consumer tracks at most: each is a set of metric series.
MAX_MODEL_VERSIONS = 256


class QueueRefusedError(OodmonError):
    """The label queue did not accept a batch's flagged rows; its offsets stay uncommitted."""


@dataclass
class _Group:
    """The response rows of one (model, version) in one poll batch."""

    monitor: Monitor
    outputs: list[np.ndarray] = field(default_factory=list)
    inputs: list[np.ndarray | None] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BatchResult:
    """What one poll batch did (for tests and the log)."""

    messages: int
    scored_rows: int
    flagged_rows: int
    rejected: int


class ScoringConsumer:
    """One member of a consumer group that scores payload logs (see :mod:`oodmon.consume`).

    Args:
        config: what to read and how to score it.
        metrics: the metric families (a fresh registry by default).
        consumer_factory: builds the Kafka consumer from its settings (tests inject one).
        producer_factory: builds the dead-letter producer from its settings.

    Raises:
        ImportError: confluent-kafka is not installed (``pip install oodmon[kafka]``).
        ValueError: an unusable configuration.
    """

    def __init__(
        self,
        config: ConsumeConfig,
        metrics: ConsumerMetrics | None = None,
        *,
        consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
        producer_factory: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        kafka = _import_kafka()
        self.config = config
        self.metrics = ConsumerMetrics() if metrics is None else metrics
        self._kafka = kafka
        self._consumer_factory = consumer_factory or kafka.Consumer
        self._producer_factory = producer_factory or kafka.Producer
        self._join: JoinBuffer[np.ndarray] = JoinBuffer(config.join_entries, config.join_seconds)
        self._join_evicted = 0
        self._monitors: dict[tuple[str, str], Monitor] = {}
        self._flagged: list[Observation] = []
        self._queue = None if config.queue is None else LabelQueue(config.queue)
        self._producer: Any = None
        self._consumer: Any = None
        self._logged: set[str] = set()
        self._lag_at = 0.0
        self.server: MetricsServer | None = None
        self.batches = 0

    # ------------------------------------------------------------------ lifecycle

    def serve_metrics(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve this consumer's ``/metrics`` (port 0 picks a free one)."""
        self.server = serve(port, addr, registry=self.metrics.registry)
        return self.server

    def run(self, stop: threading.Event, max_batches: int | None = None) -> int:
        """Consume until ``stop`` is set; finish the batch, commit it, and leave the group.

        Returns:
            The number of batches committed.

        Raises:
            QueueRefusedError: the label queue kept refusing a batch until ``stop`` was set,
                or refused it for good (that batch is not committed: it is read again).
        """
        self.open()
        try:
            while not stop.is_set() and (max_batches is None or self.batches < max_batches):
                self.poll_once(stop)
        finally:
            self.close()
        return self.batches

    def open(self) -> None:
        """Create the Kafka clients and join the group (partitions come with the polls)."""
        self._consumer = self._consumer_factory(self.config.consumer_settings())
        if self.config.dead_letter_topic is not None:
            self._producer = self._producer_factory(self.config.producer_settings())
        self._consumer.subscribe(
            list(self.config.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
        )

    def poll_once(self, stop: threading.Event | None = None) -> BatchResult | None:
        """Poll one batch, process and commit it; None when the poll brought nothing."""
        if self._consumer is None:
            raise RuntimeError("Expected open() before poll_once(), but the consumer is closed.")
        messages = self._consumer.consume(self.config.max_poll, self.config.poll_timeout)
        result = self.process(messages, stop) if messages else None
        self._update_lag()
        return result

    def close(self) -> None:
        """Leave the group (its partitions move to the others at once) and release all."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None
        for monitor in self._monitors.values():
            monitor.close()
        if self._queue is not None:
            self._queue.close()
        if self.server is not None:
            self.server.close()
            self.server = None

    # ------------------------------------------------------------------ one batch

    def process(self, messages: Sequence[Any], stop: threading.Event | None = None) -> BatchResult:
        """Score one poll batch end to end and commit its offsets (see :mod:`oodmon.consume`)."""
        offsets: dict[tuple[str, int], int] = {}
        responses: list[tuple[KafkaEvent, Any]] = []
        rejected: list[tuple[Any, Rejected]] = []
        for message in messages:
            if message.error() is not None:
                self._log_once(f"kafka:{message.error().code()}", f"Kafka: {message.error()}")
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            offsets[(topic, partition)] = max(offsets.get((topic, partition), -1), offset + 1)
            self.metrics.messages.labels(topic).inc()
            decoded = decode_message(
                topic,
                message.key(),
                message.value(),
                message.headers(),
                f"{topic}/{partition}/{offset}",
                self.config.output,
            )
            if isinstance(decoded, Rejected):
                rejected.append((message, decoded))
            elif decoded.kind == "request":
                self._join.put(decoded.id, decoded.array)
            else:
                responses.append((decoded, message))
        groups = self._group(responses, rejected)
        scored = self._score(groups)
        flagged = self._accept_flagged(stop)
        self._dead_letter(rejected)
        self._count_evictions()
        self._commit(offsets)
        return BatchResult(len(messages), scored, flagged, len(rejected))

    def _group(
        self, responses: list[tuple[KafkaEvent, Any]], rejected: list[tuple[Any, Rejected]]
    ) -> list[_Group]:
        """Responses per (model, version), with their joined inputs; rejects the unusable."""
        groups: dict[tuple[str, str], _Group] = {}
        for event, message in responses:
            monitor_or_reason = self._monitor_for(event)
            if isinstance(monitor_or_reason, Rejected):
                rejected.append((message, monitor_or_reason))
                continue
            monitor = monitor_or_reason
            outputs = event.array[None, :] if event.array.ndim == 1 else event.array
            width = monitor.detector.num_outputs
            if outputs.ndim != 2 or outputs.shape[1] != width or outputs.shape[0] == 0:
                rejected.append(
                    (
                        message,
                        Rejected(
                            "wrong_shape",
                            f"Expected outputs of shape [rows, {width}] for model "
                            f"{monitor.name!r}, but got {list(event.array.shape)}: check "
                            "--output and the detector.",
                        ),
                    )
                )
                continue
            inputs = self._join.pop(event.id)
            if inputs is not None and (inputs.ndim == 0 or len(inputs) != len(outputs)):
                inputs = None  # a request that does not match its response row for row
            group = groups.setdefault((monitor.name, monitor.version), _Group(monitor))
            group.outputs.append(outputs)
            group.inputs.append(inputs)
            group.ids.extend(f"{event.id}:{row}" for row in range(len(outputs)))
        return list(groups.values())

    def _monitor_for(self, event: KafkaEvent) -> Monitor | Rejected:
        detector = self.config.detectors.get(event.model)
        model = event.model
        if detector is None:
            detector = self.config.detectors.get(None)
            if detector is None:
                return Rejected(
                    "unknown_model",
                    f"Expected a model with a detector ({sorted(map(str, self.config.detectors))}"
                    f"), but got {event.model!r}: add --detector {event.model}=PATH.",
                )
            model = model or DEFAULT_MODEL
        assert model is not None
        key = (model, event.version or DEFAULT_VERSION)
        monitor = self._monitors.get(key)
        if monitor is None:
            if len(self._monitors) >= MAX_MODEL_VERSIONS:
                return Rejected(
                    "too_many_models",
                    f"Expected at most {MAX_MODEL_VERSIONS} (model, version) pairs (each is a "
                    f"set of metric series), but {key} would be one more.",
                )
            monitor = Monitor(
                detector, *key, metrics=self.metrics.monitor, on_flag=self._flagged.append
            )
            self._monitors[key] = monitor
        return monitor

    def _score(self, groups: list[_Group]) -> int:
        """One ``observe`` per (model, version): scores, metrics, and flagged rows collected."""
        rows = 0
        for group in groups:
            outputs = np.concatenate(group.outputs) if len(group.outputs) > 1 else group.outputs[0]
            group.monitor.observe(outputs, _joined_inputs(group), group.ids)
            rows += len(outputs)
        return rows

    def _accept_flagged(self, stop: threading.Event | None) -> int:
        """Write the batch's flagged rows to the label queue; return only once committed."""
        observations = self._flagged[:]  # monitors append to this very list: empty it in place
        self._flagged.clear()
        if self._queue is None or not observations:
            return sum(len(o) for o in observations)
        items: list[QueueItem] = []
        by_key = {(m.name, m.version): m for m in self._monitors.values()}
        for observation in observations:
            monitor = by_key.get((observation.model, observation.version))
            calibration = None if monitor is None else monitor.detector.calibration_hash_
            converted, bad = observation_items(
                observation, store_inputs=self.config.store_inputs, calibration=calibration
            )
            items.extend(converted)
            if bad:
                self._log_once("convert", f"{bad} flagged rows could not become queue items")
        result = self._add_with_retry(items, stop)
        rejected_by_model: dict[tuple[str, str], int] = {}
        for item, stored in zip(items, result.ids, strict=True):
            if stored is None:
                key = (item.model, item.model_version)
                rejected_by_model[key] = rejected_by_model.get(key, 0) + 1
        for model, version in {(o.model, o.version) for o in observations}:
            self.metrics.monitor.record_queue(
                model, version, result.depth, rejected_by_model.get((model, version), 0)
            )
        return len(items)

    def _add_with_retry(self, items: list[QueueItem], stop: threading.Event | None) -> Any:
        """``LabelQueue.add``, retried with back-off while the database is unreachable."""
        assert self._queue is not None
        delay = 0.1
        while True:
            try:
                return self._queue.add(items)
            except QueueUnavailableError as err:
                self._log_once(
                    "queue-down",
                    f"the label queue is unreachable ({err}); retrying, offsets stay "
                    "uncommitted until it accepts the batch",
                )
                if stop is not None and stop.is_set():
                    raise QueueRefusedError(
                        f"Stopped while the label queue was unreachable ({err}); the last "
                        "batch is not committed and will be scored again."
                    ) from err
                (stop or threading.Event()).wait(delay)
                delay = min(delay * 2, 10.0)
            except Exception as err:
                raise QueueRefusedError(
                    f"The label queue refused a batch ({type(err).__name__}: {err}); the "
                    "batch is not committed and will be scored again after a restart."
                ) from err

    def _dead_letter(self, rejected: list[tuple[Any, Rejected]]) -> None:
        """Count, log once per reason, and forward to the dead-letter topic (delivered)."""
        for message, why in rejected:
            self.metrics.rejected.labels(why.reason).inc()
            self._log_once(
                f"reject:{why.reason}",
                f"skipping a message from {message.topic()} ({why.reason}): {why.detail} "
                "Further messages rejected for this reason are only counted.",
            )
        if self._producer is None or not rejected:
            return
        failures: list[str] = []

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for message, _ in rejected:
            while True:
                try:
                    self._producer.produce(
                        self.config.dead_letter_topic,
                        value=message.value(),
                        key=message.key(),
                        headers=message.headers() or None,
                        on_delivery=delivered,
                    )
                    break
                except BufferError:
                    self._producer.poll(0.1)
        left = self._producer.flush(30)
        if left or failures:
            raise QueueRefusedError(
                f"{left or len(failures)} rejected messages did not reach the dead-letter topic "
                f"{self.config.dead_letter_topic!r} ({failures[:1]}); the batch is not committed."
            )
        self.metrics.dead_letters.inc(len(rejected))

    def _count_evictions(self) -> None:
        evicted = sum(self._join.evicted.values())
        if evicted > self._join_evicted:
            self.metrics.join_evicted.inc(evicted - self._join_evicted)
            self._join_evicted = evicted

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if not offsets or self._consumer is None:
            return
        partitions = [self._kafka.TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            self._consumer.commit(offsets=partitions, asynchronous=False)
        except self._kafka.KafkaException as err:
            # e.g. the partitions moved during the batch: their new owner reads it again
            self._log_once(
                f"commit:{err.args[0].code() if err.args else err}",
                f"committing offsets failed ({err}); those messages will be scored again",
            )
            return
        self.metrics.commits.inc()
        self.batches += 1

    # ------------------------------------------------------------------ partitions and lag

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        logger.info(
            "oodmon consume: assigned %s", ", ".join(f"{p.topic}/{p.partition}" for p in partitions)
        )
        self._lag_at = 0.0

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        logger.info(
            "oodmon consume: revoked %s", ", ".join(f"{p.topic}/{p.partition}" for p in partitions)
        )
        for p in partitions:
            self.metrics.forget_partition(p.topic, p.partition)

    def _update_lag(self, every: float = 1.0) -> None:
        """Lag per owned partition: the cached high watermark minus the position (no I/O)."""
        now = time.monotonic()
        if self._consumer is None or now - self._lag_at < every:
            return
        self._lag_at = now
        try:
            assignment = self._consumer.assignment()
            if not assignment:
                return
            for tp in self._consumer.position(assignment):
                try:
                    low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                except self._kafka.KafkaException:
                    continue
                if high < 0:
                    continue
                position = tp.offset if tp.offset >= 0 else low
                self.metrics.set_lag(tp.topic, tp.partition, max(high - position, 0))
        except self._kafka.KafkaException as err:
            self._log_once("lag", f"could not read the consumer lag ({err})")

    def _log_once(self, key: str, message: str) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        logger.warning("oodmon consume: %s", message)


def _joined_inputs(group: _Group) -> Any:
    """The group's inputs: one array, a list with None for unknown rows, or None.

    One array when every response found its request and the rows have one shape.
    """
    chunks = group.inputs
    if all(c is not None for c in chunks):
        arrays = [c for c in chunks if c is not None]
        if len({a.shape[1:] for a in arrays}) == 1:
            return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    if all(c is None for c in chunks):
        return None
    rows: list[Any] = []
    for chunk, outputs in zip(chunks, group.outputs, strict=True):
        rows.extend([None] * len(outputs) if chunk is None else list(chunk))
    return rows


def _import_kafka() -> Any:
    try:
        import confluent_kafka
    except ImportError as err:
        raise ImportError(
            "oodmon consume needs confluent-kafka: pip install 'oodmon[kafka]'."
        ) from err
    return confluent_kafka
