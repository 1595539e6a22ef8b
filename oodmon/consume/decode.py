"""Decode Kafka payload-log messages into inference requests and responses, or say why not.

Two layouts are read: CloudEvents (KServe's logger through a Knative KafkaSink, ``ce_*``
headers or structured mode) and Seldon Core v2 topics (``seldon.<namespace>.model.<name>.
inputs|outputs`` holding Open Inference Protocol JSON). Decoding never raises on bad input:
a message that cannot be used becomes a :class:`Rejected` with its reason, so that one poison
message never stalls a partition.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from oodmon.events import EventError, decode_event
from oodmon.oip import OIPError, parse_request, parse_response

__all__ = ["REJECT_REASONS", "KafkaEvent", "Rejected", "decode_message", "seldon_topic"]

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
