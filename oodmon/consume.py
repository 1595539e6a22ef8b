"""Score payload logs from Kafka: a consumer-group member that monitors many model replicas.

Model servers log every request and response to Kafka (KServe's logger through a Knative
KafkaSink: CloudEvents with ``ce_*`` headers or in structured mode; Seldon Core v2: topics
``seldon.<namespace>.model.<name>.inputs|outputs`` holding Open Inference Protocol JSON).
:class:`ScoringConsumer` reads them as one member of a consumer group, so partitions spread
over as many ``oodmon consume`` processes as the volume needs, and a dead member's partitions
move to the others.

Each poll returns up to ``max_poll`` messages. They are decoded, requests are held in a
bounded join buffer keyed by event id (so that a flagged response reaches the label queue
with its input), and every response row of one model is scored in a single
:meth:`~oodmon.monitor.Monitor.observe` call. Delivery is at least once:

1. the batch is scored and its metrics recorded;
2. its flagged rows are written to the label queue with :meth:`LabelQueue.add
   <oodmon.label_queue.LabelQueue.add>`, synchronously: the call returns only once the
   database committed them (a :class:`~oodmon.label_queue.QueueWriter` may drop rows when
   its buffer is full, so its ``flush`` proves nothing about them);
3. rejected messages are delivered to the dead-letter topic, if there is one;
4. only then are the batch's offsets committed.

A crash anywhere before step 4 means the batch is read and scored again (metrics count it
twice: totals are at least the traffic, never less); the queue keeps each flagged row once,
because its item id (event id and row index) and content are the same the second time.
Messages that cannot be used (not JSON, wrong shape, unknown model, missing headers) are
counted by reason, logged once per reason, forwarded unchanged to the dead-letter topic and
committed with the batch: a poison message never stalls a partition.

Protobuf payloads (Seldon's default ``ModelInferRequest``/``ModelInferResponse`` encoding)
are not supported yet; configure the servers to log JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from oodmon.detector import Detector
from oodmon.errors import OodmonError
from oodmon.events import EventError, JoinBuffer, decode_event
from oodmon.label_queue import LabelQueue, QueueItem, QueueUnavailableError
from oodmon.label_queue.writer import observation_items
from oodmon.metrics import MetricSpec, MetricsServer, PrometheusMetrics, serve
from oodmon.monitor import Monitor
from oodmon.oip import OIPError, parse_request, parse_response
from oodmon.verdict import Observation

__all__ = [
    "CONSUMER_METRICS",
    "DEFAULT_VERSION",
    "REJECT_REASONS",
    "ConsumeConfig",
    "ConsumerMetrics",
    "KafkaEvent",
    "Rejected",
    "ScoringConsumer",
    "consumer_metrics_table",
    "decode_message",
    "seldon_topic",
]

logger = logging.getLogger("oodmon")

#: ``model_version`` label when a payload names no version.
DEFAULT_VERSION = "unversioned"
#: ``model`` label for rows scored by the default detector when the payload names no model.
DEFAULT_MODEL = "default"

#: Why a message was skipped (the ``reason`` label of ``oodmon_consumer_rejected_total``).
REJECT_REASONS: tuple[str, ...] = (
    "not_json",  # the value is not JSON (e.g. protobuf, which is not supported yet)
    "missing_headers",  # neither a CloudEvent (binary or structured) nor a Seldon topic
    "bad_event",  # a CloudEvent whose attributes are invalid
    "unknown_type",  # a CloudEvent type other than an inference request or response
    "bad_payload",  # JSON, but not an Open Inference Protocol / KServe v1 payload
    "wrong_shape",  # outputs that are not [rows, classes] with the detector's classes
    "unknown_model",  # a model with no detector
    "too_many_models",  # more (model, version) pairs than the label bound allows
)

#: ``(model, version)`` pairs one consumer tracks at most: each is a set of metric series.
MAX_MODEL_VERSIONS = 256

_SELDON_TOPIC = re.compile(
    r"^seldon\.(?P<namespace>[^.]+)\.model\.(?P<model>[^.]+)\.(?P<kind>inputs|outputs)$"
)
_REQUEST_ID_HEADERS = ("x-request-id", "ce_id")
#: oodmon.events' refusal reasons in the consumer's words.
_EVENT_REASONS = {
    "malformed_json": "not_json",
    "missing_attribute": "missing_headers",
    "invalid_event": "bad_event",
    "unknown_type": "unknown_type",
}

#: The consumer's own metric families, beside the Monitor's (:data:`oodmon.metrics.METRICS`).
CONSUMER_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "oodmon_consumer_messages_total", "counter", ("topic",),
        "Kafka messages this consumer read (scored, held as requests, or rejected).",
    ),
    MetricSpec(
        "oodmon_consumer_rejected_total", "counter", ("reason",),
        "Messages skipped and committed because they could not be scored; reason is one of "
        "not_json, missing_headers, bad_event, unknown_type, bad_payload, wrong_shape, "
        "unknown_model, too_many_models.",
    ),
    MetricSpec(
        "oodmon_consumer_dead_letters_total", "counter", (),
        "Rejected messages delivered to the dead-letter topic.",
    ),
    MetricSpec(
        "oodmon_consumer_join_evicted_total", "counter", (),
        "Requests dropped from the join buffer before their response came (their responses "
        "are scored without inputs).",
    ),
    MetricSpec(
        "oodmon_consumer_commits_total", "counter", (),
        "Batches whose offsets were committed (after scoring, metrics and the label queue).",
    ),
    MetricSpec(
        "oodmon_consumer_lag", "gauge", ("topic", "partition"),
        "Messages between this consumer's position and the end of each partition it owns.",
    ),
)  # fmt: skip


def consumer_metrics_table() -> str:
    """The README's Markdown table of the consumer's own metric families."""
    lines = ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
    for spec in CONSUMER_METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        lines.append(f"| `{spec.name}` | {spec.type} | {labels} | {spec.help} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class KafkaEvent:
    """One decoded inference request or response.

    Attributes:
        kind: ``"request"`` (its inputs are held for the join) or ``"response"`` (scored).
        id: the event id that pairs a request with its response (KServe gives both the same
            ``ce_id``; Seldon the same request id), or the message's coordinates when it has
            none (stable across re-reads, so replayed rows keep their queue ids).
        model: the model name from the payload or the topic, or None.
        version: the model version, or None.
        array: a response's selected output tensor, or a request's first input tensor.
    """

    kind: Literal["request", "response"]
    id: str
    model: str | None
    version: str | None
    array: np.ndarray


@dataclass(frozen=True)
class Rejected:
    """A message that cannot be scored: its reason (one of :data:`REJECT_REASONS`) and why."""

    reason: str
    detail: str


def seldon_topic(topic: str) -> tuple[str, Literal["request", "response"]] | None:
    """``seldon.<ns>.model.<name>.inputs|outputs`` -> (name, kind), else None."""
    match = _SELDON_TOPIC.match(topic)
    if match is None:
        return None
    return match["model"], "request" if match["kind"] == "inputs" else "response"


def decode_message(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]] | None,
    coordinates: str,
    output: str | None = None,
) -> KafkaEvent | Rejected:
    """Decode one Kafka message into a request or response event, or say why not.

    Args:
        topic: the message's topic (Seldon topics name the model and the kind).
        key: the message key (Seldon keys messages by request id).
        value: the message value.
        headers: the message headers, as confluent-kafka returns them.
        coordinates: ``topic/partition/offset``, the id of an event that has none.
        output: the response tensor to score, when a response holds several.
    """
    header_map = {name.lower(): data or b"" for name, data in headers or ()}
    seldon = seldon_topic(topic)
    if seldon is not None:
        model, kind = seldon
        body = _json(value)
        if isinstance(body, Rejected):
            return body
        event_id = _first_header(header_map, _REQUEST_ID_HEADERS)
        if event_id is None and key:
            event_id = key.decode("utf-8", "replace")
        return _payload_event(kind, body, event_id or coordinates, model, output)
    try:
        event = decode_event(header_map, value or b"", header_prefix="ce_")
    except EventError as err:
        return Rejected(_EVENT_REASONS.get(err.reason, "bad_event"), str(err))
    # KServe names the InferenceService in an extension: the model of a v1 payload
    service = event.attributes.get("inferenceservicename")
    return _payload_event(
        event.kind, event.data, event.id or coordinates, None, output, str(service or "") or None
    )


def _json(value: bytes | None) -> Any:
    try:
        return json.loads(value or b"")
    except ValueError as err:
        return Rejected(
            "not_json",
            f"Expected a JSON Open Inference Protocol payload, but the value is not JSON "
            f"({err}); protobuf payloads are not supported yet: log JSON.",
        )


def _first_header(headers: Mapping[str, bytes], names: Sequence[str]) -> str | None:
    for name in names:
        data = headers.get(name)
        if data:
            return data.decode("utf-8", "replace")
    return None


def _payload_event(
    kind: Literal["request", "response"],
    body: Any,
    event_id: str,
    model: str | None,
    output: str | None,
    fallback_model: str | None = None,
) -> KafkaEvent | Rejected:
    try:
        if kind == "request":
            payload = parse_request(body)
            # the label queue stores one input per row: the first input tensor
            array = next(iter(payload.tensors.values()), None)
            if array is None:
                raise OIPError("Expected at least one input tensor, but the request has none.")
        else:
            payload = parse_response(body)
            _, array = payload.select(output)
    except OIPError as err:
        return Rejected("bad_payload", str(err))
    return KafkaEvent(
        kind=kind,
        id=event_id,
        model=model or payload.model_name or fallback_model,
        version=payload.model_version,
        array=array,
    )


# ---------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ConsumeConfig:
    """What ``oodmon consume`` was asked to do.

    Attributes:
        bootstrap_servers: ``HOST:PORT[,HOST:PORT...]`` of the Kafka cluster.
        topics: topics to read (payload logs).
        detectors: model name -> detector; the key None is the default for any other model.
        group: the consumer group (every member of one group shares the partitions).
        queue: label-queue URL for flagged rows, or None.
        dead_letter_topic: where rejected messages go, unchanged, or None.
        max_poll: messages per poll (one detector call per model per poll).
        poll_timeout: seconds a poll waits for messages.
        output: the response tensor to score when a response holds several.
        join_entries: requests the join buffer holds at most.
        join_seconds: seconds a request waits for its response at most.
        store_inputs: keep flagged rows' inputs in the queue (else only their ids).
        kafka: extra librdkafka settings for the consumer (``-X key=value``).
    """

    bootstrap_servers: str
    topics: tuple[str, ...]
    detectors: Mapping[str | None, Detector]
    group: str = "oodmon"
    queue: str | None = None
    dead_letter_topic: str | None = None
    max_poll: int = 500
    poll_timeout: float = 0.5
    output: str | None = None
    join_entries: int = 10_000
    join_seconds: float = 60.0
    store_inputs: bool = True
    kafka: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.bootstrap_servers, str) or not self.bootstrap_servers:
            raise ValueError(
                f"Expected `bootstrap_servers` as HOST:PORT, but got {self.bootstrap_servers!r}."
            )
        if not self.topics or not all(isinstance(t, str) and t for t in self.topics):
            raise ValueError(f"Expected at least one topic name, but got {self.topics!r}.")
        if not self.detectors:
            raise ValueError("Expected at least one detector (--detector PATH or MODEL=PATH).")
        for name, value in (("max_poll", self.max_poll), ("join_entries", self.join_entries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        for name, seconds in (
            ("poll_timeout", self.poll_timeout),
            ("join_seconds", self.join_seconds),
        ):
            if not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
                raise ValueError(f"Expected `{name}` > 0 seconds, but got {seconds!r}.")
        if self.dead_letter_topic is not None and self.dead_letter_topic in self.topics:
            raise ValueError(
                f"Expected a dead-letter topic other than the topics read, but got "
                f"{self.dead_letter_topic!r}: rejected messages would be read again."
            )

    def consumer_settings(self) -> dict[str, Any]:
        """Settings of the librdkafka consumer: manual commits, start at the earliest offset."""
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group,
            "client.id": f"oodmon-consume-{socket.gethostname()}-{os.getpid()}",
            # offsets are committed by hand after the queue accepted the batch's flags
            "enable.auto.commit": False,
            # a new group reads what is already there: nothing logged before it started is lost
            "auto.offset.reset": "earliest",
            **self.kafka,
        }

    def producer_settings(self) -> dict[str, Any]:
        """Settings of the dead-letter producer: the connection and security ones only."""
        shared = ("security.", "sasl.", "ssl.", "client.", "socket.", "broker.")
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "enable.idempotence": True,
            **{k: v for k, v in self.kafka.items() if k.startswith(shared)},
        }


# ---------------------------------------------------------------------- metrics


class ConsumerMetrics:
    """Every family one consumer exports, on its own registry (one ``/metrics`` per member).

    Args:
        registry: where to register; a fresh ``CollectorRegistry()`` by default, so that
            several consumers in one process (tests) stay apart.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self.monitor = PrometheusMetrics(self.registry)
        specs = {spec.name: spec for spec in CONSUMER_METRICS}

        def counter(name: str) -> Counter:
            spec = specs[name]
            return Counter(spec.name, spec.help, spec.labels, registry=self.registry)

        self.messages = counter("oodmon_consumer_messages_total")
        self.rejected = counter("oodmon_consumer_rejected_total")
        self.dead_letters = counter("oodmon_consumer_dead_letters_total")
        self.join_evicted = counter("oodmon_consumer_join_evicted_total")
        self.commits = counter("oodmon_consumer_commits_total")
        lag = specs["oodmon_consumer_lag"]
        self.lag = Gauge(lag.name, lag.help, lag.labels, registry=self.registry)
        for reason in REJECT_REASONS:  # every reason at 0, so rate() sees the first one
            self.rejected.labels(reason)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        """Record the lag of one owned partition."""
        self.lag.labels(topic, str(partition)).set(lag)

    def forget_partition(self, topic: str, partition: int) -> None:
        """A partition moved to another member: its lag is that member's to report now."""
        with contextlib.suppress(KeyError):
            self.lag.remove(topic, str(partition))


# ---------------------------------------------------------------------- the consumer


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
    """One member of a consumer group that scores payload logs (see the module docstring).

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
        """Score one poll batch end to end and commit its offsets (see the module docstring)."""
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
