"""The inference data path: validate → route → forward → relay → correct.

For `/generate`, `/v1/completions` and `/v1/chat/completions` (POST):

1. the body is validated and its routing key computed (`keys.route_request`; 400 on bad input),
   in a thread of the encoding pool for a long body when token keys are on (below);
2. `engine.route` picks a worker and counts the request in flight (503 if none is healthy);
3. the body is forwarded unchanged on a pooled keep-alive connection (`upstream.UpstreamPool`);
4. if the attempt fails, `outcomes.decide` says what it becomes (one table, used by both ways
   through below): retried on another worker (`--retries`, backoff 10 ms × 2^n) while no byte
   reached the client, the router's own error (502, 503 for its own resource limits, 504 on a
   timeout), the worker's own error answer, or — once a stream's bytes reached the client — an
   SSE error event and a close WITHOUT the clean chunked terminator;
5. the answer is relayed: whole, or chunk by chunk as it arrives for streams; the relay awaits
   the client's drain (`Responder.drain`), so a client that stops reading stops the reading of
   its worker. The worker's headers are relayed, less hop-by-hop and framing ones;
   `x-request-id` (the client's, or a new one: a random prefix per router and a counter) and
   `x-sglang-dp-worker` headers name the request and the worker;
6. the worker's `cached_tokens` / `prompt_tokens` (the body's `meta_info` or `usage`; for
   streams, the last event) correct the tree (`engine.observe`); a stream's first chunk tells
   the engine its first token came (`engine.first_token`: the queue and price fit).

Two ways through, one set of decisions. The common request — not a stream, and its worker has
an idle keep-alive connection — runs without a task or a coroutine: `handle` routes it and
`UpstreamPool.send` writes it at once, and the whole answer comes back to the request's `_Job`
(`response_received` / `response_failed`) from the connection's callbacks. Everything else (a
stream, a new connection, a retry after its backoff) runs as one task (`_forward`). Both relay
answers with `_answer` and settle failures with `_settle`; on two shared cores a task, its
coroutines and their futures were a fifth of the router's CPU per request.

Admission control (`admission.Admission`, when configured): a request enters in `handle`
after validation and holds its slot until it ends (`_Job.end`, once, whichever way it ends:
answered, refused, failed, or its client gone); a slot freed goes to the oldest waiting request.
Refusals are 429 (queue full, or every healthy worker saturated: refused at once) and 408 (the
queue's timeout), both with `Retry-After`. Circuit breakers (`breaker.Breakers`): workers whose
breaker is open are passed to `engine.route` as excluded; failed attempts the worker is blamed
for and answered requests are reported to them.

Encoding off the loop (`encoding.EncodingPool`, with `--tokenizer-path`): a body of at least
the pool's threshold is validated and encoded in a thread; until its result comes back the
request is neither admitted nor routed, so it holds nothing. A client gone meanwhile cancels
it (the result is dropped); a tokenizer error is a 500 naming it, never a hang; a request whose
encoding the stopping router cancelled gets a 503. After a long answer, the key extended by it
(`answers.outcome`) is encoded in the pool too; the attempt's dispatch is held until then and
`engine.observe` runs back on the loop with the time of the answer, which releases it.

In-flight accounting cannot leak: the attempt's dispatch is held by its `_Job` and released
once (`_Job.release`), at the end of every attempt and by the task's done callback — which also
runs for a task cancelled before its first step (a client gone in the same loop turn). A client
that disconnects cancels the task, or drops the task-less exchange, which also aborts the
upstream request so the worker frees its KV. OpenAI streams carry usage only if asked
(`stream_options.include_usage`): the router forwards `keys.route_request`'s rewritten body,
which asks for it, and the stream tap removes the usage chunk when the client did not ask
(`answers.StreamTap`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import orjson

from sglang_dp.httpserver import JSON, HttpRequest, Responder, error_body
from sglang_dp.router.admission import Admission, LoadReports, Verdict
from sglang_dp.router.answers import StreamTap, outcome
from sglang_dp.router.auth import bearer_matches
from sglang_dp.router.breaker import Breakers
from sglang_dp.router.config import RouterConfig
from sglang_dp.router.encoding import EncodingPool
from sglang_dp.router.engine import Dispatch, NoWorkerAvailable, Outcome, RoutingEngine
from sglang_dp.router.health import WorkerMonitor
from sglang_dp.router.keys import KIND_IDS, Encoder, InvalidRequest, Routed, route_request
from sglang_dp.router.metrics import RouterMetrics
from sglang_dp.router.outcomes import RETRY_STATUSES, Action, Fault, decide
from sglang_dp.router.upstream import (
    ConnectError,
    Exchange,
    LocalResourceError,
    ProtocolError,
    UpstreamClosed,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

log = logging.getLogger("sglang_dp.router")

BACKOFF_S = 0.01
RETRY_AFTER = b"retry-after: 1\r\n"  # on 429 and 408: seconds before trying again
# the queue's timer fires this late: asyncio may run a timer a clock resolution early
EXPIRE_SLACK_S = 0.005
WORKER_HEADER = b"x-sglang-dp-worker"
# Not relayed from the worker: hop-by-hop and framing headers (this connection's own), and
# the ones the router writes itself.
NOT_RELAYED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"content-type",
        b"cache-control",
        b"x-request-id",
        WORKER_HEADER,
    }
)


def fault_of(error: UpstreamError) -> Fault:
    """The outcome table's name for an upstream error."""
    # The class's MRO, not isinstance: compiled by mypyc, isinstance missed the second base of
    # ConnectTimeout (a ConnectError and an UpstreamTimeout) and called a timeout a reset.
    kinds: tuple[type, ...] = type(error).__mro__
    if LocalResourceError in kinds:
        return Fault.LOCAL
    if UpstreamTimeout in kinds:  # before ConnectError: a ConnectTimeout is both
        return Fault.TIMEOUT
    if ConnectError in kinds:
        return Fault.CONNECT
    if ProtocolError in kinds:
        return Fault.PROTOCOL
    return Fault.CLOSED


