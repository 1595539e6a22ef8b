"""CloudEvents from model servers' payload loggers, and the request/response join.

KServe's payload logger (``logger: {mode: all, url: ...}``) posts every inference request and
response as a CloudEvent 1.0 of type ``org.kubeflow.serving.inference.request`` or
``...response``; request and response share the event ``id``. Over HTTP the attributes travel
in ``ce-*`` headers (binary mode) or inside an ``application/cloudevents+json`` body
(structured mode); through a Knative KafkaSink they travel in ``ce_*`` Kafka headers.

:func:`decode_event` parses both modes and both transports with the maintained ``cloudevents``
SDK (2.x ``cloudevents.core``, or the 1.x API where only that is installed) and classifies the
event; :class:`JoinBuffer` pairs requests with responses by id in either order, bounded in
entries and in seconds, counting what it evicts. The HTTP sidecar and the Kafka consumer share
both. Import cost: the SDK is imported on first use, not with this module.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from oodmon.errors import OodmonError

__all__ = [
    "EVENT_REASONS",
    "EVENT_TYPES",
    "HEADER_PREFIXES",
    "REQUEST_TYPE",
    "RESPONSE_TYPE",
    "VERDICT_TYPE",
    "EventError",
    "EventKind",
    "InferenceEvent",
    "JoinBuffer",
    "decode_event",
    "encode_event",
    "sdk_api",
]

#: KServe's payload logger event types.
REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
#: The type of the verdict events the sidecar forwards (the type Seldon's outlier detector
#: servers answer with, so existing consumers recognise it).
VERDICT_TYPE = "io.seldon.serving.inference.outlier"

EventKind = Literal["request", "response"]

#: Event type -> kind. Seldon Core v1's request logger uses its own names for the same events.
EVENT_TYPES: dict[str, EventKind] = {
    REQUEST_TYPE: "request",
    RESPONSE_TYPE: "response",
    "io.seldon.serving.inference.request": "request",
    "io.seldon.serving.inference.response": "response",
}

#: Attribute header prefix -> transport binding: ``ce-`` for HTTP, ``ce_`` for Kafka.
HEADER_PREFIXES: dict[str, str] = {"ce-": "http", "ce_": "kafka"}

#: Why an event is refused (a closed set: these become metric labels).
EVENT_REASONS = (
    "malformed_json",  # the body (or structured envelope) is not valid JSON
    "missing_attribute",  # a required CloudEvents attribute (id, source, type, ...) is missing
    "invalid_event",  # attributes present but invalid, or not a CloudEvent at all
    "unknown_type",  # a CloudEvent, but not an inference request or response
)

_REQUIRED = ("id", "source", "specversion", "type")
_STRUCTURED = "application/cloudevents+json"


class EventError(OodmonError, ValueError):
    """An event that cannot be used; ``reason`` is one of :data:`EVENT_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class InferenceEvent:
    """One decoded inference request or response event.

    Attributes:
        kind: ``"request"`` or ``"response"``.
        id: the event id (request and response of one inference share it).
        type: the CloudEvents type.
        source: the CloudEvents source.
        data: the decoded JSON body (an OIP or KServe v1 payload).
        attributes: every attribute, extensions included (KServe adds
            ``inferenceservicename``, ``namespace``, ``component``, ``endpoint``).
        mode: ``"binary"`` or ``"structured"``.
    """

    kind: EventKind
    id: str
    type: str
    source: str
    data: Any
    attributes: dict[str, Any] = field(default_factory=dict)
    mode: Literal["binary", "structured"] = "binary"


# ---------------------------------------------------------------------- decoding


def decode_event(
    headers: Mapping[str, str | bytes] | Iterable[tuple[str | bytes, str | bytes]],
    body: bytes,
    *,
    header_prefix: str = "ce-",
) -> InferenceEvent:
    """Parse and classify an inference CloudEvent in binary or structured mode.

    Args:
        headers: the message headers (names in any case; values ``str`` or ``bytes``).
        body: the message body.
        header_prefix: ``"ce-"`` for HTTP, ``"ce_"`` for Kafka (:data:`HEADER_PREFIXES`).

    Returns:
        The event with its JSON data decoded.

    Raises:
        EventError: not a CloudEvent, malformed JSON, a missing attribute, or a type that is
            not an inference request or response (``reason`` says which).
        ValueError: an unknown ``header_prefix``.
    """
    if header_prefix not in HEADER_PREFIXES:
        raise ValueError(
            f"Expected `header_prefix` to be one of {sorted(HEADER_PREFIXES)}, "
            f"but got {header_prefix!r}."
        )
    named = _header_dict(headers)
    binary = any(name.startswith(header_prefix) for name in named)
    content_type = named.get("content-type", "")
    if not binary and not content_type.startswith(_STRUCTURED):
        raise EventError(
            "missing_attribute",
            f"Expected a CloudEvent: {header_prefix}specversion, {header_prefix}id, "
            f"{header_prefix}source and {header_prefix}type headers (binary mode) or "
            f"Content-Type {_STRUCTURED} (structured mode), but got no {header_prefix}* "
            f"headers and Content-Type {content_type or 'none'!r}.",
        )
    if binary:
        missing = [a for a in _REQUIRED if header_prefix + a not in named]
        if missing:
            raise EventError(
                "missing_attribute",
                f"Expected binary-mode headers {', '.join(header_prefix + a for a in _REQUIRED)}"
                f", but {', '.join(header_prefix + a for a in missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing.",
            )
    event = _sdk_decode(named, body, HEADER_PREFIXES[header_prefix], binary)
    attributes, data = event
    if binary and isinstance(data, (str, bytes)):
        # the SDK hands back undecodable JSON as text: say what was wrong with it
        _raise_json_error(data, "body")
    type_ = str(attributes.get("type", ""))
    kind = EVENT_TYPES.get(type_)
    if kind is None:
        raise EventError(
            "unknown_type",
            f"Expected an event of type {REQUEST_TYPE} or {RESPONSE_TYPE} (a model server's "
            f"payload logger), but got type {type_!r}.",
        )
    return InferenceEvent(
        kind=kind,
        id=str(attributes["id"]),
        type=type_,
        source=str(attributes.get("source", "")),
        data=data,
        attributes=attributes,
        mode="binary" if binary else "structured",
    )


def encode_event(
    type: str,
    source: str,
    id: str,
    data: Mapping[str, Any],
    *,
    header_prefix: str = "ce-",
    extensions: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], bytes]:
    """A binary-mode CloudEvent with a JSON body, as ``(headers, body)``, through the SDK.

    Raises:
        ValueError: an unknown ``header_prefix``, or attributes the SDK refuses.
    """
    if header_prefix not in HEADER_PREFIXES:
        raise ValueError(
            f"Expected `header_prefix` to be one of {sorted(HEADER_PREFIXES)}, "
            f"but got {header_prefix!r}."
        )
    attributes = {
        "type": type,
        "source": source,
        "id": id,
        "specversion": "1.0",
        "datacontenttype": "application/json",
        **(extensions or {}),
    }
    return _sdk_encode(attributes, dict(data), HEADER_PREFIXES[header_prefix])


def sdk_api() -> str:
    """Which cloudevents SDK API is in use: ``"core"`` (2.x) or ``"v1"`` (the 1.x API)."""
    return _binding().api


# ---------------------------------------------------------------------- the SDK, either API


@dataclass(frozen=True)
class _Binding:
    api: str
    decode: Callable[[dict[str, str], bytes, str, bool], Any]
    encode: Callable[[dict[str, Any], dict[str, Any], str], tuple[dict[str, str], bytes]]
    attributes: Callable[[Any], dict[str, Any]]
    data: Callable[[Any], Any]


_binding_cache: list[_Binding] = []


def _binding(prefer: str | None = None) -> _Binding:
    """The SDK's 2.x ``cloudevents.core`` API when installed, else its 1.x API (which 2.x
    keeps under ``cloudevents.v1`` and 1.x has at the top level)."""
    if prefer is None and _binding_cache:
        return _binding_cache[0]
    binding = None
    if prefer in (None, "core"):
        try:
            binding = _core_binding()
        except ImportError:
            if prefer == "core":
                raise
    if binding is None:
        binding = _v1_binding()
    if prefer is None:
        _binding_cache.append(binding)
    return binding


def _core_binding() -> _Binding:
    from cloudevents.core.bindings import http as ce_http
    from cloudevents.core.bindings import kafka as ce_kafka
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent

    fmt = JSONFormat()

    def decode(headers: dict[str, str], body: bytes, transport: str, binary: bool) -> Any:
        if transport == "kafka":
            message = ce_kafka.KafkaMessage(
                headers={k: v.encode() for k, v in headers.items()}, key=None, value=body
            )
            read = ce_kafka.from_binary if binary else ce_kafka.from_structured
            return read(message, fmt)
        read_http = ce_http.from_binary if binary else ce_http.from_structured
        return read_http(ce_http.HTTPMessage(headers=headers, body=body), fmt)

    def encode(
        attributes: dict[str, Any], data: dict[str, Any], transport: str
    ) -> tuple[dict[str, str], bytes]:
        event = CloudEvent(attributes=attributes, data=data)
        if transport == "kafka":
            message = ce_kafka.to_binary(event, fmt)
            headers = {
                k: v.decode() if isinstance(v, bytes) else v for k, v in message.headers.items()
            }
            return headers, message.value
        http_message = ce_http.to_binary(event, fmt)
        return dict(http_message.headers), http_message.body

    return _Binding(
        "core", decode, encode, lambda e: dict(e.get_attributes()), lambda e: e.get_data()
    )


def _v1_binding() -> _Binding:
    try:
        ce_http = importlib.import_module("cloudevents.v1.http")
        ce_kafka = importlib.import_module("cloudevents.v1.kafka")
        conversion = importlib.import_module("cloudevents.v1.conversion")
    except ImportError:  # cloudevents 1.x has the same modules at the top level
        ce_http = importlib.import_module("cloudevents.http")
        ce_kafka = importlib.import_module("cloudevents.kafka")
        conversion = importlib.import_module("cloudevents.conversion")

    def decode(headers: dict[str, str], body: bytes, transport: str, binary: bool) -> Any:
        if transport == "kafka":
            message = ce_kafka.KafkaMessage(
                headers={k: v.encode() for k, v in headers.items()}, key=None, value=body
            )
            read = ce_kafka.from_binary if binary else ce_kafka.from_structured
            return read(message)
        return ce_http.from_http(headers, body)

    def encode(
        attributes: dict[str, Any], data: dict[str, Any], transport: str
    ) -> tuple[dict[str, str], bytes]:
        event = ce_http.CloudEvent(attributes, data)
        if transport == "kafka":
            message = ce_kafka.to_binary(event)
            headers = {k: bytes(v).decode() for k, v in message.headers.items()}
            return headers, bytes(message.value)
        http_headers, body = conversion.to_binary(event)
        return dict(http_headers), bytes(body)

    return _Binding("v1", decode, encode, lambda e: dict(e.get_attributes()), lambda e: e.data)


def _sdk_decode(
    headers: dict[str, str], body: bytes, transport: str, binary: bool
) -> tuple[dict[str, Any], Any]:
    binding = _binding()
    try:
        event = binding.decode(headers, body, transport, binary)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EventError(
            "malformed_json",
            f"Expected a structured-mode CloudEvent as a JSON object, but the body is not "
            f"valid JSON: {err}.",
        ) from err
    except Exception as err:  # the SDK's own exception classes differ between its APIs
        if not binary and _json_problem(body) is not None:
            _raise_json_error(body, "structured-mode body")
        reason = "missing_attribute" if "missing" in f"{err!r} {err}".lower() else "invalid_event"
        raise EventError(
            reason,
            f"Expected a valid CloudEvent with attributes {', '.join(_REQUIRED)}, but the "
            f"cloudevents SDK refused it: {_sdk_message(err)}.",
        ) from err
    attributes = binding.attributes(event)
    missing = [a for a in _REQUIRED if not attributes.get(a)]
    if missing:
        raise EventError(
            "missing_attribute",
            f"Expected CloudEvent attributes {', '.join(_REQUIRED)}, but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing.",
        )
    return attributes, binding.data(event)


def _sdk_encode(
    attributes: dict[str, Any], data: dict[str, Any], transport: str
) -> tuple[dict[str, str], bytes]:
    try:
        return _binding().encode(attributes, data, transport)
    except Exception as err:
        raise ValueError(
            f"Expected CloudEvent attributes the SDK accepts, but it refused {attributes}: "
            f"{_sdk_message(err)}"
        ) from err


def _sdk_message(err: Exception) -> str:
    text = str(err) or type(err).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _json_problem(body: str | bytes) -> str | None:
    try:
        json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return str(err)
    return None


def _raise_json_error(body: str | bytes, what: str) -> None:
    problem = _json_problem(body) or "the SDK could not read it as JSON"
    raise EventError(
        "malformed_json",
        f"Expected the {what} to be a JSON object (an inference payload), but it is not valid "
        f"JSON: {problem}.",
    )


def _header_dict(
    headers: Mapping[str, str | bytes] | Iterable[tuple[str | bytes, str | bytes]],
) -> dict[str, str]:
    """Lower-case names, text values (ASGI and Kafka give bytes)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    named: dict[str, str] = {}
    for name, value in items:
        key = name.decode("latin-1") if isinstance(name, bytes) else name
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        named[key.lower()] = text
    return named


# ---------------------------------------------------------------------- joining

V = TypeVar("V")


class JoinBuffer(Generic[V]):
    """Holds one side of a request/response pair until the other comes, by event id.

    Bounded twice: at most ``max_entries`` entries (the oldest is evicted to make room) and
    at most ``max_age`` seconds per entry (expired entries are evicted by :meth:`expire`,
    which :meth:`put` also runs). Each eviction is counted by reason (``"full"``,
    ``"expired"``) and handed to ``on_evict(key, value, reason)``, so that a caller holding
    flagged rows for a request that never came can still deliver them without their input.
    Thread-safe; ``on_evict`` runs outside the lock.

    Args:
        max_entries: entries held at most.
        max_age: seconds an entry is held at most.
        on_evict: called for every evicted entry.
        clock: monotonic seconds (tests pass a fake clock).

    Raises:
        ValueError: a bound that is not positive.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        max_age: float = 30.0,
        on_evict: Callable[[str, V, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(
                f"Expected `max_entries` to be a positive integer, but got {max_entries!r}."
            )
        if not isinstance(max_age, (int, float)) or not 0 < max_age < float("inf"):
            raise ValueError(f"Expected `max_age` > 0 seconds, but got {max_age!r}.")
        self.max_entries = max_entries
        self.max_age = float(max_age)
        self.on_evict = on_evict
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self.evicted: dict[str, int] = {"full": 0, "expired": 0}

    def put(self, key: str, value: V) -> None:
        """Hold ``value`` under ``key`` (replacing and renewing an entry of the same key)."""
        now = self._clock()
        evicted = self._expired(now)
        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self.max_entries:
                old_key, (_, old_value) = self._entries.popitem(last=False)
                evicted.append((old_key, old_value, "full"))
            self._entries[key] = (now, value)
        self._report(evicted)

    def pop(self, key: str) -> V | None:
        """Take the value held under ``key``; None if absent or expired."""
        now = self._clock()
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None:
            return None
        if now - entry[0] > self.max_age:
            self._report([(key, entry[1], "expired")])
            return None
        return entry[1]

    def expire(self) -> int:
        """Evict every entry older than ``max_age``; returns how many."""
        evicted = self._expired(self._clock())
        self._report(evicted)
        return len(evicted)

    def drain(self) -> list[tuple[str, V]]:
        """Take every entry, oldest first (at shutdown); not counted as evictions."""
        with self._lock:
            items = [(key, value) for key, (_, value) in self._entries.items()]
            self._entries.clear()
        return items

    def __len__(self) -> int:
        return len(self._entries)

    def _expired(self, now: float) -> list[tuple[str, V, str]]:
        out: list[tuple[str, V, str]] = []
        with self._lock:
            while self._entries:
                key, (born, value) = next(iter(self._entries.items()))
                if now - born <= self.max_age:
                    break  # entries are in insertion order: the rest are younger
                del self._entries[key]
                out.append((key, value, "expired"))
        return out

    def _report(self, evicted: list[tuple[str, V, str]]) -> None:
        if not evicted:
            return
        with self._lock:
            for _, _, reason in evicted:
                self.evicted[reason] += 1
        if self.on_evict is not None:
            for key, value, reason in evicted:
                self.on_evict(key, value, reason)

    def __repr__(self) -> str:
        return (
            f"JoinBuffer(entries={len(self)}, max_entries={self.max_entries}, "
            f"max_age={self.max_age:g}, evicted={self.evicted})"
        )
