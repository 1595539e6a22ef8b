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
never stops the sidecar. Decoding and scoring run on one worker thread, so a large batch
never holds the event loop; the label queue is written by a
:class:`~oodmon.label_queue.QueueWriter`, which never blocks the answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import os
import threading
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from queue import Full, Queue
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from oodmon.detector import Detector
from oodmon.events import (
    EVENT_REASONS,
    VERDICT_TYPE,
    EventError,
    InferenceEvent,
    JoinBuffer,
    decode_event,
    encode_event,
)
from oodmon.label_queue import QueueWriter
from oodmon.metrics import PrometheusMetrics
from oodmon.monitor import Monitor
from oodmon.oip import DetectorIdentity, OIPError, encode_verdict, parse_request, parse_response
from oodmon.verdict import HostVerdict, Observation

__all__ = [
    "DEFAULT_INLINE_BYTES",
    "DEFAULT_MAX_BODY_BYTES",
    "REJECT_REASONS",
    "SIDECAR_METRICS",
    "DetectorRoute",
    "Sidecar",
    "parse_detector_spec",
]

logger = logging.getLogger("oodmon")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Largest request body accepted (larger bodies get 413): 32 MiB holds a 32 x 100,000 float
#: batch as JSON text.
DEFAULT_MAX_BODY_BYTES = 32 * 2**20

#: Batches whose bodies add up to at most this many bytes are scored on the event loop (they
#: take about a millisecond); larger ones on the worker thread.
DEFAULT_INLINE_BYTES = 64 * 2**10

#: Why an event or request is refused (a closed set: these are metric labels).
REJECT_REASONS: tuple[str, ...] = (
    *EVENT_REASONS,
    "bad_payload",  # not an OIP / KServe v1 payload, a malformed tensor, or no such output
    "unknown_model",  # no detector for the event's model
    "wrong_shape",  # outputs that are not [N, K]
    "wrong_width",  # outputs whose K differs from the detector's
    "nonfinite",  # rows with NaN/inf outputs (scored as invalid; the rest are answered)
    "too_large",  # body over the size limit
    "not_found",  # a path the sidecar does not serve
    "method_not_allowed",
    "internal",  # a failure inside the sidecar (logged)
)

#: The sidecar's own metric families (besides :data:`oodmon.metrics.METRICS`).
SIDECAR_METRICS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        "oodmon_sidecar_events_total",
        "counter",
        ("type",),
        "Inference CloudEvents received and decoded, by kind (request, response).",
    ),
    (
        "oodmon_sidecar_rejected_total",
        "counter",
        ("reason",),
        "Requests answered with a 4xx/5xx error, by reason.",
    ),
    (
        "oodmon_sidecar_join_evicted_total",
        "counter",
        ("kind", "reason"),
        "Held requests (kind=request) or flagged responses waiting for their request "
        "(kind=response) evicted from the join buffer (reason full or expired).",
    ),
    (
        "oodmon_sidecar_join_entries",
        "gauge",
        (),
        "Entries held in the request/response join buffer.",
    ),
    (
        "oodmon_sidecar_forwarded_total",
        "counter",
        ("outcome",),
        "Verdict events forwarded to --reply-url (outcome ok, failed, dropped).",
    ),
)

_REPLY_BACKLOG = 1000
#: A worker batch ends at this many events or bytes of bodies (bounds its latency).
_MAX_BATCH_EVENTS = 256
_MAX_BATCH_BYTES = 8 * 2**20

_Forward = tuple[dict[str, str], bytes]


@dataclass(frozen=True)
class DetectorRoute:
    """Which events a detector scores, and the labels its metrics carry.

    Attributes:
        detector: the fitted detector.
        model: the ``model`` label (and the model name matched when ``match`` is True).
        version: the ``model_version`` label.
        match_version: only events of this model version (None: any version).
        default: the catch-all route for events naming no model, or a model with no route
            of its own (unless ``strict_default``).
    """

    detector: Detector
    model: str
    version: str
    match_version: str | None = None
    default: bool = False


