"""CloudEvents decoding (both SDK APIs, both modes, HTTP and Kafka headers) and the join buffer."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from oodmon import events
from oodmon.errors import OodmonError
from oodmon.events import (
    EVENT_REASONS,
    REQUEST_TYPE,
    RESPONSE_TYPE,
    EventError,
    JoinBuffer,
    decode_event,
    encode_event,
)

OIP = {"model_name": "m", "outputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [1]}]}


@pytest.fixture(params=["core", "v1"])
def api(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the SDK's 2.x API and with its 1.x API (kept under cloudevents.v1)."""
    saved = list(events._binding_cache)
    events._binding_cache[:] = [events._binding(request.param)]
    yield request.param
    events._binding_cache[:] = saved


def _structured(**attributes: object) -> bytes:
    envelope = {"specversion": "1.0", "id": "e-1", "source": "/isvc", "type": RESPONSE_TYPE}
    envelope.update(attributes)
    return json.dumps(envelope).encode()


def test_installed_sdk_api_is_core() -> None:
    assert events.sdk_api() == "core"  # cloudevents 2.x is what the extra installs


@pytest.mark.parametrize("prefix", ["ce-", "ce_"])
def test_binary_round_trip(api: str, prefix: str) -> None:
    headers, body = encode_event(
        RESPONSE_TYPE, "/isvc", "e-7", OIP, header_prefix=prefix,
        extensions={"inferenceservicename": "m"},
    )  # fmt: skip
    assert headers[f"{prefix}id"] == "e-7" and headers["content-type"] == "application/json"
    # HTTP servers hand headers over as byte pairs in any case
    raw = [(k.upper().encode(), v.encode()) for k, v in headers.items()]
    event = decode_event(raw, body, header_prefix=prefix)
    assert (event.kind, event.id, event.source, event.mode) == (
        "response",
        "e-7",
        "/isvc",
        "binary",
    )
    assert event.data == OIP
    assert event.attributes["inferenceservicename"] == "m"


@pytest.mark.parametrize("prefix", ["ce-", "ce_"])
def test_structured_mode(api: str, prefix: str) -> None:
    body = _structured(type=REQUEST_TYPE, data={"inputs": []}, datacontenttype="application/json")
    event = decode_event(
        {"Content-Type": "application/cloudevents+json; charset=utf-8"}, body, header_prefix=prefix
    )
    assert (event.kind, event.id, event.mode) == ("request", "e-1", "structured")
    assert event.data == {"inputs": []}


def _binary_headers(**overrides: str) -> dict[str, str]:
    headers = {
        "ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "/isvc",
        "ce-type": RESPONSE_TYPE, "content-type": "application/json",
    }  # fmt: skip
    headers.update(overrides)
    return {k: v for k, v in headers.items() if v}


STRUCTURED = {"content-type": "application/cloudevents+json"}


@pytest.mark.parametrize(
    ("headers", "body", "reason", "fragment"),
    [
        (_binary_headers(), b"{not json", "malformed_json", "not valid JSON"),
        (STRUCTURED, b"{not json", "malformed_json", "not valid JSON"),
        (_binary_headers(**{"ce-type": "com.example.other"}), b"{}", "unknown_type", "other"),
        (_binary_headers(**{"ce-id": ""}), b"{}", "missing_attribute", "ce-id is missing"),
        ({"content-type": "application/json"}, b"{}", "missing_attribute", "no ce-* headers"),
        (STRUCTURED, b'{"id": "x", "specversion": "1.0"}', "missing_attribute", "source"),
        (_binary_headers(**{"ce-specversion": "9.9"}), b"{}", "invalid_event", "specversion"),
    ],
)
def test_bad_events_say_what_was_expected(
    api: str, headers: dict[str, str], body: bytes, reason: str, fragment: str
) -> None:
    with pytest.raises(EventError, match="^Expected") as info:
        decode_event(headers, body)
    assert info.value.reason == reason and reason in EVENT_REASONS
    assert fragment in str(info.value)
    assert isinstance(info.value, OodmonError) and isinstance(info.value, ValueError)


def test_unknown_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="header_prefix"):
        decode_event({}, b"", header_prefix="x-")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_join_pairs_by_key_once() -> None:
    buffer: JoinBuffer[str] = JoinBuffer(max_entries=10, max_age=5)
    buffer.put("a", "request-a")
    assert buffer.pop("b") is None
    assert buffer.pop("a") == "request-a"
    assert buffer.pop("a") is None and len(buffer) == 0


def test_join_is_bounded_in_entries_and_counts_evictions() -> None:
    evicted: list[tuple[str, str, str]] = []
    buffer: JoinBuffer[str] = JoinBuffer(
        max_entries=3, max_age=60, on_evict=lambda *e: evicted.append(e)
    )
    for i in range(5):
        buffer.put(f"k{i}", f"v{i}")
    assert len(buffer) == 3
    assert evicted == [("k0", "v0", "full"), ("k1", "v1", "full")]  # oldest first
    assert buffer.evicted == {"full": 2, "expired": 0}
    assert buffer.pop("k4") == "v4"


def test_join_is_bounded_in_seconds() -> None:
    clock = FakeClock()
    evicted: list[tuple[str, str, str]] = []
    buffer: JoinBuffer[str] = JoinBuffer(
        max_entries=100, max_age=10, on_evict=lambda *e: evicted.append(e), clock=clock
    )
    buffer.put("old", "1")
    clock.now = 6
    buffer.put("young", "2")
    clock.now = 11  # "old" is 11 s old, "young" 5 s
    assert buffer.pop("old") is None  # expired entries are never paired
    assert buffer.expire() == 0
    clock.now = 17
    assert buffer.expire() == 1
    assert evicted == [("old", "1", "expired"), ("young", "2", "expired")]
    assert buffer.evicted == {"full": 0, "expired": 2}


def test_join_put_renews_and_drain_takes_all() -> None:
    buffer: JoinBuffer[int] = JoinBuffer(max_entries=2, max_age=60)
    buffer.put("a", 1)
    buffer.put("b", 2)
    buffer.put("a", 3)  # renewed: now the youngest
    buffer.put("c", 4)  # evicts "b", the oldest
    assert buffer.drain() == [("a", 3), ("c", 4)]
    assert buffer.evicted["full"] == 1 and len(buffer) == 0


@pytest.mark.parametrize(("entries", "age"), [(0, 1.0), (True, 1.0), (1, 0.0), (1, float("inf"))])
def test_join_bounds_are_validated(entries: int, age: float) -> None:
    with pytest.raises(ValueError, match="Expected"):
        JoinBuffer(max_entries=entries, max_age=age)
