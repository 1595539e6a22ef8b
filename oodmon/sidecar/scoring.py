"""Decode, join, score and answer posted CloudEvents, with no HTTP connection in sight.

:class:`EventScorer` is the sidecar's work on a batch of posted events: a **request**'s
inputs are held in a bounded :class:`~oodmon.events.JoinBuffer` under its event id; a
**response** is routed to its model's monitor, and the responses of one route in a batch are
scored in one detector call; flagged rows reach the label queue with their inputs, in
whichever order request and response arrive. Every event gets an answer (a verdict as Open
Inference Protocol outputs, or an error that says what was expected), never an exception.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oodmon.events import (
    VERDICT_TYPE,
    EventError,
    InferenceEvent,
    JoinBuffer,
    decode_event,
    encode_event,
)
from oodmon.metrics import PrometheusMetrics
from oodmon.oip import OIPError, encode_verdict, parse_request, parse_response
from oodmon.sidecar._http import Answer, Forward, Headers, Refused, dumps, json_answer
from oodmon.sidecar.metrics import SidecarCounters
from oodmon.sidecar.routes import Route, RouteTable
from oodmon.verdict import HostVerdict, Observation

__all__ = ["EventScorer"]

logger = logging.getLogger("oodmon")


@dataclass(frozen=True)
class _Held:
    """A join-buffer entry: a request's inputs, or a response's flagged rows."""

    kind: str  # "request" or "response"
    inputs: Any = None
    route: Route | None = None
    observation: Observation | None = None


@dataclass(frozen=True)
class _Scorable:
    """A decoded response waiting to be scored with the others of its batch."""

    route: Route
    event: InferenceEvent
    outputs: np.ndarray
    reply_name: str
    reply_version: str
    inputs: Any
    request_seen: bool


class EventScorer:
    """Answer posted events: route, join and score them, and queue their flagged rows.

    Args:
        routes: the detectors, by model and version.
        metrics: the in-process metric families (shared with the routes' monitors).
        counters: the sidecar's own families (events, refusals, join evictions).
        output: the output tensor to score when a response holds several.
        input: the input tensor to keep for the label queue when a request holds several
            (default: the only one, else the first).
        join_entries: requests (and early flagged responses) held at most.
        join_seconds: seconds a request waits for its response at most.
        source: the CloudEvents ``source`` of verdict events.
        forward: build a verdict CloudEvent for each scored response (for ``--reply-url``).
    """

    def __init__(
        self,
        routes: RouteTable,
        metrics: PrometheusMetrics,
        counters: SidecarCounters,
        *,
        output: str | None = None,
        input: str | None = None,
        join_entries: int = 10_000,
        join_seconds: float = 30.0,
        source: str = "oodmon-sidecar",
        forward: bool = False,
    ) -> None:
        self.routes = routes
        self.metrics = metrics
        self.counters = counters
        self.output = output
        self.input = input
        self.source = source
        self.forward = forward
        self.join: JoinBuffer[_Held] = JoinBuffer(
            max_entries=join_entries, max_age=join_seconds, on_evict=self._on_evict
        )
        self._logged: set[str] = set()

    def handle(self, headers: Headers, body: bytes) -> tuple[Answer, Forward | None]:
        """Decode, score and answer one posted event (see :meth:`handle_batch`)."""
        return self.handle_batch([(headers, body)])[0]

    def handle_batch(
        self, messages: Sequence[tuple[Headers, bytes]]
    ) -> list[tuple[Answer, Forward | None]]:
        """Decode, score and answer posted events.

        Events that arrived together are decoded one by one, and the responses of one model
        are scored in ONE detector call: at batch 1 the fixed cost of a call (tensor setup,
        metric updates) is most of the work, so concurrent events share it.

        Returns, per message, the HTTP answer and the verdict CloudEvent to forward (or None).
        """
        results: list[tuple[Answer, Forward | None] | None] = [None] * len(messages)
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
        return [r if r is not None else (self.internal(RuntimeError("no answer")), None)
                for r in results]  # fmt: skip

    def internal(self, err: BaseException) -> Answer:
        """The 500 answer to a failure inside the sidecar (logged once, counted)."""
        self.log_once("internal", f"oodmon sidecar: failed on an event ({err!r}).", err)
        return self.refuse(500, "internal", f"The sidecar failed on this event: {err!r}.")

    def refuse(
        self, status: int, reason: str, message: str, extra: dict[str, Any] | None = None
    ) -> Answer:
        """An error answer, counted by ``reason`` (one of :data:`REJECT_REASONS`)."""
        self.counters.rejected.labels(reason).inc()
        return json_answer(status, {"error": message, **(extra or {})})

    def drain(self) -> None:
        """Queue every held flagged row (without inputs): its request will not come now."""
        for _, held in self.join.drain():
            if held.kind == "response" and held.route is not None and held.observation is not None:
                self._submit(held.route, held.observation)

    def log_once(self, key: str, message: str, exc_info: BaseException | None = None) -> None:
        """Log ``message`` the first time ``key`` comes up; later ones are only counted."""
        if key in self._logged:
            return
        self._logged.add(key)
        logger.warning(message, exc_info=exc_info)

    # ------------------------------------------------------------------ one event

    def _guarded(self, step: Callable[[], Any]) -> Any:
        """Run ``step``; turn what it raises into the error answer it deserves."""
        try:
            return step()
        except EventError as err:
            return self.refuse(400, err.reason, str(err)), None
        except Refused as err:
            extra = err.extra if isinstance(err.extra, dict) else {}
            return self.refuse(err.status, err.reason, str(err), extra), None
        except Exception as err:
            return self.internal(err), None

    def _prepare(self, headers: Headers, body: bytes) -> tuple[Answer, None] | _Scorable:
        event = decode_event(headers, body)
        self.counters.events.labels(event.kind).inc()
        if event.kind == "request":
            return self._on_request(event), None
        return self._on_response(event)

    def _on_request(self, event: InferenceEvent) -> Answer:
        try:
            payload = parse_request(event.data)
        except OIPError as err:
            raise Refused(400, "bad_payload", str(err)) from err
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
        return json_answer(202, {"id": event.id, "joined": joined})

    def _on_response(self, event: InferenceEvent) -> _Scorable:
        try:
            payload = parse_response(event.data)
        except OIPError as err:
            raise Refused(400, "bad_payload", str(err)) from err
        name = payload.model_name or _text(event.attributes.get("inferenceservicename"))
        route = self.routes.find(name, payload.model_version)
        try:
            output_name, outputs = payload.select(self.output)
        except OIPError as err:
            raise Refused(400, "bad_payload", str(err)) from err
        width = route.spec.detector.num_outputs
        if outputs.ndim == 1 and payload.protocol == "v2" and outputs.shape[0] == width:
            outputs = outputs[None, :]  # one unbatched row
        held = self.join.pop(event.id)
        request_seen = held is not None and held.kind == "request"
        shape_problem = _shape_problem(outputs, width, output_name)
        if shape_problem is not None:
            route.monitor.observe(outputs)  # counts the rows as invalid, as in-process
            raise Refused(422, *shape_problem)
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
    ) -> list[tuple[int, tuple[Answer, Forward | None]]]:
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

    def _answer(self, item: _Scorable, host: HostVerdict) -> tuple[Answer, Forward | None]:
        route, event = item.route, item.event
        self._flagged_to_queue(route, event.id, host, item.inputs, item.request_seen)
        reply = encode_verdict(
            host,
            route.identity,
            model_name=item.reply_name,
            model_version=item.reply_version,
            id=event.id,
        )
        forward = self._verdict_event(event, reply) if self.forward else None
        if host.invalid.any():
            rows = np.flatnonzero(host.invalid)
            raise Refused(
                422,
                "nonfinite",
                f"Expected finite model outputs, but {rows.size} of {len(host)} rows hold NaN or "
                f"inf (rows {rows[:10].tolist()}); they were counted as invalid, the other rows "
                "were scored (see outputs).",
                extra={k: reply[k] for k in ("model_name", "model_version", "id", "outputs")},
            )
        return Answer(200, dumps(reply)), forward

    def _verdict_event(self, event: InferenceEvent, reply: dict[str, Any]) -> Forward:
        return encode_event(VERDICT_TYPE, self.source, event.id, reply)

    def _inputs_of(self, tensors: dict[str, np.ndarray]) -> np.ndarray | None:
        if not tensors:
            return None
        if self.input is not None:
            return tensors.get(self.input)
        return next(iter(tensors.values()))

    # ------------------------------------------------------------------ the label queue

    def _flagged_to_queue(
        self, route: Route, event_id: str, host: HostVerdict, inputs: Any, request_seen: bool
    ) -> None:
        if route.writer is None:
            return
        flagged = np.flatnonzero(host.flag)
        if flagged.size == 0:
            return
        if inputs is not None and (inputs.ndim == 0 or inputs.shape[0] != len(host)):
            self.log_once(
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

    def _submit(self, route: Route, observation: Observation) -> None:
        writer = route.writer
        if writer is None:
            return
        try:
            dropped = writer.submit(observation)
            self.metrics.record_queue(
                route.spec.model, route.spec.version, writer.depth(), int(dropped or 0)
            )
        except Exception as err:  # the queue is a side channel: never fail the answer
            self.log_once("queue", f"oodmon sidecar: label queue failed ({err!r}).", err)

    def _on_evict(self, key: str, held: _Held, reason: str) -> None:
        self.counters.evicted.labels(held.kind, reason).inc()
        if held.kind == "response" and held.route is not None and held.observation is not None:
            self._submit(held.route, held.observation)  # the request never came: no input


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


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _raise(err: Exception) -> None:
    raise err