def parse_detector_spec(spec: str) -> tuple[str | None, str | None, str]:
    """``PATH``, ``MODEL=PATH`` or ``MODEL:VERSION=PATH`` -> ``(model, version, path)``.

    Raises:
        ValueError: an empty model name or path.
    """
    model: str | None = None
    version: str | None = None
    path = spec
    head, sep, tail = spec.partition("=")
    if sep and head and os.sep not in head:
        model, _, version_text = head.partition(":")
        version = version_text or None
        path = tail
        if not model:
            raise ValueError(f"Expected --detector MODEL[:VERSION]=PATH, but got {spec!r}.")
    if not path:
        raise ValueError(
            f"Expected --detector PATH or MODEL[:VERSION]=PATH with a path, but got {spec!r}."
        )
    return model, version, path


@dataclass
class _Route:
    spec: DetectorRoute
    monitor: Monitor
    identity: DetectorIdentity
    writer: QueueWriter | None


@dataclass(frozen=True)
class _Held:
    """A join-buffer entry: a request's inputs, or a response's flagged rows."""

    kind: str  # "request" or "response"
    inputs: Any = None
    route: _Route | None = None
    observation: Observation | None = None


@dataclass(frozen=True)
class _Scorable:
    """A decoded response waiting to be scored with the others of its batch."""

    route: _Route
    event: InferenceEvent
    outputs: np.ndarray
    reply_name: str
    reply_version: str
    inputs: Any
    request_seen: bool


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    content_type: bytes = b"application/json"


