"""The router's lean HTTP/1.1 client to workers: keep-alive pools, bytes relayed as they arrive.

Why not aiohttp (or httpx): measured on this machine, a proxy built on aiohttp's client costs
about 650 µs of CPU per request, a lean one about 190 µs for the whole router (the client side
alone: `benchmarks/bench_upstream.py`). On two cores shared with eight workers that decides
whether the router or the GPUs are the bottleneck. So the data path is one `asyncio.Protocol` per
connection, httptools' C parser (never a hand parser), no task per request, one future per wait.

    pool = UpstreamPool()
    resp = await pool.request("http://127.0.0.1:31001", "POST", "/generate",
                              [(b"content-type", b"application/json")], body, timeout=30.0)
    resp.status, resp.header(b"content-type")
    data = await resp.read()                  # whole body, or:
    async for chunk in resp: ...              # chunks as they arrive (chunked encoding decoded)
    resp.abort()                              # the client went away: the worker sees a disconnect

    exchange = pool.send(url, "POST", "/generate", headers, body, listener, timeout=30.0)
    # no coroutine: sent at once on an idle connection (None if there is none: use `request`);
    # later listener.response_received(status, headers, body) or .response_failed(error, ...)
    exchange.cancel()                         # the client went away (the listener hears nothing)

`send` is the router's fast path for whole (not streamed) answers: it costs no coroutine, no
future and no task, and the outcome is told from the connection's own callbacks. It never
connects (that takes a coroutine) and never retries the keep-alive race (the listener is told
whether any byte came back, and sends again with `request`). Its body is taken whole, so its
connection never pauses reading.

Connections: one keep-alive pool per worker (`base_url`, parsed once and cached). `request`
reuses the most recently returned idle connection (LIFO: the one least likely to have been
closed by the worker's idle timeout, and the others may expire). A connection goes back to the
pool only when its response was read to the end, the worker answered HTTP/1.1 (asked on its
first response on the connection) and did not say `connection: close`; anything else (abort,
error, timeout, cancellation, a close-delimited body) closes it. At most `max_idle_per_host`
idle connections are kept per worker (default 256); the number of busy ones is the number of
requests in flight, and at most `max_per_host` connections (default 4096) are open to one worker
at once: past it a request fails with `LocalResourceError` (the router's limit, not the
worker's failure). A connection idle for longer than `keepalive_expiry` (default 4 s, under
uvicorn's 5 s keep-alive timeout, which SGLang serves with) is closed instead of reused: the
worker is about to close it anyway.

Retries: exactly one case is retried, the keep-alive race: a REUSED connection that the worker
closed while it sat idle (EOF or reset before any response byte) is replaced by a fresh one and
the request sent again. A request that failed on a fresh connection is never resent here;
`ConnectError` means it certainly did not reach the worker, so the caller may route it elsewhere.

Timeouts: `timeout` (per request) bounds connecting plus waiting for the response head; the
connect alone is also bounded by `connect_timeout` (default 5 s). While reading the body, an idle
gap longer than the timeout raises `UpstreamTimeout`; a long stream that keeps moving never
times out. Every timeout, error or cancellation of a waiting call closes the connection. Each
connection has one lazy timer, not one per wait (a timer costs more than the rest of a wait):
a later deadline only moves the deadline, and the timer sets itself again when it fires early.
The pool asks for its event loop once (`asyncio.get_running_loop` is a system call on Linux).

Flow control: body bytes are buffered per connection up to `HIGH_WATER` (256 KiB); above it the
socket stops being read (`pause_reading`) until the consumer takes the buffered bytes, so a slow
consumer slows the worker (TCP backpressure) instead of growing the router's memory. Each read
or iteration step hands over everything buffered so far, joined into one bytes object.

Framing and headers: the pool writes the request line, `host` and `content-length`; the caller
passes end-to-end headers (content-type, authorization, x-request-id, ...). Hop-by-hop and
framing headers from the caller (host, content-length, transfer-encoding, connection, keep-alive,
te, trailer, upgrade, expect, proxy-connection) are dropped, so they cannot desynchronise the
stream. Response header names are lower-cased; informational 1xx responses are skipped. HEAD is
not supported (httptools cannot be told that a response has no body).

Exceptions (all from this module):

    UpstreamError               base class; anything that went wrong talking to a worker
     ├── ConnectError           no connection (refused, unreachable, pool closed): the request
     │    │                     certainly did not reach the worker; safe to send elsewhere
     │    └── ConnectTimeout    connecting took too long (also an UpstreamTimeout)
     ├── UpstreamTimeout        no response head within the timeout, or a body gap longer than it
     │    └── ConnectTimeout
     ├── UpstreamClosed         the worker closed or reset the connection after the request was
     │                          sent (mid-response included), or the response was aborted
     ├── ProtocolError          the response could not be parsed as HTTP/1.1
     └── LocalResourceError     the router itself ran out of something while connecting (file
                                descriptors: EMFILE/ENFILE, buffers, memory): not the worker's
                                failure, never a reason to mark it down
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, cast
from urllib.parse import urlsplit

import httptools

_T = TypeVar("_T")

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # installed without mypy: the decorator only means something to mypyc

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[_T], _T]:
        return lambda cls: cls


HIGH_WATER = 256 * 1024
_SMALL_BODY = 64 * 1024  # below this, head and body go out in one write (one syscall)
_TIMER_SLACK = 0.001  # loop timers have millisecond resolution: a timer this early is on time
_STARTS_KEPT = 64  # per worker: request lines kept encoded (the router has three)

# Framing and hop-by-hop headers belong to this connection, not to the caller.
_DROPPED = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
        b"proxy-connection",
    }
)


@mypyc_attr(native_class=False)
class UpstreamError(Exception):
    """Base class: anything that went wrong talking to a worker."""


@mypyc_attr(native_class=False)
class ConnectError(UpstreamError):
    """No connection: the request certainly did not reach the worker (safe to retry elsewhere)."""


@mypyc_attr(native_class=False)
class UpstreamTimeout(UpstreamError):
    """No response head within the timeout, or no body progress for longer than it."""


@mypyc_attr(native_class=False)
class ConnectTimeout(ConnectError, UpstreamTimeout):
    """Connecting took too long: both a ConnectError (not sent) and an UpstreamTimeout."""


@mypyc_attr(native_class=False)
class UpstreamClosed(UpstreamError):
    """The worker closed or broke the connection after the request was sent."""


@mypyc_attr(native_class=False)
class ProtocolError(UpstreamError):
    """The worker's response could not be parsed as HTTP/1.1."""


