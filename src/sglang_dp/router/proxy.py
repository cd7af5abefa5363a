"""The inference data path: validate → route → forward → relay → correct.

For `/generate`, `/v1/completions` and `/v1/chat/completions` (POST):

1. the body is validated and its routing key computed (`keys.route_request`; 400 on bad input);
2. `engine.route` picks a worker and counts the request in flight (503 if none is healthy);
3. the body is forwarded unchanged on a pooled keep-alive connection (`upstream.UpstreamPool`);
4. if the worker fails before anything was sent to the client — connection refused or broken,
   or a 408/429/5xx answer — the request is retried on another worker (`--retries`, backoff
   10 ms × 2^n), never after a response started; a timeout waiting for the head is a 504;
5. the answer is relayed: whole, or chunk by chunk as it arrives for streams (nothing is
   buffered); `x-request-id` and `x-sglang-dp-worker` headers name the request and the worker;
6. the worker's `cached_tokens` / `prompt_tokens` (the body's `meta_info` or `usage`; for
   streams, the last event) correct the tree (`engine.observe`).

In-flight accounting cannot leak: every dispatch is released in a `finally`, including when the
client disconnects (the task is cancelled, which also aborts the upstream request so the worker
frees its KV). OpenAI streams carry usage only if the client asked for it
(`stream_options.include_usage`); without it there is nothing to correct from.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from sglang_dp.httpserver import HttpRequest, Responder
from sglang_dp.router.config import RouterConfig
from sglang_dp.router.engine import Dispatch, NoWorkerAvailable, Outcome, RoutingEngine
from sglang_dp.router.health import WorkerMonitor
from sglang_dp.router.keys import (
    CHAT,
    GENERATE,
    Encoder,
    InvalidRequest,
    Routed,
    extend_key,
    route_request,
)
from sglang_dp.router.metrics import RouterMetrics
from sglang_dp.router.upstream import (
    ConnectError,
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
        self._base_headers = [(b"content-type", b"application/json"), *auth]

    def handle(self, request: HttpRequest, responder: Responder) -> None:
        """Entry point from the HTTP server (synchronous: starts one task per request)."""
        task = asyncio.get_running_loop().create_task(self._serve(request, responder))
        responder.on_disconnect = task.cancel

    async def _serve(self, request: HttpRequest, responder: Responder) -> None:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        rid_header = b"x-request-id: " + rid.encode("latin-1") + b"\r\n"
        if not self._authorized(request):
            self._reject(responder, rid_header, 401, "missing or wrong API key", "Unauthorized")
            return
        try:
            routed = route_request(request.path, request.body, self._encode)
        except InvalidRequest as exc:
            self._reject(responder, rid_header, 400, str(exc), "BadRequestError")
            return
        await self._forward(routed, request.body, rid, rid_header, responder)

    def _authorized(self, request: HttpRequest) -> bool:
        if self._key is None:
            return True
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode("latin-1", "replace"), self._key)

    def _reject(
        self, responder: Responder, rid_header: bytes, code: int, message: str, kind: str
    ) -> None:
        responder.send(code, error_json(message, kind, code), headers=rid_header)
        self._metrics.requests.labels("", str(code)).inc()

    async def _forward(
        self, routed: Routed, body: bytes, rid: str, rid_header: bytes, responder: Responder
    ) -> None:
        tried: list[str] = []
        headers = [*self._base_headers, (b"x-request-id", rid.encode("latin-1"))]
        last: _Failed | None = None
        for attempt in range(self._config.retries + 1):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
            started = time.perf_counter()
            try:
                dispatch = self._engine.route(routed.key, self._clock(), exclude=tried)
            except NoWorkerAvailable as exc:
                self._give_up(responder, rid_header, last, str(exc))
                return
            self._metrics.routing_latency.observe(time.perf_counter() - started)
            tried.append(dispatch.worker)
            try:
                await self._attempt(dispatch, routed, body, headers, rid_header, responder)
                return
            except _Failed as failure:
                self._engine.fail(dispatch, failure.reason)
                last = failure
            except UpstreamTimeout:
                self._engine.fail(dispatch, "timeout")
                message = f"{dispatch.worker} did not answer within the request timeout"
                self._reject(responder, rid_header, 504, message, "GatewayTimeout")
                return
            finally:
                self._engine.release(dispatch)
        self._give_up(responder, rid_header, last, "no attempt left")

    def _give_up(
        self, responder: Responder, rid_header: bytes, last: _Failed | None, why: str
    ) -> None:
        if last is not None and last.response is not None:
            code, payload, content_type = last.response
            responder.send(code, payload, content_type, rid_header)
            self._metrics.requests.labels("", str(code)).inc()
        elif last is not None:
            message = f"every worker tried failed (last: {last.reason}); {why}"
            self._reject(responder, rid_header, 502, message, "BadGateway")
        else:
            self._reject(responder, rid_header, 503, f"no worker available: {why}", "NoWorker")

    async def _attempt(
        self,
        dispatch: Dispatch,
        routed: Routed,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        rid_header: bytes,
        responder: Responder,
    ) -> None:
        worker = dispatch.worker
        sent = time.perf_counter()
        timeout = self._config.request_timeout_secs
        try:
            upstream = await self._pool.request(
                worker, "POST", routed.path, headers, body, timeout=timeout
            )
        except ConnectError as exc:
            self._monitor.report_failure(worker, str(exc), refused=True)
            raise _Failed("connect_error") from None
        except (UpstreamClosed, UpstreamError) as exc:
            if isinstance(exc, UpstreamTimeout):
                raise
            self._monitor.report_failure(worker, str(exc), refused=False)
            raise _Failed("upstream_closed") from None
        try:
            extra = rid_header + WORKER_HEADER + b": " + worker.encode() + b"\r\n"
            content_type = upstream.header(b"content-type") or b"application/json"
            if upstream.status in RETRY_STATUSES:
                payload = await upstream.read(timeout)
                raise _Failed(f"status_{upstream.status}", (upstream.status, payload, content_type))
            if routed.stream and upstream.status == 200:
                last_event = await self._relay_stream(upstream, responder, extra, content_type)
                self._observe_stream(dispatch, routed, last_event)
            else:
                payload = await upstream.read(timeout)
                responder.send(upstream.status, payload, content_type, extra)
                if upstream.status == 200:
                    self._observe_body(dispatch, routed, payload)
            self._metrics.requests.labels(worker, str(upstream.status)).inc()
            self._metrics.upstream_latency.observe(time.perf_counter() - sent)
        except UpstreamClosed:
            self._monitor.report_failure(worker, "closed mid-response", refused=False)
            self._engine.fail(dispatch, "closed_mid_response")
            if not responder.streaming:
                raise _Failed("closed_mid_response") from None
            responder.end()  # the client has part of a stream: end it, no retry
        finally:
            upstream.abort()  # no-op when the body was read to the end (back in the pool)

    async def _relay_stream(
        self,
        upstream: UpstreamResponse,
        responder: Responder,
        extra: bytes,
        content_type: bytes,
    ) -> bytes:
        """Pass every chunk on as it arrives; return the last complete SSE event's data."""
        responder.start_stream(upstream.status, content_type, extra)
        tail = b""
        async for chunk in upstream:
            responder.write(chunk)
            tail = (tail + chunk)[-65536:]  # the final events fit: meta_info / usage
        responder.end()
        return _last_data_event(tail)

    def _observe_body(self, dispatch: Dispatch, routed: Routed, payload: bytes) -> None:
        try:
            reply = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        first = reply[0] if isinstance(reply, list) and reply else reply
        if isinstance(first, dict):
            self._observe(dispatch, routed, first, with_output=True)

    def _observe_stream(self, dispatch: Dispatch, routed: Routed, event: bytes) -> None:
        try:
            reply = orjson.loads(event) if event else None
        except orjson.JSONDecodeError:
            return
        if isinstance(reply, dict):
            # /generate events carry the cumulative text; OpenAI chunks only a delta
            self._observe(dispatch, routed, reply, with_output=routed.path == GENERATE)

    def _observe(
        self, dispatch: Dispatch, routed: Routed, reply: dict[str, Any], with_output: bool
    ) -> None:
        counts = _token_counts(reply)
        if counts is None:
            return
        prompt, cached, completion = counts
        extended = None
        if with_output and not routed.batch:
            output = _output_text(routed.path, reply)
            if output is not None:
                extended = extend_key(routed, output, self._encode)
        self._engine.observe(dispatch, Outcome(prompt, cached, completion, extended), self._clock())


def _last_data_event(tail: bytes) -> bytes:
    """The data of the last `data: {...}` event before `[DONE]` in the end of a stream."""
    for event in reversed(tail.split(b"\n\n")):
        line = event.strip()
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data.startswith(b"{"):
                return data
    return b""


def _token_counts(reply: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prompt, cached, completion) tokens from `meta_info` or OpenAI `usage`, if reported."""
    meta = reply.get("meta_info")
    if isinstance(meta, dict) and isinstance(meta.get("cached_tokens"), int):
        return (
            int(meta.get("prompt_tokens", 0)),
            meta["cached_tokens"],
            int(meta.get("completion_tokens", 0)),
        )
    usage = reply.get("usage")
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            return (
                int(usage.get("prompt_tokens", 0)),
                details["cached_tokens"],
                int(usage.get("completion_tokens", 0)),
            )
    return None


def _output_text(path: str, reply: dict[str, Any]) -> str | None:
    if path == GENERATE:
        text = reply.get("text")
        return text if isinstance(text, str) else None
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if path == CHAT:
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        return content if isinstance(content, str) else None
    text = choice.get("text")
    return text if isinstance(text, str) else None