class _Rejected(Exception):
    def __init__(self, status: int, reason: str, message: str, extra: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.extra = extra


class Sidecar:
    """The ASGI application: ``uvicorn.run(Sidecar(routes), ...)``.

    Args:
        routes: one :class:`DetectorRoute` per (model, version); at most one ``default``.
        registry: where metrics live (a fresh ``CollectorRegistry`` by default, so that
            ``/metrics`` shows only this sidecar).
        queue: label-queue URL or path for flagged rows (None: no queue).
        output: the output tensor to score when a response holds several.
        input: the input tensor to keep for the label queue when a request holds several
            (default: the only one, else the first).
        strict_default: the default route scores only events that name no model or its own
            model name, instead of every model without a route.
        max_body_bytes: larger bodies are refused with 413.
        reply_url: where to post each verdict as a CloudEvent (None: nowhere).
        join_entries: requests (and early flagged responses) held at most.
        join_seconds: seconds a request waits for its response at most.
        inline_bytes: batches of events whose bodies add up to at most this many bytes are
            scored on the event loop; larger ones on the worker thread (0: always the worker).
        source: the CloudEvents ``source`` of forwarded verdicts.

    Raises:
        ValueError: no routes, two routes for one model and version, or two defaults.
    """

    def __init__(
        self,
        routes: Sequence[DetectorRoute],
        *,
        registry: CollectorRegistry | None = None,
        queue: str | None = None,
        output: str | None = None,
        input: str | None = None,
        strict_default: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        reply_url: str | None = None,
        join_entries: int = 10_000,
        join_seconds: float = 30.0,
        inline_bytes: int = DEFAULT_INLINE_BYTES,
        source: str = "oodmon-sidecar",
    ) -> None:
        if not routes:
            raise ValueError("Expected at least one detector route, but got none.")
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int):
            raise ValueError(
                f"Expected `max_body_bytes` as an integer, but got {max_body_bytes!r}."
            )
        if max_body_bytes < 1:
            raise ValueError(f"Expected `max_body_bytes` >= 1, but got {max_body_bytes}.")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = PrometheusMetrics(self.registry)
        self.output = output
        self.input = input
        self.strict_default = strict_default
        self.max_body_bytes = max_body_bytes
        self.reply_url = reply_url
        self.inline_bytes = int(inline_bytes)
        self.source = source
        self._events = Counter(*_spec("oodmon_sidecar_events_total", self.registry))
        self._rejected = Counter(*_spec("oodmon_sidecar_rejected_total", self.registry))
        self._evicted = Counter(*_spec("oodmon_sidecar_join_evicted_total", self.registry))
        self._join_entries = Gauge(*_spec("oodmon_sidecar_join_entries", self.registry))
        self._forwarded = Counter(*_spec("oodmon_sidecar_forwarded_total", self.registry))
        for reason in REJECT_REASONS:  # every series exists at 0 from the first scrape
            self._rejected.labels(reason)
        for kind in ("request", "response"):
            self._events.labels(kind)
            for why in ("full", "expired"):
                self._evicted.labels(kind, why)
        for outcome in ("ok", "failed", "dropped"):
            self._forwarded.labels(outcome)

        self._routes: dict[tuple[str, str | None], _Route] = {}
        self._default: _Route | None = None
        for spec in routes:
            self._add_route(spec, queue)
        self.join: JoinBuffer[_Held] = JoinBuffer(
            max_entries=join_entries, max_age=join_seconds, on_evict=self._on_evict
        )
        # one worker: scoring is CPU-bound (the GIL), and one thread keeps order and caches warm
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="oodmon-sidecar")
        self._replies: Queue[tuple[dict[str, str], bytes] | None] | None = None
        self._reply_thread: threading.Thread | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._waiting: deque[tuple[Sequence[tuple[bytes, bytes]], bytes, asyncio.Future[Any]]]
        self._waiting = deque()
        self._waiting_bytes = 0
        self._busy = False
        self._scheduled = False
        self._ready = False
        self._closed = False
        self._logged: set[str] = set()

    # ------------------------------------------------------------------ routes

    def _add_route(self, spec: DetectorRoute, queue_url: str | None) -> None:
        key = (spec.model, spec.match_version)
        if spec.default:
            if self._default is not None:
                raise ValueError(
                    "Expected at most one default --detector PATH (without MODEL=), but got two."
                )
        elif key in self._routes:
            raise ValueError(
                f"Expected one detector per model and version, but got two for "
                f"{spec.model}{':' + spec.match_version if spec.match_version else ''}."
            )
        detector = spec.detector
        writer = (
            QueueWriter(queue_url, calibration=detector.calibration_hash_)
            if queue_url is not None
            else None
        )
        monitor = Monitor(detector, spec.model, spec.version, metrics=self.metrics)
        identity = DetectorIdentity(
            score=detector.score,
            alpha=detector.alpha,
            calibration_hash=detector.calibration_hash_,
            model=spec.model,
            model_version=spec.version,
        )
        route = _Route(spec, monitor, identity, writer)
        if spec.default:
            self._default = route
        else:
            self._routes[key] = route

    def _route_for(self, name: str | None, version: str | None) -> _Route:
        if name is not None:
            route = self._routes.get((name, version)) or self._routes.get((name, None))
            if route is not None:
                return route
        default = self._default
        if default is not None and (
            name is None or not self.strict_default or name == default.spec.model
        ):
            return default
        known = sorted({model for model, _ in self._routes})
        if default is not None:
            known.append(default.spec.model)
        raise _Rejected(
            404,
            "unknown_model",
            f"Expected an event for a model with a detector ({', '.join(known)}), but got "
            + (
                f"model {name!r}" + (f" version {version!r}" if version else "")
                if name is not None
                else "an event that names no model (no model_name, no inferenceservicename)"
            )
            + ": start the sidecar with --detector MODEL=PATH for it.",
        )

    @property
    def models(self) -> list[tuple[str, str]]:
        """The (model, version) labels of every route."""
        routes = [*self._routes.values(), *([self._default] if self._default else [])]
        return [(r.spec.model, r.spec.version) for r in routes]

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection (HTTP requests and the lifespan protocol)."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/":
            if method != "POST":
                await self._reject(
                    send,
                    405,
                    "method_not_allowed",
                    f"Expected POST / with a CloudEvent, but got {method} /.",
                )
                return
            await self._post_event(scope, receive, send)
        elif path in ("/metrics", "/healthz", "/ready"):
            if method not in ("GET", "HEAD"):
                await self._reject(
                    send,
                    405,
                    "method_not_allowed",
                    f"Expected GET {path}, but got {method} {path}.",
                )
                return
            if path == "/metrics":
                self._join_entries.set(len(self.join))
                await _send(
                    send, _Answer(200, generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())
                )
            elif path == "/healthz":
                await _send(send, _json(200, {"status": "ok"}))
            else:
                status = 200 if self._ready and not self._closed else 503
                await _send(
                    send,
                    _json(
                        status, {"ready": status == 200, "models": [list(m) for m in self.models]}
                    ),
                )
        else:
            await self._reject(
                send,
                404,
                "not_found",
                f"Expected one of POST /, GET /metrics, GET /healthz, GET /ready, "
                f"but got {method} {path}.",
            )

    async def _post_event(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        declared = _content_length(headers)
        if declared is not None and declared > self.max_body_bytes:
            await self._reject(send, 413, "too_large", self._too_large(declared))
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reject(send, 413, "too_large", self._too_large(size, at_least=True))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[_Answer, _Forward | None]] = loop.create_future()
        self._waiting.append((headers, body, future))
        self._waiting_bytes += len(body)
        if not self._busy and not self._scheduled:
            # let every event already read in this loop iteration join the batch first
            self._scheduled = True
            loop.call_soon(self._dispatch, loop)
        answer, forward = await future
        await _send(send, answer)
        if forward is not None:
            self._forward(forward)

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Score the waiting events as one batch (called on the event loop).

        Events that arrive while a batch is scored wait for the next one: batches grow with
        load, and an idle sidecar answers at once. Small batches are handled right here, on
        the event loop: handing them to the worker thread costs more than they take (two
        thread switches per batch, each fighting for the GIL on a busy machine). Batches with
        large bodies go to the worker, so that decoding megabytes never holds the loop.
        """
        self._scheduled = False
        if self._busy or not self._waiting:
            return
        batch: list[tuple[Sequence[tuple[bytes, bytes]], bytes, asyncio.Future[Any]]] = []
        size = 0
        while self._waiting and (
            not batch or (len(batch) < _MAX_BATCH_EVENTS and size < _MAX_BATCH_BYTES)
        ):
            item = self._waiting.popleft()
            size += len(item[1])
            batch.append(item)
        self._waiting_bytes -= size
        messages = [(headers, body) for headers, body, _ in batch]
        if size <= self.inline_bytes:
            try:
                results = self.handle_batch(messages)
            except Exception as err:
                results = [(self._internal(err), None)] * len(batch)
            for (*_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
            if self._waiting and not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._dispatch, loop)
            return
        self._busy = True
        try:
            work = loop.run_in_executor(self._pool, self.handle_batch, messages)
        except RuntimeError:  # the pool was shut down: the server is stopping
            self._busy = False
            for *_, future in batch:
                if not future.done():
                    future.set_result((_json(503, {"error": "The sidecar is shutting down."}),
                                       None))  # fmt: skip
            return
        work.add_done_callback(lambda done: self._batch_done(loop, batch, done))

    def _batch_done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[Any, bytes, asyncio.Future[Any]]],
        done: asyncio.Future[list[tuple[_Answer, _Forward | None]]],
    ) -> None:
        self._busy = False
        error = done.exception()
        for index, (*_, future) in enumerate(batch):
            if future.done():
                continue
            if error is not None:
                future.set_result((self._internal(error), None))  # type: ignore[arg-type]
            else:
                future.set_result(done.result()[index])
        if self._waiting and not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch, loop)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        return (
            f"Expected a body of at most {self.max_body_bytes} bytes (--max-body-bytes), but "
            f"got {'more than ' if at_least else ''}{size if not at_least else self.max_body_bytes}"
            " bytes: send smaller batches or raise the limit."
        )

    async def _reject(self, send: Send, status: int, reason: str, message: str) -> None:
        self._rejected.labels(reason).inc()
        await _send(send, _json(status, {"error": message}))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
                self._ready = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._ready = False
                if self._sweeper is not None:
                    self._sweeper.cancel()
                await asyncio.get_running_loop().run_in_executor(None, self.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _sweep(self) -> None:
        """Expire old join entries even when no event comes (their flags must reach the queue)."""
        period = min(1.0, self.join.max_age / 4)
        while True:
            await asyncio.sleep(period)
            self.join.expire()

    # ------------------------------------------------------------------ one event (worker)

    def handle(
        self, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> tuple[_Answer, _Forward | None]:
        """Decode, score and answer one posted event (see :meth:`handle_batch`)."""
        return self.handle_batch([(headers, body)])[0]

    def handle_batch(
        self, messages: Sequence[tuple[Sequence[tuple[bytes, bytes]], bytes]]
    ) -> list[tuple[_Answer, _Forward | None]]:
        """Decode, score and answer posted events (runs on the worker thread).

        Events that arrived together are decoded one by one, and the responses of one model
        are scored in ONE detector call: at batch 1 the fixed cost of a call (tensor setup,
        metric updates) is most of the work, so concurrent events share it.

        Returns, per message, the HTTP answer and the verdict CloudEvent to forward (or None).
        """
        results: list[tuple[_Answer, _Forward | None] | None] = [None] * len(messages)
        groups: dict[int, list[tuple[int, _Scorable]]] = {}
        for i, (headers, body) in enumerate(messages):
            prepared = self._guarded(functools.partial(self._prepare, headers, body))
            if isinstance(prepared, _Scorable):
                groups.setdefault(id(prepared.route), []).append((i, prepared))
            else:
                results[i] = prepared
        for items in groups.values():
            try:
                for i, answer in self._score(items):
                    results[i] = answer
            except Exception as err:
                for i, _ in items:
                    results[i] = self._guarded(functools.partial(_raise, err))
        return [r if r is not None else (self._internal(RuntimeError("no answer")), None)
                for r in results]  # fmt: skip

    def _guarded(self, step: Callable[[], Any]) -> Any:
        """Run ``step``; turn what it raises into the error answer it deserves."""
        try:
            return step()
        except EventError as err:
            return self._refuse(400, err.reason, str(err)), None
        except _Rejected as err:
            extra = err.extra if isinstance(err.extra, dict) else {}
            return self._refuse(err.status, err.reason, str(err), extra), None
        except Exception as err:
            return self._internal(err), None

    def _internal(self, err: Exception) -> _Answer:
        self._log_once("internal", f"oodmon sidecar: failed on an event ({err!r}).", err)
        return self._refuse(500, "internal", f"The sidecar failed on this event: {err!r}.")

    def _refuse(
        self, status: int, reason: str, message: str, extra: dict[str, Any] | None = None
    ) -> _Answer:
        self._rejected.labels(reason).inc()
        return _json(status, {"error": message, **(extra or {})})

    def _prepare(
        self, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> tuple[_Answer, None] | _Scorable:
        event = decode_event(headers, body)
        self._events.labels(event.kind).inc()
        if event.kind == "request":
            return self._on_request(event), None
        return self._on_response(event)

    def _on_request(self, event: InferenceEvent) -> _Answer:
        try:
            payload = parse_request(event.data)
        except OIPError as err:
            raise _Rejected(400, "bad_payload", str(err)) from err
        inputs = self._inputs_of(payload.tensors)
        held = self.join.pop(event.id)
        if held is not None and held.kind == "response":
            # the response came first and had flagged rows: they reach the queue now, with inputs
            if held.route is not None and held.observation is not None:
                self._submit(held.route, _with_inputs(held.observation, inputs))
            joined = True
        else:
            self.join.put(event.id, _Held("request", inputs=inputs))
            joined = False
        return _json(202, {"id": event.id, "joined": joined})

    def _on_response(self, event: InferenceEvent) -> _Scorable:
        try:
            payload = parse_response(event.data)
        except OIPError as err:
            raise _Rejected(400, "bad_payload", str(err)) from err
        name = payload.model_name or _text(event.attributes.get("inferenceservicename"))
        route = self._route_for(name, payload.model_version)
        try:
            output_name, outputs = payload.select(self.output)
        except OIPError as err:
            raise _Rejected(400, "bad_payload", str(err)) from err
        width = route.spec.detector.num_outputs
        if outputs.ndim == 1 and payload.protocol == "v2" and outputs.shape[0] == width:
            outputs = outputs[None, :]  # one unbatched row
        held = self.join.pop(event.id)
        request_seen = held is not None and held.kind == "request"
        shape_problem = _shape_problem(outputs, width, output_name)
        if shape_problem is not None:
            route.monitor.observe(outputs)  # counts the rows as invalid, as in-process
            raise _Rejected(422, *shape_problem)
        return _Scorable(
            route=route,
            event=event,
            outputs=outputs,
            reply_name=name or route.spec.model,
            reply_version=payload.model_version or route.spec.version,
            inputs=held.inputs if held is not None and request_seen else None,
            request_seen=request_seen,
        )

    def _score(
        self, items: list[tuple[int, _Scorable]]
    ) -> list[tuple[int, tuple[_Answer, _Forward | None]]]:
        """Score the responses of one route together and answer each."""
        route = items[0][1].route
        parts = [item.outputs for _, item in items]
        outputs = parts[0] if len(parts) == 1 else np.concatenate(parts)
        verdict = route.monitor.observe(outputs)
        if verdict is None:
            raise RuntimeError("scoring failed; see the sidecar's log")
        host = verdict.to_host()
        answers = []
        start = 0
        for i, item in items:
            stop = start + item.outputs.shape[0]
            rows = host if len(items) == 1 else host.take(np.arange(start, stop))
            start = stop
            answers.append((i, self._guarded(functools.partial(self._answer, item, rows))))
        return answers

    def _answer(self, item: _Scorable, host: HostVerdict) -> tuple[_Answer, _Forward | None]:
        route, event = item.route, item.event
        self._flagged_to_queue(route, event.id, host, item.inputs, item.request_seen)
        reply = encode_verdict(
            host,
            route.identity,
            model_name=item.reply_name,
            model_version=item.reply_version,
            id=event.id,
        )
        forward = self._verdict_event(event, reply) if self.reply_url else None
        if host.invalid.any():
            rows = np.flatnonzero(host.invalid)
            raise _Rejected(
                422,
                "nonfinite",
                f"Expected finite model outputs, but {rows.size} of {len(host)} rows hold NaN or "
                f"inf (rows {rows[:10].tolist()}); they were counted as invalid, the other rows "
                "were scored (see outputs).",
                extra={k: reply[k] for k in ("model_name", "model_version", "id", "outputs")},
            )
        return _Answer(200, _dumps(reply)), forward

    def _inputs_of(self, tensors: dict[str, np.ndarray]) -> np.ndarray | None:
        if not tensors:
            return None
        if self.input is not None:
            return tensors.get(self.input)
        return next(iter(tensors.values()))

    def _flagged_to_queue(
        self, route: _Route, event_id: str, host: HostVerdict, inputs: Any, request_seen: bool
    ) -> None:
        if route.writer is None:
            return
        flagged = np.flatnonzero(host.flag)
        if flagged.size == 0:
            return
        if inputs is not None and (inputs.ndim == 0 or inputs.shape[0] != len(host)):
            self._log_once(
                "inputs",
                f"oodmon sidecar: a request's inputs have {inputs.shape[:1]} rows but "
                f"its response has {len(host)}; flagged rows are queued without inputs.",
            )
            inputs = None
        observation = Observation(
            model=route.spec.model,
            version=route.spec.version,
            verdict=host,
            inputs=inputs,
            ids=[f"{event_id}/{i}" for i in range(len(host))],
        ).take(flagged)
        if not request_seen:
            # the request may still come: hold the flagged rows for it (bounded, counted)
            self.join.put(event_id, _Held("response", route=route, observation=observation))
        else:
            self._submit(route, observation)

    def _submit(self, route: _Route, observation: Observation) -> None:
        writer = route.writer
        if writer is None:
            return
        try:
            dropped = writer.submit(observation)
            self.metrics.record_queue(
                route.spec.model, route.spec.version, writer.depth(), int(dropped or 0)
            )
        except Exception as err:  # the queue is a side channel: never fail the answer
            self._log_once("queue", f"oodmon sidecar: label queue failed ({err!r}).", err)

    def _on_evict(self, key: str, held: _Held, reason: str) -> None:
        self._evicted.labels(held.kind, reason).inc()
        if held.kind == "response" and held.route is not None and held.observation is not None:
            self._submit(held.route, held.observation)  # the request never came: no input

    # ------------------------------------------------------------------ forwarding

    def _verdict_event(self, event: InferenceEvent, reply: dict[str, Any]) -> _Forward:
        return encode_event(VERDICT_TYPE, self.source, event.id, reply)

    def _forward(self, message: tuple[dict[str, str], bytes]) -> None:
        if self._replies is None:
            self._replies = Queue(_REPLY_BACKLOG)
            self._reply_thread = threading.Thread(
                target=self._send_replies, name="oodmon-sidecar-reply", daemon=True
            )
            self._reply_thread.start()
        try:
            self._replies.put_nowait(message)
        except Full:
            self._forwarded.labels("dropped").inc()

    def _send_replies(self) -> None:
        assert self._replies is not None and self.reply_url is not None
        while (message := self._replies.get()) is not None:
            headers, body = message
            request = urllib.request.Request(self.reply_url, body, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
                self._forwarded.labels("ok").inc()
            except Exception as err:
                self._forwarded.labels("failed").inc()
                self._log_once(
                    "reply",
                    f"oodmon sidecar: forwarding to {self.reply_url} "
                    f"failed ({err!r}); further failures are counted.",
                )

    # ------------------------------------------------------------------ shutdown

    def close(self, timeout: float = 10.0) -> None:
        """Queue held flagged rows (without inputs), flush the label queue, stop threads."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        for _, held in self.join.drain():
            if held.kind == "response" and held.route is not None and held.observation is not None:
                self._submit(held.route, held.observation)
        routes = [*self._routes.values(), *([self._default] if self._default else [])]
        for route in routes:
            route.monitor.close()
            if route.writer is not None:
                route.writer.close(timeout)
        if self._replies is not None and self._reply_thread is not None:
            self._replies.put(None)
            self._reply_thread.join(timeout)

    def _log_once(self, key: str, message: str, exc_info: BaseException | None = None) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        logger.warning(message, exc_info=exc_info)

    def __repr__(self) -> str:
        return f"Sidecar(models={self.models}, join={self.join!r})"


