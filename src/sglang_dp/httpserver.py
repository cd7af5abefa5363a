"""A lean HTTP/1.1 server on asyncio protocols and httptools (router front and simulator).

Why not Starlette: eight simulated workers, a router and a load generator share two cores, and a
general-purpose ASGI stack costs several times the CPU per request. Here a request is parsed by
httptools' C parser and handed to one callback, `handler(request, responder)`, with no task per
request: the handler answers at once (`responder.send`) or keeps the responder and answers later
(the scheduler's events), streaming with chunked transfer encoding (`start_stream`, `write`,
`end`).

Keep-alive and pipelining: requests on one connection are answered in order (a pipelined request
waits until the previous response ends). At most `MAX_PIPELINE` parsed requests wait; above that
the socket is not read until they are answered (TCP backpressure, not memory). A closed
connection calls `responder.on_disconnect` when its response was not finished, so the app can
abort the request and free its KV. An end of file from the client counts as a close: a client
that half-closes its socket is taken as gone (LLM clients abort by closing).

Bad requests get an error answer and the connection is closed, after the answers to the requests
before them on the connection (in order) — never a crash or a hang:

    400  unparseable (bad method, request line, header, chunk size, framing), an HTTP/2 preface,
         or a protocol upgrade with a body
    408  a started request that sent nothing new for `request_timeout` seconds (default 60)
    413  a body over `max_body` bytes (refused from its content-length before it is read)
    431  a request line and headers over `MAX_HEAD` bytes (64 KiB)

The error answer is followed by a half-close; bytes the client still sends are read and
dropped for up to `LINGER_S`, so that closing does not reset the connection before the client
has read the answer (a 413 for a large upload). An `Upgrade` request without a body (curl's
`h2c`, `CONNECT`) is answered as a plain HTTP/1.1 request: RFC 9110 lets a server ignore it.
`expect: 100-continue` gets its interim answer when the request is next in line.

HEAD gets the head a GET would get (its content-length included) and no body. An HTTP/1.0
client gets no chunked encoding: a stream is close-delimited (its end closes the connection).

Connection ownership (as uvicorn's protocols have it):
- write flow control: when the transport's write buffer is over its high-water mark
  (`pause_writing`), `Responder.drain()` gives a future the writer awaits until it drains
  (`resume_writing`); the router's stream relay awaits it, so a client that stops reading stops
  the reading of its worker, and memory per connection stays bounded;
- keep-alive idle timeout: a connection with no request under way for `keepalive_timeout` s
  (default 5, uvicorn's) is closed. One server-wide sweep timer, not a timer per request: a
  connection notes the sweep's tick when it last saw traffic;
- a registry of connections (`HttpServer.connections`): `shutdown(grace)` stops listening,
  closes idle connections at once, lets the responses in flight finish (their connection closes
  after them; a head not yet written says `connection: close`), answers requests that arrive on
  busy connections meanwhile with 503 + `connection: close`, and aborts what is left after
  `grace` s;
- a connection cap (`max_connections`, default 10000): a connection over it gets a 503 and is
  closed at once.
- A broken stream (`Responder.abort_stream`) sends its last bytes and closes the connection
  without the clean `0\r\n\r\n` terminator, so the client cannot mistake it for a whole answer.
- For the simulator's fault injection: `Responder.send_partial` (a head whose content-length
  the bytes sent fall short of) and `Responder.reset` (a close with a TCP reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import httptools
import orjson

log = logging.getLogger(__name__)

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
SSE = b"text/event-stream"

MAX_HEAD = 64 * 1024  # request line + headers; httptools would buffer an endless header
MAX_PIPELINE = 64  # requests parsed ahead of their answer before the socket stops being read
REQUEST_TIMEOUT_S = 60.0  # a started request that sends nothing for this long gets a 408
KEEPALIVE_TIMEOUT_S = 5.0  # an idle keep-alive connection is closed after this long
MAX_CONNECTIONS = 10000  # client connections served at once; more get a 503 and are closed
LINGER_S = 2.0  # after an error answer, what the client still sends is dropped this long

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_HEAD_TOO_LARGE = b"request line and headers larger than %d bytes" % MAX_HEAD
_ERROR_KINDS = {
    400: "BadRequestError",
    408: "RequestTimeout",
    413: "PayloadTooLargeError",
    431: "RequestHeaderFieldsTooLarge",
    503: "ServiceUnavailable",
}


def error_body(message: str, kind: str, code: int) -> bytes:
    """The JSON error envelope every error answer of the router carries (one copy)."""
    return orjson.dumps({"error": {"message": message, "type": kind, "code": code}})


class HttpRequest:
    """A parsed request: method and path as str, header names lower-case, body as bytes."""

    __slots__ = ("body", "headers", "http10", "method", "path", "query")

    def __init__(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.http10 = False  # an HTTP/1.0 client: no chunked encoding


Handler = Callable[[HttpRequest, "Responder"], None]

_STATUS_LINES: dict[int, bytes] = {}


def _status_line(code: int) -> bytes:
    # cached: an enum lookup and a format per response are measurable at thousands per second
    line = _STATUS_LINES.get(code)
    if line is None:
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[code] = f"HTTP/1.1 {code} {phrase}\r\n".encode()
    return line


class Responder:
    """Writes one response on its connection (once), plain or streamed."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_head_only",
        "_head_pending",
        "_keep_alive",
        "done",
        "on_disconnect",
        "started",
        "streaming",
    )

    def __init__(
        self, conn: _Connection, keep_alive: bool, head_only: bool = False, chunked: bool = True
    ) -> None:
        self._conn = conn
        self._keep_alive = keep_alive
        self._head_only = head_only  # a HEAD request: the head a GET gets, no body
        self._chunked = chunked  # False for HTTP/1.0: a stream is close-delimited
        self.done = False
        self.started = False  # bytes of this response were written to the client
        self.streaming = False
        self._head_pending = b""  # a stream's head goes out with its first chunk (one write)
        self.on_disconnect: Callable[[], object] | None = None

    @property
    def closed(self) -> bool:
        """The client went away (or the response is over): writing is pointless."""
        return self.done or self._conn.closed

    def drain(self) -> asyncio.Future[None] | None:
        """None when the client keeps up; else a future done once its buffer drained (or it
        went away). A writer awaits it between chunks: see flow control in the docstring."""
        return self._conn.drain()

    def _head(self, code: int, content_type: bytes, extra: bytes) -> bytes:
        conn = b"" if self._keep_alive else b"connection: close\r\n"
        return _status_line(code) + b"content-type: " + content_type + b"\r\n" + conn + extra

    def send(
        self, code: int, body: bytes, content_type: bytes = JSON, headers: bytes = b""
    ) -> None:
        """The whole response at once (never a second head: a stream under way is broken)."""
        if self.started:
            self.abort_stream()
            return
        self.done = self.started = True
        self.streaming = False  # a stream whose head never went out can still become this
        self._head_pending = b""
        length = b"content-length: %d\r\n\r\n" % len(body)
        head = self._head(code, content_type, headers + length)
        self._conn.write(head if self._head_only else head + body)
        self._conn.response_done(self._keep_alive)

    def start_stream(
        self, code: int = 200, content_type: bytes = SSE, headers: bytes = b""
    ) -> None:
        """Start a streamed response (its head leaves with the first chunk); `write`, then
        `end`. Chunked for HTTP/1.1; close-delimited for HTTP/1.0.

        `headers`: extra header lines, each ending with CRLF.
        """
        self.streaming = True
        if self._chunked:
            framing = b"transfer-encoding: chunked\r\n\r\n"
        else:
            self._keep_alive = False  # the end of the body is the end of the connection
            framing = b"\r\n"
        self._head_pending = self._head(
            code, content_type, headers + b"cache-control: no-cache\r\n" + framing
        )

    def write(self, data: bytes) -> None:
        """One chunk of a streamed response."""
        if data and not self.done:
            self.started = True
            if self._head_only:
                data = b""
            elif self._chunked:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            self._conn.write(self._head_pending + data)
            self._head_pending = b""

    def write_unframed(self, data: bytes) -> None:
        """Bytes as they are, outside any chunk framing (the simulator's --garble-rate)."""
        self.started = True
        self._conn.write(self._head_pending + data)
        self._head_pending = b""

    def end(self, data: bytes = b"") -> None:
        """Last chunk (optional) and the end of a streamed response."""
        if self.done:
            return
        self.done = self.started = True
        if self._head_only:
            tail = b""
        elif self._chunked:
            tail = (b"%x\r\n%b\r\n" % (len(data), data) if data else b"") + b"0\r\n\r\n"
        else:
            tail = data
        self._conn.write(self._head_pending + tail)
        self._conn.response_done(self._keep_alive)

    def send_partial(self, code: int, body: bytes, sent: int, content_type: bytes = JSON) -> None:
        """A head declaring `len(body)` bytes, then only the first `sent` of them; the response
        stays open until `abort_stream` (a close) or `reset` (the simulator's truncated and
        reset answers)."""
        self.started = self.streaming = True
        length = b"content-length: %d\r\n\r\n" % len(body)
        self._conn.write(self._head(code, content_type, length) + body[:sent])

    def reset(self) -> None:
        """Close the connection with a TCP reset (SO_LINGER 0: what is unsent is dropped, the
        client reads ECONNRESET), as a crashed host or a middlebox does (the simulator's
        --reset-rate)."""
        if self.done:
            return
        if self._head_pending:
            self._conn.write(self._head_pending)
            self._head_pending = b""
        self.done = self.started = True
        self._conn.reset()

    def abort_stream(self, data: bytes = b"") -> None:
        """A broken stream: `data` (say an error event) as its last chunk, then the connection
        closes WITHOUT the clean terminator, so the client cannot take it for a whole answer."""
        if self.done:
            return
        self.write(data)
        if self._head_pending:  # a head without a body byte yet: it goes out first
            self._conn.write(self._head_pending)
            self._head_pending = b""
        self.done = self.started = True
        self._conn.close_now()


