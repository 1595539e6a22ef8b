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
are not supported yet; configure the servers to log JS

The package's rooms: :mod:`~oodmon.consume.decode` (Kafka messages -> events or rejections),
:mod:`~oodmon.consume.config` (:class:`ConsumeConfig`),
:mod:`~oodmon.consume.metrics` (the consumer's metric families), and
:mod:`~oodmon.consume.consumer` (:class:`ScoringConsumer`, the poll-score-commit loop).
"""

from oodmon.consume.config import ConsumeConfig
from oodmon.consume.consumer import (
    DEFAULT_VERSION,
    BatchResult,
    QueueRefusedError,
    ScoringConsumer,
)
from oodmon.consume.decode import REJECT_REASONS, KafkaEvent, Rejected, decode_message, seldon_topic
from oodmon.consume.metrics import CONSUMER_METRICS, ConsumerMetrics, consumer_metrics_table

__all__ = [
    "CONSUMER_METRICS",
    "DEFAULT_VERSION",
    "REJECT_REASONS",
    "BatchResult",
    "ConsumeConfig",
    "ConsumerMetrics",
    "KafkaEvent",
    "QueueRefusedError",
    "Rejected",
    "ScoringConsumer",
    "consumer_metrics_table",
    "decode_message",
    "seldon_topic",
]