# ---------------------------------------------------------------------- helpers


def _spec(name: str, registry: CollectorRegistry) -> tuple[Any, ...]:
    for family, _, labels, help_text in SIDECAR_METRICS:
        if family == name:
            metric = family.removesuffix("_total")
            return metric, help_text, labels, "", "", "", registry
    raise KeyError(name)


def _shape_problem(outputs: np.ndarray, width: int, name: str) -> tuple[str, str] | None:
    if outputs.ndim != 2:
        return "wrong_shape", (
            f"Expected output {name!r} of shape [N, {width}], but got shape "
            f"{list(outputs.shape)}; choose the logits output with --output NAME."
        )
    if outputs.shape[1] != width:
        return "wrong_width", (
            f"Expected output {name!r} with {width} columns (the detector's width), but got "
            f"{outputs.shape[1]}: is this the model the detector was calibrated for?"
        )
    return None


def _with_inputs(observation: Observation, inputs: Any) -> Observation:
    if inputs is None:
        return observation
    ids = observation.ids or []
    rows = [int(str(i).rsplit("/", 1)[1]) for i in ids]
    if inputs.ndim == 0 or max(rows, default=-1) >= inputs.shape[0]:
        return observation
    return Observation(
        model=observation.model,
        version=observation.version,
        verdict=observation.verdict,
        invalid_reasons=observation.invalid_reasons,
        scoring_seconds=observation.scoring_seconds,
        inputs=inputs[np.asarray(rows, dtype=np.int64)],
        ids=observation.ids,
        timestamp=observation.timestamp,
    )


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


def _json(status: int, payload: Any) -> _Answer:
    return _Answer(status, _dumps(payload))


async def _send(send: Send, answer: _Answer) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": [
                (b"content-type", answer.content_type),
                (b"content-length", str(len(answer.body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": answer.body})


def _raise(err: Exception) -> None:
    raise err