def relayed_headers(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """(content-type, the other header lines to relay) of a worker's response."""
    content_type = JSON
    lines = b""
    for name, value in headers:
        if name == b"content-type":
            content_type = value
        elif name not in NOT_RELAYED:
            lines += name + b": " + value + b"\r\n"
    return content_type, lines


class _Job:
    """One inference request on its way: what every attempt needs, and the attempt in flight
    (while it runs without a task, this is the `upstream.ResponseListener`)."""

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
        self.last_reason = ""  # why the last failed attempt failed
        self.last_answer: tuple[int, bytes, bytes] | None = None  # its worker's error answer
        self.dispatch: Dispatch | None = None  # the attempt in flight, until released
        self.exchange: Exchange | None = None  # the task-less attempt's exchange
        self.sent = 0.0
        self.boundary = True  # the bytes relayed so far end at an SSE event boundary
        self.admitted = False  # holds an admission slot, until `end`

    def release(self, *_: object) -> None:
        """End the attempt's in-flight accounting (once; also a task's done callback)."""
        dispatch, self.dispatch = self.dispatch, None
        if dispatch is not None:
            self.proxy._engine.release(dispatch)

    def end(self, *_: object) -> None:
        """The request is over, whichever way: its attempt and its admission slot are freed
        (once; also a task's done callback)."""
        self.release()
        if self.admitted:
            self.admitted = False
            self.proxy._left()

    def response_received(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        dispatch, self.exchange = self.dispatch, None
        if dispatch is not None:
            self.proxy._received(self, dispatch, status, headers, body)

    def response_failed(self, error: UpstreamError, reached: bool, headed: bool) -> None:
        dispatch, self.exchange = self.dispatch, None
        if dispatch is not None:
            self.proxy._send_failed(self, dispatch, error, reached)

    def cancel(self) -> None:
        """The client went away during the task-less attempt: drop it (the worker sees the
        disconnect) and release its dispatch."""
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.cancel()
        self.end()


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
        admission: Admission[_Job] | None = None,
        breakers: Breakers | None = None,
        loads: LoadReports | None = None,
        encoding: EncodingPool | None = None,
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
        self._admission = admission
        self._breakers = breakers
        self._loads = loads
        self._encoding = encoding if encode is not None else None

    def handle(self, request: HttpRequest, responder: Responder) -> None:
        """Entry point from the HTTP server (synchronous; see the module docstring)."""
        given = request.headers.get("x-request-id")
        if given:
            rid = given.encode("latin-1")
        else:
            self._ids += 1
            rid = self._id_prefix + str(self._ids).encode()
        rid_header = b"x-request-id: " + rid + b"\r\n"
        if self._key is not None and not bearer_matches(
            request.headers.get("authorization"), self._key
        ):
            self._reject(responder, rid_header, 401, "missing or wrong API key", "Unauthorized")
            return
        encoding = self._encoding
        if encoding is not None and len(request.body) >= encoding.threshold:
            future = encoding.run(route_request, request.path, request.body, self._encode)
            responder.on_disconnect = future.cancel  # nothing is admitted or routed yet
            future.add_done_callback(_Encoded(self, rid, rid_header, responder).done)
            return
        try:
            routed = route_request(request.path, request.body, self._encode)
        except InvalidRequest as exc:
            self._reject(responder, rid_header, 400, str(exc), "BadRequestError")
            return
        self._enter(routed, rid, rid_header, responder)

    def _encoded(
        self,
        future: asyncio.Future[Routed],
        rid: bytes,
        rid_header: bytes,
        responder: Responder,
    ) -> None:
        """A request's key came back from the encoding pool: go on as `handle` does inline."""
        responder.on_disconnect = None
        if responder.closed:  # the client went away meanwhile: nothing to undo
            return
        if future.cancelled():
            self._reject(responder, rid_header, 503, "the router is stopping", "ServiceUnavailable")
            return
        error = future.exception()
        if error is None:
            self._enter(future.result(), rid, rid_header, responder)
        elif isinstance(error, InvalidRequest):
            self._reject(responder, rid_header, 400, str(error), "BadRequestError")
        else:
            log.error("the tokenizer failed on a request: %r", error)
            message = f"the tokenizer failed on this request: {type(error).__name__}: {error}"
            self._reject(responder, rid_header, 500, message, "InternalError")

    def _enter(self, routed: Routed, rid: bytes, rid_header: bytes, responder: Responder) -> None:
        """A valid request: admitted (or queued, or refused), then routed and forwarded."""
        headers = [*self._base_headers, (b"x-request-id", rid)]
        job = _Job(self, routed, routed.forward, headers, rid_header, responder)
        if self._admission is None or self._admit(job, self._admission):
            self._start(job)

    def _start(self, job: _Job) -> None:
        """Route an admitted request and forward it (at once if it can, else in a task)."""
        routed, headers, responder = job.routed, job.headers, job.responder
        dispatch = self._route(job)
        if dispatch is None:
            return
        job.dispatch = dispatch
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
                job.end()
                raise
            if exchange is not None:
                job.exchange = exchange
                responder.on_disconnect = job.cancel
                return
        self._run(job, dispatch)

    def _run(self, job: _Job, dispatch: Dispatch | None) -> None:
        """Go on in a task: attempt `dispatch` (held by the job), or (None) the next retry
        after its backoff. The task's done callback releases whatever attempt it holds, even
        when it is cancelled before its first step."""
        loop = self._loop
        if loop is None or not loop.is_running():  # asked once: it costs a system call (getpid)
            loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(self._forward(job, dispatch))
        task.add_done_callback(job.end)
        job.responder.on_disconnect = task.cancel

    def _route(self, job: _Job) -> Dispatch | None:
        """A worker for the next attempt, or None when none is left (the client is answered)."""
        started = time.perf_counter()
        now = self._clock()
        exclude: list[str] = job.tried
        blocked = self._breakers.blocked(now) if self._breakers is not None else None
        if blocked:
            exclude = [*job.tried, *blocked]
        try:
            dispatch = self._engine.route(job.routed.key, now, exclude, job.routed.stream)
        except NoWorkerAvailable as none:
            why = str(none)
            if blocked:
                why += f" (circuit breaker open: {', '.join(sorted(blocked))})"
            self._give_up(job, why)
            return None
        self._metrics.routing_latency.observe(time.perf_counter() - started)
        if self._breakers is not None:  # a half-open worker counts its probes
            self._breakers.routed(dispatch.worker, now)
        job.tried.append(dispatch.worker)
        return dispatch

    async def _forward(self, job: _Job, dispatch: Dispatch | None) -> None:
        """Attempt, and again elsewhere while the outcome table says retry."""
        while True:
            if dispatch is None:
                await asyncio.sleep(BACKOFF_S * 2 ** (job.attempt - 1))
                dispatch = self._route(job)
                if dispatch is None:
                    return
                job.dispatch = dispatch
            try:
                if not await self._attempt(job, dispatch):
                    return
            finally:
                job.release()
            dispatch = None

    # -- admission control (see the module docstring) -----------------------------------------

    def _admit(self, job: _Job, admission: Admission[_Job]) -> bool:
        """True: go on now. Otherwise the request waits in the queue or was refused."""
        verdict = admission.enter(job, self._clock(), self._saturated)
        if verdict is Verdict.ADMIT:
            job.admitted = True
            return True
        if verdict is Verdict.QUEUED:
            job.responder.on_disconnect = lambda: admission.cancel(job)
            loop = asyncio.get_running_loop()
            wait = admission.config.queue_timeout_secs + EXPIRE_SLACK_S
            loop.call_later(wait, self._expire, admission)
            return False
        if verdict is Verdict.OVERLOADED:
            message = "every healthy worker is saturated; try again later"
        else:
            cap, size = admission.cap, admission.config.queue_size
            message = f"the router is full ({cap} requests in flight, {size} waiting)"
        self._reject(job.responder, job.rid_header + RETRY_AFTER, 429, message, "TooManyRequests")
        return False

    def _saturated(self) -> bool:
        """Every healthy worker has its share of the cap in flight, or says requests wait in
        its own queue (asked only at the cap)."""
        assert self._admission is not None
        now = self._clock()
        healthy = [w for w in self._engine.snapshot(now).workers if w.healthy]
        share = self._admission.cap / max(len(healthy), 1)
        loads = self._loads
        return all(
            w.in_flight >= share or (loads is not None and loads.queueing(w.url, now))
            for w in healthy
        )

    def _left(self) -> None:
        """An admitted request ended: its slot goes to the oldest waiting one, if any."""
        assert self._admission is not None
        waiting = self._admission.leave(self._clock())
        if waiting is not None:
            waiting.admitted = True
            waiting.responder.on_disconnect = None
            asyncio.get_running_loop().call_soon(self._start, waiting)

    def _expire(self, admission: Admission[_Job]) -> None:
        for job in admission.expire(self._clock()):
            job.responder.on_disconnect = None
            message = f"waited {admission.config.queue_timeout_secs:g} s for a slot"
            self._reject(job.responder, job.rid_header + RETRY_AFTER, 408, message, "Timeout")

    def _reject(
        self, responder: Responder, rid_header: bytes, code: int, message: str, kind: str
    ) -> None:
        responder.send(code, error_body(message, kind, code), headers=rid_header)
        self._metrics.count("", code)

    def _give_up(self, job: _Job, why: str) -> None:
        """No worker left to try: the last worker's own error answer, else the router's."""
        job.end()
        last = job.last_answer
        if last is not None:
            code, payload, content_type = last
            job.responder.send(code, payload, content_type, job.rid_header)
            self._metrics.count("", code)
        elif job.last_reason:
            message = f"every worker tried failed (last: {job.last_reason}); {why}"
            self._reject(job.responder, job.rid_header, 502, message, "BadGateway")
        else:
            message = f"no worker available: {why}"
            self._reject(job.responder, job.rid_header, 503, message, "NoWorker")

    def _settle(
        self,
        job: _Job,
        dispatch: Dispatch,
        fault: Fault,
        message: str,
        answer: tuple[int, bytes, bytes] | None = None,
    ) -> bool:
        """A failed attempt: do what `outcomes.decide` says. True: try another worker."""
        worker = dispatch.worker
        status = answer[0] if answer is not None else 0
        retries_left = self._config.retries - job.attempt
        verdict = decide(fault, status, job.responder.started, retries_left)
        reason = f"status_{status}" if fault is Fault.STATUS else fault.value
        if verdict.action is not Action.BREAK:  # the worker produced nothing: no cache there
            self._engine.retract(dispatch)
        if verdict.blame:
            if self._breakers is not None:
                self._breakers.failure(worker, self._clock())
            self._engine.fail(dispatch, reason)
            if fault in (Fault.CONNECT, Fault.CLOSED, Fault.PROTOCOL):
                self._monitor.report_failure(worker, message, refused=fault is Fault.CONNECT)
        if verdict.action is Action.RETRY:
            job.release()
        else:
            job.end()
        if fault is Fault.LOCAL:
            log.error("the router is out of a local resource (%s): answering 503", message)
        action = verdict.action
        if action is Action.RETRY:
            job.attempt += 1
            job.last_reason = reason
            job.last_answer = answer
            return True
        if action is Action.RELAY and answer is not None:
            code, payload, content_type = answer
            job.responder.send(
                code, payload, content_type, job.rid_header + self._worker_line(worker)
            )
            self._metrics.count(worker, code)
        elif action is Action.BREAK:
            text = f"{worker} failed mid-stream: {message}"
            event = b"data: " + error_body(text, "StreamBroken", 502) + b"\n\n"
            job.responder.abort_stream(event if job.boundary else b"\n\n" + event)
            self._metrics.count(worker, 502)
        else:
            code = verdict.status
            kind = {502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}[code]
            text = f"{worker}: {message}" if code != 503 else message
            if code == 502 and job.attempt:
                text = f"every worker tried failed (last: {text})"
            self._reject(job.responder, job.rid_header, code, text, kind)
        return False

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
        if self._answer(job, dispatch, status, headers, body):
            self._run(job, None)

    def _send_failed(
        self, job: _Job, dispatch: Dispatch, error: UpstreamError, reached: bool
    ) -> None:
        if isinstance(error, UpstreamClosed) and not reached:
            # The keep-alive race: the worker closed the idle socket before it saw the request.
            # Same attempt, in a task: `UpstreamPool.request` connects if it has to.
            self._run(job, dispatch)
            return
        if self._settle(job, dispatch, fault_of(error), str(error)):
            self._run(job, None)

    # -- the task's attempt ------------------------------------------------------------------

    async def _attempt(self, job: _Job, dispatch: Dispatch) -> bool:
        """One attempt in the task. True: try another worker."""
        worker = dispatch.worker
        routed = job.routed
        sent = time.perf_counter()
        timeout = self._config.request_timeout_secs
        try:
            upstream = await self._pool.request(
                worker, "POST", routed.path, job.headers, job.body, timeout=timeout
            )
        except UpstreamError as error:
            return self._settle(job, dispatch, fault_of(error), str(error))
        job.sent = sent
        try:
            if routed.stream and upstream.status == 200:
                await self._relay_stream(job, dispatch, upstream)
                return False
            payload = await upstream.read(timeout)
            return self._answer(job, dispatch, upstream.status, upstream.headers, payload)
        except UpstreamError as error:
            return self._settle(job, dispatch, fault_of(error), str(error))
        finally:
            upstream.abort()  # no-op when the body was read to the end (back in the pool)

    def _answer(
        self,
        job: _Job,
        dispatch: Dispatch,
        status: int,
        headers: list[tuple[bytes, bytes]],
        payload: bytes,
    ) -> bool:
        """A whole answer from the worker: relayed to the client, or (a status worth another
        worker) settled as a failure. True: try another worker."""
        content_type, extra = self._client_head(job, dispatch.worker, headers)
        if status in RETRY_STATUSES:
            answer = (status, payload, content_type)
            return self._settle(job, dispatch, Fault.STATUS, f"answered {status}", answer)
        job.responder.send(status, payload, content_type, extra)
        if status == 200:
            self._observe_body(job, dispatch, payload)
        self._finished(job, dispatch.worker, status)
        return False

    async def _relay_stream(
        self, job: _Job, dispatch: Dispatch, upstream: UpstreamResponse
    ) -> None:
        """Pass every chunk on as it arrives, waiting while the client's buffer is full (so
        the worker is not read meanwhile); then correct from the last complete SSE event."""
        responder = job.responder
        content_type, extra = self._client_head(job, dispatch.worker, upstream.headers)
        tap = StreamTap(job.routed.path, job.routed.strip_usage)
        responder.start_stream(upstream.status, content_type, extra)
        waiting = True  # for the first chunk: SGLang sends it with the first token
        async for chunk in upstream:
            if waiting:
                waiting = False
                self._engine.first_token(dispatch, self._clock())
            out = tap.feed(chunk)
            if out:
                responder.write(out)
                job.boundary = out.endswith(b"\n\n")
                drained = responder.drain()
                if drained is not None:
                    await drained
        responder.end()
        self._observe_stream(job, dispatch, tap)
        self._finished(job, dispatch.worker, upstream.status)

    def _client_head(
        self, job: _Job, worker: str, headers: list[tuple[bytes, bytes]]
    ) -> tuple[bytes, bytes]:
        """(content-type, header lines) of the client's answer relayed from `worker`'s."""
        content_type, lines = relayed_headers(headers)
        return content_type, job.rid_header + self._worker_line(worker) + lines

    def _finished(self, job: _Job, worker: str, status: int) -> None:
        """The worker's answer reached the client: end the attempt and count it."""
        job.end()
        if self._breakers is not None and status < 500:
            self._breakers.success(worker, self._clock())
        self._metrics.count(worker, status)
        self._metrics.upstream_latency.observe(time.perf_counter() - job.sent)

    def _observe_body(self, job: _Job, dispatch: Dispatch, payload: bytes) -> None:
        try:
            reply = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        first = reply[0] if isinstance(reply, list) and reply else reply
        if isinstance(first, dict):
            self._observe(job, dispatch, first, None, len(payload))

    def _observe_stream(self, job: _Job, dispatch: Dispatch, tap: StreamTap) -> None:
        reply = tap.last_reply()
        if reply is not None:
            # /generate's last event carries the whole text; OpenAI chunks only deltas
            streamed = tap.output()
            size = len(streamed) if streamed is not None else len(str(reply.get("text", "")))
            self._observe(job, dispatch, reply, streamed, size)

    def _observe(
        self,
        job: _Job,
        dispatch: Dispatch,
        reply: dict[str, Any],
        streamed: str | None,
        output_size: int,
    ) -> None:
        """Correct the engine from an answer; the key extended by a long one is encoded in
        the pool, and the job's dispatch is then held until `engine.observe` releases it."""
        routed = job.routed
        encoding = self._encoding
        if (
            encoding is not None
            and routed.text is not None
            and routed.kind != KIND_IDS
            and len(routed.text) + output_size >= encoding.threshold
        ):
            job.dispatch = None  # released by `_Observed.done`, whatever becomes of the work
            future = encoding.run(outcome, routed, reply, streamed, self._encode)
            future.add_done_callback(_Observed(self, dispatch, routed, reply, streamed).done)
            return
        result = outcome(routed, reply, streamed, self._encode)
        if result is not None:
            self._engine.observe(dispatch, result, self._clock())


class _Encoded:
    """The done callback of a request's encoding in the pool (on the loop)."""

    __slots__ = ("proxy", "responder", "rid", "rid_header")

    def __init__(self, proxy: Proxy, rid: bytes, rid_header: bytes, responder: Responder) -> None:
        self.proxy = proxy
        self.rid = rid
        self.rid_header = rid_header
        self.responder = responder

    def done(self, future: asyncio.Future[Routed]) -> None:
        self.proxy._encoded(future, self.rid, self.rid_header, self.responder)


class _Observed:
    """The done callback of an answer's key extension in the pool (on the loop): the engine
    observes the answer at the time it came, or — the work failed or was cancelled — observes
    it without the extension, so the dispatch is always released."""

    __slots__ = ("answered", "dispatch", "proxy", "reply", "routed", "streamed")

    def __init__(
        self,
        proxy: Proxy,
        dispatch: Dispatch,
        routed: Routed,
        reply: dict[str, Any],
        streamed: str | None,
    ) -> None:
        self.proxy = proxy
        self.dispatch = dispatch
        self.routed = routed
        self.reply = reply
        self.streamed = streamed
        self.answered = proxy._clock()

    def done(self, future: asyncio.Future[Outcome | None]) -> None:
        engine = self.proxy._engine
        if future.cancelled() or future.exception() is not None:
            if not future.cancelled():
                log.error("the tokenizer failed on an answer: %r", future.exception())
            result = outcome(self.routed, self.reply, self.streamed, None)
        else:
            result = future.result()
        if result is None:
            engine.release(self.dispatch)
        else:
            engine.observe(self.dispatch, result, self.answered)
