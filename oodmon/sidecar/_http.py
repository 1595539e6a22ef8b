"""The sidecar's HTTP vocabulary: ASGI types, answers, refusals and request bodies.

Kept apart from routing and scoring so that those speak of events and verdicts only, and
the ASGI application (:mod:`oodmon.sidecar.app`) of connections only.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Answer",
    "Forward",
    "Headers",
    "Receive",
    "Refused",
    "Scope",
    "Send",
    "content_length",
    "dumps",
    "json_answer",
    "read_body",
    "send_answer",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]
#: A verdict CloudEvent to post to ``--reply-url``: its HTTP headers and body.
Forward = tuple[dict[str, str], bytes]


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, body and content type."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"


class Refused(Exception):
    """A request the sidecar answers with an error: its status, reason label and message."""

    def __init__(self, status: int, reason: str, message: str, extra: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.extra = extra


def dumps(payload: Any) -> bytes:
    """Compact JSON (NaN and inf refused: they are not JSON)."""
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


def json_answer(status: int, payload: Any) -> Answer:
    """An answer with a JSON body."""
    return Answer(status, dumps(payload))


def content_length(headers: Headers) -> int | None:
    """The declared ``content-length``, or None (absent or not a number)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(headers: Headers, receive: Receive, max_bytes: int) -> bytes | None:
    """The request's body, or None when the client disconnected first.

    Raises:
        Refused: 413 ``too_large``, as soon as the declared or received size passes
            ``max_bytes`` (the rest is never read into memory).
    """
    declared = content_length(headers)
    if declared is not None and declared > max_bytes:
        raise Refused(413, "too_large", _too_large(max_bytes, declared))
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise Refused(413, "too_large", _too_large(max_bytes, size, at_least=True))
        chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(max_bytes: int, size: int, at_least: bool = False) -> str:
    return (
        f"Expected a body of at most {max_bytes} bytes (--max-body-bytes), but "
        f"got {'more than ' if at_least else ''}{size if not at_least else max_bytes}"
        " bytes: send smaller batches or raise the limit."
    )


async def send_answer(send: Send, answer: Answer) -> None:
    """Send ``answer`` as one complete HTTP response."""
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
