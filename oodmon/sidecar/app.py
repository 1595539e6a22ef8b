"""The sidecar's ASGI application: connections, batching on the event loop, probes, forwarding.

:class:`Sidecar` serves ``POST /`` (one CloudEvent), ``GET /metrics``, ``/healthz`` and
``/ready``. It reads bodies (bounded), gathers the events that arrive together into one batch
for :class:`~oodmon.sidecar.scoring.EventScorer`, scores small batches on the event loop and
large ones on one worker thread, posts verdicts to ``reply_url`` from a thread of their own,
and on shutdown hands every held flagged row to the label queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import urllib.request
from collections import deque
from collections.abc import Sequence
from queue import Full, Queue
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from oodmon.events import JoinBuffer
from oodmon.metrics import PrometheusMetrics
from oodmon.sidecar._http import (
    Answer,
    Forward,
    Headers,
    Receive,
    Refused,
    Scope,
    Send,
    json_answer,
    read_body,
    send_answer,
)
from oodmon.sidecar.metrics import SidecarCounters
from oodmon.sidecar.routes import DetectorRoute, RouteTable
from oodmon.sidecar.scoring import EventScorer

__all__ = ["DEFAULT_INLINE_BYTES", "DEFAULT_MAX_BODY_BYTES", "Sidecar"]

logger = logging.getLogger("oodmon")

#: Largest request body accepted (larger bodies get 413): 32 MiB holds a 32 x 100,000 float
#: batch as JSON text.
DEFAULT_MAX_BODY_BYTES = 32 * 2**20

#: Batches whose bodies add up to at most this many bytes are scored on the event loop (they
#: take about a millisecond); larger ones on the worker thread.
DEFAULT_INLINE_BYTES = 64 * 2**10

_REPLY_BACKLOG = 1000
#: A worker batch ends at this many events or bytes of bodies (bounds its latency).
_MAX_BATCH_EVENTS = 256
_MAX_BATCH_BYTES = 8 * 2**20

_Waiting = tuple[Headers, bytes, asyncio.Future[Any]]


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
        self._counters = SidecarCounters(self.registry)
        self._routes = RouteTable(
            routes, metrics=self.metrics, queue=queue, strict_default=strict_default
        )
        self._scorer = EventScorer(
            self._routes,
            self.metrics,
            self._counters,
            output=output,
            input=input,
            join_entries=join_entries,
            join_seconds=join_seconds,
            source=source,
            forward=bool(reply_url),
        )
        # one worker: scoring is CPU-bound (the GIL), and one thread keeps order and caches warm
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="oodmon-sidecar")
        self._replies: Queue[Forward | None] | None = None
        self._reply_thread: threading.Thread | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._waiting: deque[_Waiting] = deque()
        self._waiting_bytes = 0
        self._busy = False
        self._scheduled = False
        self._ready = False
        self._closed = False

    @property
    def models(self) -> list[tuple[str, str]]:
        """The (model, version) labels of every route."""
        return self._routes.models

    @property
    def join(self) -> JoinBuffer[Any]:
        """The request/response join buffer (held requests and early flagged responses)."""
        return self._scorer.join

    def handle(self, headers: Headers, body: bytes) -> tuple[Answer, Forward | None]:
        """Decode, score and answer one posted event (see :meth:`handle_batch`)."""
        return self._scorer.handle(headers, body)

    def handle_batch(
        self, messages: Sequence[tuple[Headers, bytes]]
    ) -> list[tuple[Answer, Forward | None]]:
        """Decode, score and answer posted events (runs on the worker thread).

        See :meth:`EventScorer.handle_batch <oodmon.sidecar.scoring.EventScorer.handle_batch>`.

        Returns, per message, the HTTP answer and the verdict CloudEvent to forward (or None).
        """
        return self._scorer.handle_batch(messages)

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
                self._counters.join_entries.set(len(self.join))
                await send_answer(
                    send, Answer(200, generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())
                )
            elif path == "/healthz":
                await send_answer(send, json_answer(200, {"status": "ok"}))
            else:
                status = 200 if self._ready and not self._closed else 503
                await send_answer(
                    send,
                    json_answer(
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
        try:
            body = await read_body(headers, receive, self.max_body_bytes)
        except Refused as err:
            await self._reject(send, err.status, err.reason, str(err))
            return
        if body is None:  # the client went away
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Answer, Forward | None]] = loop.create_future()
        self._waiting.append((headers, body, future))
        self._waiting_bytes += len(body)
        if not self._busy and not self._scheduled:
            # let every event already read in this loop iteration join the batch first
            self._scheduled = True
            loop.call_soon(self._dispatch, loop)
        answer, forward = await future
        await send_answer(send, answer)
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
        batch: list[_Waiting] = []
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
                results = [(self._scorer.internal(err), None)] * len(batch)
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
                    future.set_result((json_answer(503, {"error": "The sidecar is shutting down."}),
                                       None))  # fmt: skip
            return
        work.add_done_callback(lambda done: self._batch_done(loop, batch, done))

    def _batch_done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Waiting],
        done: asyncio.Future[list[tuple[Answer, Forward | None]]],
    ) -> None:
        self._busy = False
        error = done.exception()
        for index, (*_, future) in enumerate(batch):
            if future.done():
                continue
            if error is not None:
                future.set_result((self._scorer.internal(error), None))
            else:
                future.set_result(done.result()[index])
        if self._waiting and not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch, loop)

    async def _reject(self, send: Send, status: int, reason: str, message: str) -> None:
        self._counters.rejected.labels(reason).inc()
        await send_answer(send, json_answer(status, {"error": message}))

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

    # ------------------------------------------------------------------ forwarding

    def _forward(self, message: Forward) -> None:
        if self._replies is None:
            self._replies = Queue(_REPLY_BACKLOG)
            self._reply_thread = threading.Thread(
                target=self._send_replies, name="oodmon-sidecar-reply", daemon=True
            )
            self._reply_thread.start()
        try:
            self._replies.put_nowait(message)
        except Full:
            self._counters.forwarded.labels("dropped").inc()

    def _send_replies(self) -> None:
        assert self._replies is not None and self.reply_url is not None
        while (message := self._replies.get()) is not None:
            headers, body = message
            request = urllib.request.Request(self.reply_url, body, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
                self._counters.forwarded.labels("ok").inc()
            except Exception as err:
                self._counters.forwarded.labels("failed").inc()
                self._scorer.log_once(
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
        self._scorer.drain()
        self._routes.close(timeout)
        if self._replies is not None and self._reply_thread is not None:
            self._replies.put(None)
            self._reply_thread.join(timeout)

    def __repr__(self) -> str:
        return f"Sidecar(models={self.models}, join={self.join!r})"
