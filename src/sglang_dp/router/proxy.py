"""The inference data path: validate → route → forward → relay → correct.

For `/generate`, `/v1/completions` and `/v1/chat/completions` (POST):

1. the body is validated and its routing key computed (`keys.route_request`; 400 on bad input);
2. `engine.route` picks a worker and counts the request in flight (503 if none is healthy);
3. the body is forwarded unchanged on a pooled keep-alive connection (`upstream.UpstreamPool`);
4. if the worker fails before anything was sent to the client — connection refused or broken,
   or a 408/429/5xx answer — the request is retried on another worker (`--retries`, backoff
   10 ms × 2^n), never after a response started; a timeout waiting for the head is a 504;
5. the answer is relayed: whole, or chunk by chunk as it arrives for streams (nothing is
   buffered); `x-request-id` (the client's, or a new one: a random prefix per router and a
   counter) and `x-sglang-dp-worker` headers name the request and the worker;
6. the worker's `cached_tokens` / `prompt_tokens` (the body's `meta_info` or `usage`; for
   streams, the last event) correct the tree (`engine.observe`).

Two ways through, one set of decisions. The common request — not a stream, and its worker has
an idle keep-alive connection — runs without a task or a coroutine: `handle` routes it and
`UpstreamPool.send` writes it at once, and the whole answer comes back to the request's `_Job`
(`response_received` / `response_failed`) from the connection's callbacks. Everything else (a
stream, a new connection, a retry after its backoff) runs as one task (`_forward`). Both relay
answers with `_answer` and count failures the same way; on two shared cores a task, its
coroutines and their futures were a fifth of the router's CPU per request.

In-flight accounting cannot leak: every dispatch is released in a `finally` (or on the one
callback that ends a task-less attempt), including when the client disconnects (the task is
cancelled, or the task-less exchange dropped, which also aborts the upstream request so the
worker frees its KV). OpenAI streams carry usage only if asked (`stream_options.include_usage`):
the router forwards `keys.route_request`'s rewritten body, which asks for it, and the stream tap
removes the usage chunk when the client did not ask (`answers.StreamTap`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import orjson

from sglang_dp.httpserver import JSON, HttpRequest, Responder
from sglang_dp.router.answers import StreamTap, outcome
from sglang_dp.router.config import RouterConfig
from sglang_dp.router.engine import Dispatch, NoWorkerAvailable, RoutingEngine
from sglang_dp.router.health import WorkerMonitor
from sglang_dp.router.keys import Encoder, InvalidRequest, Routed, route_request
from sglang_dp.router.metrics import RouterMetrics
from sglang_dp.router.upstream import (
    ConnectError,
    Exchange,
    UpstreamClosed,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

log = logging.getLogger("sglang_dp.router")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_S = 0.01
WORKER_HEADER = b"x-sglang-dp-worker"


def error_json(message: str, kind: str, code: int) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "code": code}})


class _Failed(Exception):
    """This attempt failed before the client got anything: maybe retry elsewhere."""

    def __init__(self, reason: str, response: tuple[int, bytes, bytes] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response  # the worker's own error answer, relayed if no retry is left


class _Job:
    """One inference request on its way: what every attempt needs, and the attempt in flight
    while it runs without a task (then this is the `upstream.ResponseListener`)."""

    def __init__(
        self,
        proxy: Proxy,
        routed: Routed,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        rid_header: bytes,
        responder: Responder,
    ) -> None:
        self.proxy = proxy
        self.routed = routed
        self.body = body
        self.headers = headers  # to the worker
        self.rid_header = rid_header  # to the client
        self.responder = responder
        self.tried: list[str] = []
        self.attempt = 0  # attempts that failed so far
        self.last: _Failed | None = None
        # the task-less attempt in flight
        self.dispatch: Dispatch | None = None
        self.exchange: Exchange | None = None
        self.sent = 0.0

    def response_received(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        dispatch, self.dispatch, self.exchange = self.dispatch, None, None
        if dispatch is not None:
            self.proxy._received(self, dispatch, status, headers, body)

    def response_failed(self, error: UpstreamError, reached: bool, headed: bool) -> None:
        dispatch, self.dispatch, self.exchange = self.dispatch, None, None
        if dispatch is not None:
            self.proxy._send_failed(self, dispatch, error, reached, headed)

    def cancel(self) -> None:
        """The client went away during the task-less attempt: drop it (the worker sees the
        disconnect) and release its dispatch."""
        exchange, self.exchange = self.exchange, None
        dispatch, self.dispatch = self.dispatch, None
        if exchange is not None:
            exchange.cancel()
        if dispatch is not None:
            self.proxy._engine.release(dispatch)


class Proxy:
    """Forwards inference requests; one per router."""

    def __init__(
        self,
        config: RouterConfig,
        engine: RoutingEngine,
        pool: UpstreamPool,
        monitor: WorkerMonitor,
        metrics: RouterMetrics,
        clock: Callable[[], float],
        encode: Encoder | None = None,
    ) -> None:
        self._config = config
        self._engine = engine
        self._pool = pool
        self._monitor = monitor
        self._metrics = metrics
        self._clock = clock
        self._encode = encode
        self._key = config.api_key.encode() if config.api_key else None
        auth = [(b"authorization", b"Bearer " + self._key)] if self._key else []
        self._base_headers = [(b"content-type", JSON), *auth]
        # Request ids: a random prefix per router and a counter, unique without a uuid4 each.
        self._id_prefix = os.urandom(8).hex().encode() + b"-"
        self._ids = 0
        self._worker_lines: dict[str, bytes] = {}  # worker URL -> its response header line
        self._loop: asyncio.AbstractEventLoop | None = None

    def handle(self, request: HttpRequest, responder: Responder) -> None:
        """Entry point from the HTTP server (synchronous; see the module docstring)."""
        given = request.headers.get("x-request-id")
        if given:
            rid = given.encode("latin-1")
        else:
            self._ids += 1
            rid = self._id_prefix + str(self._ids).encode()
        rid_header = b"x-request-id: " + rid + b"\r\n"
        if self._key is not None and not self._authorized(request):
            self._reject(responder, rid_header, 401, "missing or wrong API key", "Unauthorized")
            return
        try:
            routed = route_request(request.path, request.body, self._encode)
        except InvalidRequest as exc:
            self._reject(responder, rid_header, 400, str(exc), "BadRequestError")
            return
        headers = [*self._base_headers, (b"x-request-id", rid)]
        job = _Job(self, routed, routed.forward, headers, rid_header, responder)
        dispatch = self._route(job)
        if dispatch is None:
            return
        if not routed.stream:  # a whole answer: forwarded at once if a connection is idle
            job.sent = time.perf_counter()
            try:
                exchange = self._pool.send(
                    dispatch.worker,
                    "POST",
                    routed.path,
                    headers,
                    job.body,
                    job,
                    timeout=self._config.request_timeout_secs,
                )
            except BaseException:  # (a header the worker cannot be sent): no leak
                self._engine.release(dispatch)
                raise
            if exchange is not None:
                job.dispatch, job.exchange = dispatch, exchange
                responder.on_disconnect = job.cancel
                return
        self._run(job, dispatch)

    def _run(self, job: _Job, dispatch: Dispatch | None) -> None:
        """Go on in a task: attempt `dispatch`, or (None) the next retry after its backoff."""
        loop = self._loop
        if loop is None or not loop.is_running():  # asked once: it costs a system call (getpid)
            loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(self._forward(job, dispatch))
        job.responder.on_disconnect = task.cancel

    def _route(self, job: _Job) -> Dispatch | None:
        """A worker for the next attempt, or None when none is left (the client is answered)."""
        started = time.perf_counter()
        try:
            dispatch = self._engine.route(job.routed.key, self._clock(), job.tried)
        except NoWorkerAvailable as none:
            self._give_up(job, str(none))
            return None
        self._metrics.routing_latency.observe(time.perf_counter() - started)
        job.tried.append(dispatch.worker)
        return dispatch

    async def _forward(self, job: _Job, dispatch: Dispatch | None) -> None:
        """Attempt, retrying elsewhere while nothing was sent to the client."""
        while True:
            if dispatch is None:
                if job.attempt > self._config.retries:
                    self._give_up(job, "no attempt left")
                    return
                await asyncio.sleep(BACKOFF_S * 2 ** (job.attempt - 1))
                dispatch = self._route(job)
                if dispatch is None:
                    return
            try:
                await self._attempt(job, dispatch)
                return
            except _Failed as failure:
                self._engine.fail(dispatch, failure.reason)
                job.last = failure
            except UpstreamTimeout:
                self._timed_out(job, dispatch)
                return
            finally:
                self._engine.release(dispatch)
            dispatch = None
            job.attempt += 1

    def _authorized(self, request: HttpRequest) -> bool:
        if self._key is None:
            return True
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode("latin-1", "replace"), self._key)

    def _reject(
        self, responder: Responder, rid_header: bytes, code: int, message: str, kind: str
    ) -> None:
        responder.send(code, error_json(message, kind, code), headers=rid_header)
        self._metrics.count("", code)

    def _give_up(self, job: _Job, why: str) -> None:
        last = job.last
        if last is not None and last.response is not None:
            code, payload, content_type = last.response
            job.responder.send(code, payload, content_type, job.rid_header)
            self._metrics.count("", code)
        elif last is not None:
            message = f"every worker tried failed (last: {last.reason}); {why}"
            self._reject(job.responder, job.rid_header, 502, message, "BadGateway")
        else:
            message = f"no worker available: {why}"
            self._reject(job.responder, job.rid_header, 503, message, "NoWorker")

    def _timed_out(self, job: _Job, dispatch: Dispatch) -> None:
        self._engine.fail(dispatch, "timeout")
        message = f"{dispatch.worker} did not answer within the request timeout"
        self._reject(job.responder, job.rid_header, 504, message, "GatewayTimeout")

    def _worker_line(self, worker: str) -> bytes:
        """The `x-sglang-dp-worker` header line for a worker (built once per worker)."""
        line = self._worker_lines.get(worker)
        if line is None:
            line = WORKER_HEADER + b": " + worker.encode("latin-1") + b"\r\n"
            self._worker_lines[worker] = line
        return line

    # -- the task-less attempt's two endings (`_Job` passes them on) ------------------------

    def _received(
        self,
        job: _Job,
        dispatch: Dispatch,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        content_type = JSON
        for name, value in headers:
            if name == b"content-type":
                content_type = value
                break
        failure: _Failed | None = None
        try:
            self._answer(job, dispatch, status, content_type, body)
        except _Failed as failed:
            self._engine.fail(dispatch, failed.reason)
            failure = failed
        finally:
            self._engine.release(dispatch)
        if failure is not None:
            job.last = failure
            self._retry(job)

    def _send_failed(
        self, job: _Job, dispatch: Dispatch, error: UpstreamError, reached: bool, headed: bool
    ) -> None:
        if isinstance(error, UpstreamTimeout):
            self._timed_out(job, dispatch)
            self._engine.release(dispatch)
            return
        if isinstance(error, UpstreamClosed) and not reached:
            # The keep-alive race: the worker closed the idle socket before it saw the request.
            # Same attempt, in a task: `UpstreamPool.request` connects if it has to.
            self._run(job, dispatch)
            return
        worker = dispatch.worker
        if headed:
            reason = "closed_mid_response"
            self._monitor.report_failure(worker, "closed mid-response", refused=False)
        else:
            reason = "upstream_closed"
            self._monitor.report_failure(worker, str(error), refused=False)
        self._engine.fail(dispatch, reason)
        self._engine.release(dispatch)
        job.last = _Failed(reason)
        self._retry(job)

    def _retry(self, job: _Job) -> None:
        job.attempt += 1
        self._run(job, None)

    # -- the task's attempt ------------------------------------------------------------------

    async def _attempt(self, job: _Job, dispatch: Dispatch) -> None:
        worker = dispatch.worker
        routed = job.routed
        sent = time.perf_counter()
        timeout = self._config.request_timeout_secs
        try:
            upstream = await self._pool.request(
                worker, "POST", routed.path, job.headers, job.body, timeout=timeout
            )
        except ConnectError as refused:
            self._monitor.report_failure(worker, str(refused), refused=True)
            raise _Failed("connect_error") from None
        except UpstreamError as error:
            if isinstance(error, UpstreamTimeout):
                raise
            self._monitor.report_failure(worker, str(error), refused=False)
            raise _Failed("upstream_closed") from None
        status = upstream.status
        job.sent = sent
        try:
            content_type = upstream.header(b"content-type") or JSON
            if routed.stream and status == 200:
                extra = job.rid_header + self._worker_line(worker)
                tap = StreamTap(routed.path, routed.strip_usage)
                await self._relay_stream(upstream, job.responder, extra, content_type, tap)
                self._observe_stream(dispatch, routed, tap)
                self._metrics.count(worker, status)
                self._metrics.upstream_latency.observe(time.perf_counter() - sent)
            else:
                payload = await upstream.read(timeout)
                self._answer(job, dispatch, status, content_type, payload)
        except UpstreamClosed:
            self._monitor.report_failure(worker, "closed mid-response", refused=False)
            self._engine.fail(dispatch, "closed_mid_response")
            if not job.responder.streaming:
                raise _Failed("closed_mid_response") from None
            job.responder.end()  # the client has part of a stream: end it, no retry
        finally:
            upstream.abort()  # no-op when the body was read to the end (back in the pool)

    def _answer(
        self, job: _Job, dispatch: Dispatch, status: int, content_type: bytes, payload: bytes
    ) -> None:
        """A whole answer from the worker: relayed to the client, or (a status worth another
        worker) the attempt fails with it."""
        if status in RETRY_STATUSES:
            raise _Failed(f"status_{status}", (status, payload, content_type))
        worker = dispatch.worker
        extra = job.rid_header + self._worker_line(worker)
        job.responder.send(status, payload, content_type, extra)
        if status == 200:
            self._observe_body(dispatch, job.routed, payload)
        self._metrics.count(worker, status)
        self._metrics.upstream_latency.observe(time.perf_counter() - job.sent)

    async def _relay_stream(
        self,
        upstream: UpstreamResponse,
        responder: Responder,
        extra: bytes,
        content_type: bytes,
        tap: StreamTap,
    ) -> None:
        """Pass every chunk on as it arrives, through the tap (see `answers.StreamTap`)."""
        responder.start_stream(upstream.status, content_type, extra)
        async for chunk in upstream:
            out = tap.feed(chunk)
            if out:
                responder.write(out)
        responder.end()

    def _observe_body(self, dispatch: Dispatch, routed: Routed, payload: bytes) -> None:
        try:
            reply = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        first = reply[0] if isinstance(reply, list) and reply else reply
        if isinstance(first, dict):
            self._observe(dispatch, routed, first, None)

    def _observe_stream(self, dispatch: Dispatch, routed: Routed, tap: StreamTap) -> None:
        event = tap.last_event()
        try:
            reply = orjson.loads(event) if event else None
        except orjson.JSONDecodeError:
            return
        if isinstance(reply, dict):
            # /generate's last event carries the whole text; OpenAI chunks only deltas
            self._observe(dispatch, routed, reply, tap.output())

    def _observe(
        self, dispatch: Dispatch, routed: Routed, reply: dict[str, Any], streamed: str | None
    ) -> None:
        result = outcome(routed, reply, streamed, self._encode)
        if result is not None:
            self._engine.observe(dispatch, result, self._clock())
