"""The sidecar: an ASGI receiver that monitors a model server from outside, off its path.

A model server's payload logger (KServe's ``logger: {mode: all, url: ...}``) posts every
inference request and response as a CloudEvent. :class:`Sidecar` receives them on ``POST /``:

* a **response** is routed by its model name and version to that model's
  :class:`~oodmon.monitor.Monitor` and scored; the HTTP answer carries the verdict as Open
  Inference Protocol outputs (``is_outlier``, ``instance_score``, ``p_value``, ``distance``),
  so the same endpoint also serves as a synchronous detector, and ``reply_url`` optionally
  receives the verdict as a CloudEvent;
* a **request** is held in a bounded :class:`~oodmon.events.JoinBuffer` under its event id
  (KServe gives request and response the same id), so that a flagged response reaches the
  label queue **with its input**, in whichever order the two arrive. Flagged rows whose
  request never comes are queued without input when the buffer evicts them.

``GET /metrics`` exposes the same families as an in-process Monitor
(:class:`~oodmon.metrics.PrometheusMetrics`) plus the sidecar's own counters, on a registry of
its own; ``GET /healthz`` and ``GET /ready`` answer probes. Bad input gets a 4xx
``{"error": "..."}`` that says what was expected and what came, is counted by reason, and
never stops the sidecar. Small batches (up to ``inline_bytes`` of bodies) are decoded and
scored on the event loop, larger ones on one worker thread, so a large batch never holds the
loop; the label queue is written by a :class:`~oodmon.label_queue.QueueWriter`, which never
blocks the answer.

The package's rooms: :mod:`~oodmon.sidecar.app` (the ASGI application: connections, batching,
probes, forwarding), :mod:`~oodmon.sidecar.routes` (which detector scores an event),
:mod:`~oodmon.sidecar.scoring` (decode, join, score and answer events),
:mod:`~oodmon.sidecar.metrics` (its own metric families and refusal reasons), and the private
``_http`` (ASGI types, answers, refusals, bounded request bodies).
"""

from oodmon.sidecar.app import DEFAULT_INLINE_BYTES, DEFAULT_MAX_BODY_BYTES, Sidecar
from oodmon.sidecar.metrics import REJECT_REASONS, SIDECAR_METRICS
from oodmon.sidecar.routes import DetectorRoute, parse_detector_spec

__all__ = [
    "DEFAULT_INLINE_BYTES",
    "DEFAULT_MAX_BODY_BYTES",
    "REJECT_REASONS",
    "SIDECAR_METRICS",
    "DetectorRoute",
    "Sidecar",
    "parse_detector_spec",
]