@mypyc_attr(native_class=False)
class LocalResourceError(UpstreamError):
    """The router ran out of a resource of its own (file descriptors, buffers, memory)."""


# errors of the local machine, not of the worker, when connecting
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ResponseListener(Protocol):
    """Told the outcome of `UpstreamPool.send`, once (from the connection's callbacks)."""

    def response_received(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None: ...

    def response_failed(self, error: UpstreamError, reached: bool, headed: bool) -> None:
        """`reached`: a byte of the response came (else the request may never have reached the
        worker: a keep-alive race); `headed`: its status line and headers came."""


class Exchange(Protocol):
    """A request `UpstreamPool.send` sent, until its listener is told the outcome."""

    def cancel(self) -> None:
        """Drop it (the client went away): the connection closes, the listener hears nothing."""


# Connection states. A connection serves one exchange at a time: IDLE (pooled or fresh) →
# HEAD (request written) → BODY (head parsed) → IDLE again when released, or CLOSED.
_IDLE, _HEAD, _BODY, _CLOSED = range(4)


class _Host:
    """One worker's address and its idle connections (a LIFO stack)."""

    __slots__ = ("generation", "head_middle", "host", "idle", "open", "port", "starts")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        # what follows the path in every request head to this worker, up to the length
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets
        self.head_middle = b" HTTP/1.1\r\nhost: %s:%d\r\ncontent-length: " % (name.encode(), port)
        self.starts: dict[tuple[str, str], bytes] = {}  # (method, path) -> head up to the length
        self.idle: list[_Connection] = []
        self.open = 0  # connections to this worker, idle and busy (and connecting)
        self.generation = 0  # bumped by drop_host: older connections are never pooled again


def _parse_base_url(base_url: str) -> _Host:
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"upstream URL must be http://host:port, got {base_url!r}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"upstream URL must not have a path or query, got {base_url!r}")
    return _Host(parts.hostname, parts.port or 80)


class _Connection(asyncio.Protocol):
    """One socket to a worker: writes a request, parses its response, buffers the body."""

    __slots__ = (
        "_deadline",
        "_http11",
        "_parser",
        "_paused",
        "_pool",
        "_state",
        "_timer",
        "_timer_at",
        "_transport",
        "_wait_timeout",
        "_waiter",
        "_what",
        "body_done",
        "buffered",
        "chunks",
        "error",
        "generation",
        "headers",
        "host",
        "idle_since",
        "keep_alive",
        "listener",
        "loop",
        "pooled",
        "response_started",
        "status",
    )

    def __init__(self, pool: UpstreamPool, host: _Host, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self.loop = loop
        self.host = host
        self.generation = host.generation
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._state = _IDLE
        self._waiter: asyncio.Future[None] | None = None
        # One lazy timer per connection, not one per wait (see `next_event`).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # loop time the timer fires at
        self._deadline = 0.0  # of the current wait
        self._what = ""  # what the current wait is for, and its timeout (for the message)
        self._wait_timeout = 0.0
        self._http11 = False  # the worker answered HTTP/1.1 on this connection
        self._paused = False
        self.pooled = False  # in its host's idle stack
        self.idle_since = 0.0
        self.listener: ResponseListener | None = None  # `UpstreamPool.send`'s, while it waits
        self.chunks: deque[bytes] = deque()
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks.clear()
        self.buffered = 0
        self.body_done = False
        self.keep_alive = False
        self.response_started = False  # any response byte seen: the request reached the worker
        self.error: UpstreamError | None = None

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED or self._transport is None or self._transport.is_closing()

    # --- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        self._pool._opened(self)

    def data_received(self, data: bytes) -> None:
        if self._state not in (_HEAD, _BODY):
            self.abort()  # bytes nobody asked for: the stream is out of sync
            return
        self.response_started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the worker switched protocols (upgrade not supported)"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"unparseable response from the worker: {exc}"))
        if self.listener is not None:
            if self.body_done or self.error is not None:
                self._deliver()
            elif self._state == _BODY:  # the body keeps coming: its idle gap is timed
                self.watch(self._wait_timeout, "no body bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        state, self._state = self._state, _CLOSED
        self._stop_timer()
        self._pool._lost(self)
        if state == _HEAD:
            how = f"reset ({exc})" if exc else "closed"
            self._set_error(UpstreamClosed(f"the worker {how} the connection before answering"))
        elif state == _BODY and not self.body_done:
            if self._close_delimited():
                self._complete(keep_alive=False)
            else:
                how = f"reset ({exc})" if exc else "closed"
                self._set_error(UpstreamClosed(f"the worker {how} the connection mid-response"))
        if self.listener is not None:
            self._deliver()

    # --- httptools callbacks
    def on_message_begin(self) -> None:
        if self._state != _HEAD:
            raise ProtocolError("a response arrived that nobody asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status: int = self._parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the real head follows
            self.headers = []
            return
        self.status = status
        self._state = _BODY
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if (
            self.buffered > HIGH_WATER
            and self.listener is None  # a listener takes the whole body at once: no pause
            and not self._paused
            and self._transport is not None
        ):
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._state == _HEAD:
            return  # the end of a 1xx response
        parser = self._parser
        keep_alive: bool = parser.should_keep_alive()
        if keep_alive and not self._http11:  # asked on the first response only: a str each time
            self._http11 = keep_alive = parser.get_http_version() == "1.1"
        self._complete(keep_alive)

    # --- used by UpstreamPool and UpstreamResponse
    def send(self, data: bytes, body: bytes) -> None:
        """Write one request; the connection must be idle."""
        if self.closed:
            raise ConnectError("the connection closed before the request was sent")
        self._reset()
        self._state = _HEAD
        assert self._transport is not None
        if len(body) <= _SMALL_BODY:
            self._transport.write(data + body)
        else:  # a big prompt is not copied; two writes are cheap next to it
            self._transport.write(data)
            self._transport.write(body)

    @property
    def waiting_head(self) -> bool:
        return self._state == _HEAD

    def next_event(self, timeout: float, what: str) -> asyncio.Future[None]:
        """A future resolved by the next event (bytes, end, error), failed with UpstreamTimeout
        after `timeout`. A plain future, not a coroutine: one frame less per wait on the hot
        path. Whoever awaits it must `abort()` on failure (the exchange cannot be resumed).

        The timer is lazy: one per connection, left running when a wait ends. A wait that ends
        later than the running timer only moves the deadline (the timer, when it fires, sets
        itself again for the rest); only an earlier deadline needs a new timer. Requests on a
        keep-alive connection with the same timeout so create one timer per `timeout`, not
        one each (a timer costs more than the rest of a wait)."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._waiter = waiter
        self.watch(timeout, what)
        return waiter

    def watch(self, timeout: float, what: str) -> None:
        """Time the wait that starts now (see `next_event`): a timeout fails it."""
        self._what = what
        self._wait_timeout = timeout
        deadline = self._deadline = self.loop.time() + max(timeout, 0.0)
        if self._timer is None or self._timer_at > deadline:
            self._arm(deadline)

    def take(self) -> bytes | None:
        """All buffered body bytes (joined if several chunks wait), or None if there are none."""
        chunks = self.chunks
        if not chunks:
            return None
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused and self._transport is not None and self._state != _CLOSED:
            self._paused = False
            self._transport.resume_reading()
        return chunk

    def release(self) -> None:
        """The response was read to its end: ready for the next request on this socket."""
        self._state = _IDLE
        self.idle_since = self.loop.time()
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def abort(self) -> None:
        """Close now (RST-like, no flush): the worker sees a disconnect at once."""
        if self._state != _CLOSED:
            if not self.body_done:
                self._set_error(UpstreamClosed("the response was aborted"))
            self._state = _CLOSED
            self._stop_timer()
            if self._transport is not None:
                self._transport.abort()

    # --- internals
    def _close_delimited(self) -> bool:
        """A body without content-length or chunked encoding ends when the worker closes."""
        if self.status in (204, 304):
            return False
        return not any(
            name in (b"content-length", b"transfer-encoding") for name, _ in self.headers
        )

    def _complete(self, keep_alive: bool) -> None:
        self.body_done = True
        self.keep_alive = keep_alive
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        self.keep_alive = False
        if not self.body_done:
            self._set_error(error)
        self.abort()

    def _set_error(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None  # the timer stays: see `next_event`
            if not waiter.done():
                waiter.set_result(None)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        listener = self.listener
        if (waiter is None or waiter.done()) and listener is None:
            return  # nothing waits: no timer until the next wait
        if self.loop.time() + _TIMER_SLACK < self._deadline:  # the wait began after the timer
            self._arm(self._deadline)
            return
        message = f"{self._what} from the worker within {self._wait_timeout:.3g} s"
        if listener is not None:
            self._set_error(UpstreamTimeout(message))
            self._deliver()
            return
        self._waiter = None
        assert waiter is not None
        waiter.set_exception(UpstreamTimeout(message))

    def _deliver(self) -> None:
        """`send`'s outcome to its listener, once; the connection goes back or closes first."""
        listener = self.listener
        if listener is None:
            return
        self.listener = None
        error = None if self.body_done else self.error
        if error is not None:
            reached, headed = self.response_started, self.status != 0
            self.abort()
            listener.response_failed(error, reached, headed)
            return
        status, headers = self.status, self.headers
        body = self.take() or b""
        if self.keep_alive:
            self._pool._release(self)
        else:
            self.abort()
        listener.response_received(status, headers, body)

    def cancel(self) -> None:
        """`send`'s caller gave up (its client went away): close, and tell nobody."""
        self.listener = None
        self.abort()


class UpstreamResponse:
    """A worker's response: status and headers at once, the body read or iterated after.

    Must be read to its end or aborted; that is what returns (or closes) its connection.
    Ending happens exactly once: a finished response never touches its (maybe reused) connection.
    """

    __slots__ = ("_conn", "_done", "_end_error", "_pool", "_timeout", "headers", "status")

    def __init__(self, pool: UpstreamPool, conn: _Connection, timeout: float) -> None:
        self._pool = pool
        self._conn = conn
        self._timeout = timeout
        self._done = False
        self._end_error: UpstreamError | None = None
        self.status = conn.status
        self.headers = conn.headers

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name matched case-insensitively), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read(self, timeout: float | None = None) -> bytes:
        """The whole body (chunked encoding decoded). `timeout` bounds each idle gap."""
        conn = self._conn
        if conn.body_done and not self._done:  # all of it came with the head: nothing to wait for
            body = conn.take()
            self._finish(None)
            return b"" if body is None else body
        gap = self._timeout if timeout is None else timeout
        parts: list[bytes] = []
        while (chunk := await self._next(gap)) is not None:
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        """The body bytes that arrived since the last call (at least one byte), as they come."""
        chunk = await self._next(self._timeout)
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    def abort(self) -> None:
        """Close the connection now (the client went away); idempotent, never pools it."""
        if not self._done:
            self._done = True
            self._end_error = UpstreamClosed("the response was aborted")
            self._conn.abort()

    def __del__(self) -> None:
        # A safety net, not the protocol: a response dropped unread must not hold its socket
        # (nor its worker's KV) until the pool closes.
        if not self._done:
            with contextlib.suppress(Exception):  # the loop may be closed already
                self._conn.abort()

    # --- internals
    async def _next(self, timeout: float) -> bytes | None:
        while True:
            if self._done:
                if self._end_error is not None:
                    raise self._end_error
                return None
            conn = self._conn
            chunk = conn.take()
            if chunk is not None:
                return chunk
            if conn.body_done:
                self._finish(None)
            elif conn.error is not None:
                self._finish(conn.error)
            else:
                try:
                    await conn.next_event(timeout, "no body bytes")
                except UpstreamTimeout as exc:
                    self._finish(exc)
                except BaseException:
                    self._finish(UpstreamClosed("reading the response was cancelled"))
                    raise

    def _finish(self, error: UpstreamError | None) -> None:
        """The end of the body (or of trying): pool the connection or close it, once."""
        if self._done:
            return
        self._done = True
        self._end_error = error
        conn = self._conn
        if error is None and conn.keep_alive:
            self._pool._release(conn)
        else:
            conn.abort()


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to workers, one idle stack per worker.

    Lives on one event loop (the router's). See the module docstring for reuse, retry,
    timeout and flow-control rules.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        max_idle_per_host: int = 256,
        keepalive_expiry: float = 4.0,
        max_per_host: int = 4096,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._max_per_host = max_per_host
        self._max_idle = max_idle_per_host
        self._keepalive_expiry = keepalive_expiry
        self._hosts: dict[str, _Host] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # see `_running_loop`
        self._open: set[_Connection] = set()
        self._closed = False
        self._all_lost: asyncio.Future[None] | None = None

    async def request(
        self,
        base_url: str,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        *,
        timeout: float,
    ) -> UpstreamResponse:
        """Send one request; return once the status line and headers are parsed.

        `timeout` bounds connect + head, then each idle gap of the body. Raises ConnectError
        (not sent), UpstreamTimeout, UpstreamClosed or ProtocolError.
        """
        host = self._hosts.get(base_url) or self._add_host(base_url)
        loop = self._running_loop()
        now = loop.time()
        deadline = now + timeout
        head = _encode_head(host, method, path, headers, len(body))
        conn = self._pop_idle(host, now)
        reused = conn is not None
        while True:  # one exchange; twice if a reused connection hit the keep-alive race
            if conn is None:
                conn = await self._connect(host, loop, deadline)
            conn.send(head, body)
            while conn.waiting_head:
                try:
                    await conn.next_event(deadline - loop.time(), "no response head")
                except BaseException:  # timeout or cancellation: the request is half done
                    conn.abort()
                    raise
            error = conn.error
            if error is None:
                return UpstreamResponse(self, conn, timeout)
            if reused and isinstance(error, UpstreamClosed) and not conn.response_started:
                # The keep-alive race: the worker closed this socket while it sat idle and
                # never saw the request. Retried once, on a fresh connection only.
                conn, reused = None, False
                continue
            raise error

    def send(
        self,
        base_url: str,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        listener: ResponseListener,
        *,
        timeout: float,
    ) -> Exchange | None:
        """`request` without a coroutine: send on an idle keep-alive connection now and tell
        `listener` the whole response (or the failure) when it is in. None (nothing sent) when
        no idle connection is at hand: then use `request`, which connects.

        The returned handle's `cancel()` drops the exchange (closing its connection)."""
        host = self._hosts.get(base_url)
        if host is None:
            return None
        head = _encode_head(host, method, path, headers, len(body))
        conn = self._pop_idle(host, self._running_loop().time())
        if conn is None:
            return None
        conn.send(head, body)
        conn.listener = listener
        conn.watch(timeout, "no response head")
        return conn

    async def close(self) -> None:
        """Close every connection, idle or busy (busy responses raise UpstreamClosed)."""
        self._closed = True
        for host in self._hosts.values():
            host.idle.clear()
        for conn in list(self._open):
            conn.abort()
        if self._open:  # wait for connection_lost: the sockets are closed when this returns
            self._all_lost = asyncio.get_running_loop().create_future()
            await self._all_lost

    def idle_connections(self, base_url: str) -> int:
        """Idle keep-alive connections to one worker (tests, metrics)."""
        host = self._hosts.get(base_url)
        return len(host.idle) if host is not None else 0

    def open_connections(self) -> int:
        """Open sockets of this pool, idle and busy (tests, metrics, leak checks)."""
        return len(self._open)

    def drop_host(self, base_url: str) -> None:
        """Forget a worker that was removed or restarted: close its idle connections now, and
        close its busy ones when their responses end instead of pooling them."""
        host = self._hosts.pop(base_url, None)
        if host is None:
            return
        host.generation += 1
        idle, host.idle = host.idle, []
        for conn in idle:
            conn.abort()

    # --- internals
    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this pool runs on. Asked for once, not per request: on Linux,
        `asyncio.get_running_loop` makes a system call (getpid, to notice a fork)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _add_host(self, base_url: str) -> _Host:
        host = self._hosts[base_url] = _parse_base_url(base_url)
        return host

    def _pop_idle(self, host: _Host, now: float) -> _Connection | None:
        idle = host.idle
        while idle:
            conn = idle.pop()
            conn.pooled = False
            if now - conn.idle_since > self._keepalive_expiry:
                conn.abort()  # the worker's own idle timeout is about to close it
            elif not conn.closed:
                return conn
        return None

    async def _connect(
        self, host: _Host, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> _Connection:
        if self._closed:
            raise ConnectError("the upstream pool is closed")
        where = f"{host.host}:{host.port}"
        if host.open >= self._max_per_host:  # the router's own limit, not the worker's fault
            raise LocalResourceError(f"{host.open} connections to {where} open already")
        host.open += 1  # counted from the start: connections being made count too
        try:
            return await self._open_connection(host, loop, deadline, where)
        finally:
            host.open -= 1  # (counted by `_opened` / `_lost` once it exists)

    async def _open_connection(
        self, host: _Host, loop: asyncio.AbstractEventLoop, deadline: float, where: str
    ) -> _Connection:
        budget = min(self._connect_timeout, deadline - loop.time())
        # Shielded: a caller cancelled (its client went away) must not cancel a connect that
        # is completing, as uvloop then closes the socket without `connection_lost` (the pool
        # would count it open forever); the connection is closed once made instead.
        connecting = loop.create_task(
            loop.create_connection(lambda: _Connection(self, host, loop), host.host, host.port)
        )
        try:
            _, conn = await asyncio.wait_for(asyncio.shield(connecting), budget)
        except asyncio.TimeoutError as exc:  # before OSError: on 3.11+ it is one
            connecting.cancel()  # not connected yet: nothing of it is left
            connecting.add_done_callback(_close_unused)
            raise ConnectTimeout(f"could not connect to {where} within {budget:.3g} s") from exc
        except OSError as error:  # (a differently typed name per clause: mypyc checks types)
            if error.errno in LOCAL_ERRNOS:
                raise LocalResourceError(f"connecting to {where}: {error}") from error
            raise ConnectError(f"could not connect to {where}: {error}") from error
        except BaseException:  # cancelled
            connecting.add_done_callback(_close_unused)
            raise
        return conn

    def _release(self, conn: _Connection) -> None:
        """A response ended cleanly: keep its connection for the next request, if allowed."""
        host = conn.host
        if (
            self._closed
            or conn.closed
            or conn.generation != host.generation
            or len(host.idle) >= self._max_idle
        ):
            conn.abort()
            return
        conn.release()
        conn.pooled = True
        host.idle.append(conn)

    def _opened(self, conn: _Connection) -> None:
        self._open.add(conn)
        conn.host.open += 1
        if self._closed:
            conn.abort()

    def _lost(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            conn.host.open -= 1
        if conn.pooled:  # closed by the worker while idle
            conn.pooled = False
            # not found: a fresh connection, or one drop_host already let go of
            with contextlib.suppress(ValueError):
                conn.host.idle.remove(conn)
        if not self._open and self._all_lost is not None and not self._all_lost.done():
            self._all_lost.set_result(None)


def _close_unused(connecting: asyncio.Task[tuple[asyncio.BaseTransport, _Connection]]) -> None:
    """A connect nobody waits for any more: close what it made (or take its error)."""
    if connecting.cancelled():
        return
    if connecting.exception() is None:
        connecting.result()[1].abort()


def _encode_head(
    host: _Host, method: str, path: str, headers: Sequence[tuple[bytes, bytes]], length: int
) -> bytes:
    """Request line, host, content-length and the caller's end-to-end headers."""
    parts = [_start(host, method, path), str(length).encode("ascii"), b"\r\n"]
    lines = 3  # request line, host, content-length
    for name, value in headers:
        if name.lower() not in _DROPPED:
            parts.append(name + b": " + value + b"\r\n")
            lines += 1
    parts.append(b"\r\n")
    head = b"".join(parts)
    # One scan instead of a check per header: a CR or LF inside a name, value or the path
    # would smuggle a header (or a request) past the worker.
    if head.count(b"\n") != lines + 1 or head.count(b"\r") != lines + 1:
        raise ValueError("line break in the request path or a request header")
    return head


def _start(host: _Host, method: str, path: str) -> bytes:
    """The head up to the content length's value: request line, host (encoded once per path)."""
    start = host.starts.get((method, path))
    if start is None:
        if path[:1] != "/" or " " in path:
            raise ValueError(f"bad request path {path!r}")
        if method == "HEAD":
            raise ValueError("HEAD is not supported (the parser cannot expect an empty body)")
        start = method.encode("ascii") + b" " + path.encode("latin-1") + host.head_middle
        if len(host.starts) < _STARTS_KEPT:
            host.starts[(method, path)] = start
    return start