class _Reject(Exception):
    """Raised inside a parser callback: stop parsing, answer `code`, close."""

    def __init__(self, code: int, message: bytes) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class _Connection(asyncio.Protocol):
    """One client connection: parse, dispatch in order, track the open response."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._handler = server.handler
        self._max_body = server.max_body
        self._request_timeout = server.request_timeout
        self._body_size = 0
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._queue: deque[tuple[HttpRequest, bool]] = deque()
        self._active: Responder | None = None
        self._in_head = True  # the next bytes belong to a request line or headers
        self._in_message = False  # a request has begun and is not complete yet
        self._head_bytes = 0  # bytes read while a head was incomplete (an endless header)
        self._header_bytes = 0  # names and values of this request's headers
        self._paused = False
        self._continue_pending = False  # `expect: 100-continue` waits for its turn
        self._failure: tuple[int, bytes] | None = None  # the error answer due after the others
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None  # what a writer awaits while paused
        self.tick = server.tick  # the idle sweep's tick when this connection last had traffic
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        server = self._server
        if len(server.connections) >= server.max_connections or server.shutting_down:
            why = b"is shutting down" if server.shutting_down else b"has too many connections"
            self._failure = (503, b"the server %b: try again later" % why)
            self._send_failure()
            return
        server.connections.add(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    def drain(self) -> asyncio.Future[None] | None:
        """See `Responder.drain`."""
        if not self._write_paused or self.closed:
            return None
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        return self._drained

    def _wake_writer(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.tick = self._server.tick
        if self._failure is not None:
            return  # after an error nothing more is parsed: the bytes are dropped
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._after_upgrade(data, exc.args[0] if exc.args else len(data))
            return
        except httptools.HttpParserCallbackError as exc:
            reject = exc.__context__
            if isinstance(reject, _Reject):
                self._fail(reject.code, reject.message)
            else:  # a bug in a callback: answer, do not let the loop kill the connection
                log.error("request parsing failed", exc_info=reject)
                self._fail(500, b"internal error while reading the request")
            return
        except httptools.HttpParserError as exc:
            self._fail(400, str(exc).encode())
            return
        if self._in_message:
            self._watch()
        if self._in_head and self._head_bytes > MAX_HEAD:
            self._fail(431, _HEAD_TOO_LARGE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        self._wake_writer()
        self._server.forget(self)
        active, self._active = self._active, None
        self._queue.clear()
        if active is not None and not active.done and active.on_disconnect is not None:
            active.on_disconnect()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._header_bytes = 0
        self._in_message = True

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._header_bytes + len(self._url) > MAX_HEAD:  # a big head that came in one read
            raise _Reject(431, _HEAD_TOO_LARGE)
        headers = self._headers
        if self._parser.should_upgrade() and (
            "transfer-encoding" in headers or headers.get("content-length", "0") != "0"
        ):
            # httptools skips the body of an upgrade request: it cannot be parsed in place
            raise _Reject(400, b"a protocol upgrade with a request body is not supported")
        length = headers.get("content-length")
        if self._max_body is not None and length is not None and int(length) > self._max_body:
            raise _Reject(413, b"request body larger than %d bytes" % self._max_body)
        if "expect" in headers:
            self._expect(headers["expect"])

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._max_body is not None and self._body_size > self._max_body:
            raise _Reject(413, b"request body larger than %d bytes" % self._max_body)
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._in_message = False
        self._continue_pending = False
        if self._timer is not None:
            self._stop_timer()
        if self.closed:
            return
        parser = self._parser
        path, _, query = self._url.decode("latin-1").partition("?")
        method = parser.get_method().decode()
        request = HttpRequest(method, path, query, self._headers, b"".join(self._body))
        keep_alive = parser.should_keep_alive()
        # HTTP/1.0 keeps a connection only when told (`connection: keep-alive`): the version
        # (a str built per call) is asked only then, or without keep-alive
        if (not keep_alive or "connection" in self._headers) and parser.get_http_version() == "1.0":
            request.http10 = True
        if self._active is None and not self._queue:
            self._dispatch(request, keep_alive)
            return
        self._queue.append((request, keep_alive))
        if len(self._queue) >= MAX_PIPELINE and not self._paused and self._transport:
            self._paused = True  # the client pipelines faster than it is answered
            self._transport.pause_reading()

    # internals
    def _dispatch_next(self) -> None:
        if self.closed or self._active is not None:
            return
        if not self._queue:
            self._idle()
            return
        request, keep_alive = self._queue.popleft()
        if self._paused and len(self._queue) < MAX_PIPELINE // 2 and self._transport:
            self._paused = False
            self._transport.resume_reading()
        self._dispatch(request, keep_alive)

    def _dispatch(self, request: HttpRequest, keep_alive: bool) -> None:
        responder = Responder(self, keep_alive, request.method == "HEAD", not request.http10)
        self._active = responder
        if self._server.shutting_down:  # a request that came in on a busy connection
            responder._keep_alive = False
            responder.send(
                503, error_body("the server is shutting down", "ServiceUnavailable", 503)
            )
            return
        try:
            self._handler(request, responder)
        except Exception:  # a bug must not hang the client
            log.exception("handler failed on %s %s", request.method, request.path)
            if responder.started:  # a response under way cannot become a 500 any more
                responder.abort_stream()
            else:
                responder.send(500, error_body("internal error", "InternalError", 500))

    def _idle(self) -> None:
        """Every parsed request is answered: a due error answer or 100-continue goes out."""
        if self._failure is not None:
            self._send_failure()
        elif self._continue_pending:
            self._continue_pending = False
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _expect(self, value: str) -> None:
        if value.lower() != "100-continue" or self._parser.get_http_version() != "1.1":
            return
        if self._active is None and not self._queue:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        else:  # an interim answer now would land inside the previous response
            self._continue_pending = True

    def _after_upgrade(self, data: bytes, offset: int) -> None:
        """The upgrade request was parsed as a plain one; parse what follows it afresh."""
        self._parser = httptools.HttpRequestParser(self)
        self._in_head, self._head_bytes = True, 0
        if offset < len(data):
            self.data_received(data[offset:])

    def _fail(self, code: int, message: bytes) -> None:
        """Answer `code` once the requests before it are answered; then close."""
        if self._failure is not None or self.closed:
            return
        self._failure = (code, message)
        self._in_message = False
        self._stop_timer()
        if self._active is None and not self._queue:
            self._send_failure()  # else it follows the last queued answer (`_idle`)

    def _send_failure(self) -> None:
        transport = self._transport
        if self._failure is None or transport is None or self.closed:
            return
        code, message = self._failure
        self.closed = True  # nothing more is dispatched or written on this connection
        body = error_body(
            message.decode("latin-1"), _ERROR_KINDS.get(code, "BadRequestError"), code
        )
        transport.write(
            _status_line(code) + b"content-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body
        )
        # Half-close and drop what the client still sends (say the rest of a refused upload):
        # closing with unread bytes would reset the connection before the answer is read.
        if transport.can_write_eof():
            transport.write_eof()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def _watch(self) -> None:
        """A request is half received: time out if the client stops sending it."""
        loop = asyncio.get_running_loop()
        self._last_data = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self._request_timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self._timer = None
        if not self._in_message or self.closed or self._failure is not None:
            return
        loop = asyncio.get_running_loop()
        left = self._last_data + self._request_timeout - loop.time()
        if left > 0:  # bytes came since the timer was set: wait for the rest
            self._timer = loop.call_later(left, self._on_timeout)
            return
        self._fail(408, b"the request was not completed within %g s" % self._request_timeout)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def write(self, data: bytes) -> None:
        """Send bytes unless the client is gone."""
        if not self.closed and self._transport is not None:
            self._transport.write(data)

    def close_now(self) -> None:
        """End the connection after what was written (a broken stream; an idle connection)."""
        self._active = None
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def reset(self) -> None:
        """End the connection with a TCP reset (see `Responder.reset`)."""
        self._active = None
        self.closed = True
        transport = self._transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            transport.abort()

    @property
    def idle(self) -> bool:
        """No request under way: nothing is lost by closing it."""
        return (
            self._active is None
            and not self._queue
            and not self._in_message
            and self._failure is None
            and not self.closed
        )

    def shutdown(self) -> None:
        """The server is stopping: close now if idle, else after the response in flight (whose
        head, if not written yet, says so)."""
        if self.idle:
            self.close_now()
        elif self._active is not None and not self._active.started:
            self._active._keep_alive = False

    def abort(self) -> None:
        """Close at once, dropping what is unsent (the end of a shutdown's grace)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def response_done(self, keep_alive: bool) -> None:
        """The active response ended: close, or answer the next pipelined request."""
        self._active = None
        self.tick = self._server.tick  # the idle time counts from the end of the response
        if not keep_alive or (self._server.shutting_down and not self._queue):
            self.close_now()  # what the client pipelined after it is not answered
            return
        if self._queue:
            asyncio.get_running_loop().call_soon(self._dispatch_next)
        elif self._failure is not None or self._continue_pending:
            self._idle()


class HttpServer:
    """A listening server and the registry of its connections (see the module docstring)."""

    def __init__(
        self,
        handler: Handler,
        max_body: int | None,
        request_timeout: float,
        keepalive_timeout: float,
        max_connections: int,
    ) -> None:
        self.handler = handler
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.connections: set[_Connection] = set()
        self.shutting_down = False
        self.tick = 0  # counts idle sweeps; a connection notes it when it sees traffic
        # a sweep every quarter of the timeout (at most 1 s): closed within 1.25 × the timeout
        self._sweep_s = min(1.0, keepalive_timeout / 4)
        self._sweeps_idle = 4 if self._sweep_s < 1.0 else math.ceil(keepalive_timeout)
        self._sweeper: asyncio.TimerHandle | None = None
        # Any: uvloop's server says `sockets` is a list where typeshed has a tuple, and compiled
        # code would check the annotation
        self._server: Any = None
        self._all_closed: asyncio.Future[None] | None = None

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=4096
        )
        self._sweeper = loop.call_later(self._sweep_s, self._sweep)

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._server.sockets) if self._server is not None else []

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening (connections stay: see `shutdown`)."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def shutdown(self, grace: float) -> None:
        """Stop listening; close idle connections now and busy ones after their response;
        what is still open after `grace` s is aborted."""
        self.shutting_down = True
        self.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            self._all_closed = asyncio.get_running_loop().create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._all_closed), grace)
        for conn in list(self.connections):
            conn.abort()

    def forget(self, conn: _Connection) -> None:
        """A connection closed."""
        self.connections.discard(conn)
        done = self._all_closed
        if not self.connections and done is not None and not done.done():
            done.set_result(None)

    def _sweep(self) -> None:
        """Close keep-alive connections idle for longer than the timeout."""
        self.tick += 1
        oldest = self.tick - self._sweeps_idle
        for conn in [c for c in self.connections if c.tick <= oldest and c.idle]:
            conn.close_now()
        self._sweeper = asyncio.get_running_loop().call_later(self._sweep_s, self._sweep)


async def serve(
    handler: Handler,
    host: str,
    port: int,
    max_body: int | None = None,
    *,
    request_timeout: float = REQUEST_TIMEOUT_S,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
) -> HttpServer:
    """Listen on host:port; every connection's requests go to `handler`.

    Bodies over `max_body` bytes get a 413 and the connection is closed; a request that stalls
    for `request_timeout` seconds before it is complete gets a 408; a connection idle for
    `keepalive_timeout` s is closed; over `max_connections` a new connection gets a 503.
    """
    server = HttpServer(handler, max_body, request_timeout, keepalive_timeout, max_connections)
    await server.listen(host, port)
    return server
