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
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

import httptools

log = logging.getLogger(__name__)

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
SSE = b"text/event-stream"

MAX_HEAD = 64 * 1024  # request line + headers; httptools would buffer an endless header
MAX_PIPELINE = 64  # requests parsed ahead of their answer before the socket stops being read
REQUEST_TIMEOUT_S = 60.0  # a started request that sends nothing for this long gets a 408
LINGER_S = 2.0  # after an error answer, what the client still sends is dropped this long

_HEAD_TOO_LARGE = b"request line and headers larger than %d bytes" % MAX_HEAD
_ERROR_KINDS = {
    400: b"BadRequestError",
    408: b"RequestTimeout",
    413: b"PayloadTooLargeError",
    431: b"RequestHeaderFieldsTooLarge",
    500: b"InternalError",
}


class HttpRequest:
    """A parsed request: method and path as str, header names lower-case, body as bytes."""

    __slots__ = ("body", "headers", "method", "path", "query")

    def __init__(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body


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

    __slots__ = ("_conn", "_head_pending", "_keep_alive", "done", "on_disconnect", "streaming")

    def __init__(self, conn: _Connection, keep_alive: bool) -> None:
        self._conn = conn
        self._keep_alive = keep_alive
        self.done = False
        self.streaming = False
        self._head_pending = b""  # a stream's head goes out with its first chunk (one write)
        self.on_disconnect: Callable[[], object] | None = None

    @property
    def closed(self) -> bool:
        """The client went away (or the response is over): writing is pointless."""
        return self.done or self._conn.closed

    def _head(self, code: int, content_type: bytes, extra: bytes) -> bytes:
        conn = b"" if self._keep_alive else b"connection: close\r\n"
        return _status_line(code) + b"content-type: " + content_type + b"\r\n" + conn + extra

    def send(
        self, code: int, body: bytes, content_type: bytes = JSON, headers: bytes = b""
    ) -> None:
        """The whole response at once."""
        if self.done:
            return
        self.done = True
        length = b"content-length: %d\r\n\r\n" % len(body)
        self._conn.write(self._head(code, content_type, headers + length) + body)
        self._conn.response_done(self._keep_alive)

    def start_stream(
        self, code: int = 200, content_type: bytes = SSE, headers: bytes = b""
    ) -> None:
        """Start a chunked response (its head leaves with the first chunk); `write`, then `end`.

        `headers`: extra header lines, each ending with CRLF.
        """
        self.streaming = True
        extra = headers + b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        self._head_pending = self._head(code, content_type, extra)

    def write(self, data: bytes) -> None:
        """One chunk of a streamed response."""
        if data and not self.done:
            self._conn.write(self._head_pending + b"%x\r\n%b\r\n" % (len(data), data))
            self._head_pending = b""

    def end(self, data: bytes = b"") -> None:
        """Last chunk (optional) and the end of a streamed response."""
        if self.done:
            return
        self.done = True
        chunk = b"%x\r\n%b\r\n" % (len(data), data) if data else b""
        self._conn.write(self._head_pending + chunk + b"0\r\n\r\n")
        self._conn.response_done(self._keep_alive)


class _Reject(Exception):
    """Raised inside a parser callback: stop parsing, answer `code`, close."""

    def __init__(self, code: int, message: bytes) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class _Connection(asyncio.Protocol):
    """One client connection: parse, dispatch in order, track the open response."""

    def __init__(
        self,
        handler: Handler,
        max_body: int | None = None,
        request_timeout: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self._handler = handler
        self._max_body = max_body
        self._request_timeout = request_timeout
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
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
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
        path, _, query = self._url.decode("latin-1").partition("?")
        method = self._parser.get_method().decode()
        request = HttpRequest(method, path, query, self._headers, b"".join(self._body))
        keep_alive = self._parser.should_keep_alive()
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
        responder = Responder(self, keep_alive)
        self._active = responder
        try:
            self._handler(request, responder)
        except Exception:  # a bug must not hang the client
            log.exception("handler failed on %s %s", request.method, request.path)
            if responder.streaming:
                responder.end()
            else:
                responder.send(
                    500, b'{"error":{"message":"internal error","type":"InternalError"}}'
                )

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
        body = b'{"error":{"message":%b,"type":"%b"}}' % (
            json.dumps(message.decode("latin-1")).encode(),
            _ERROR_KINDS.get(code, b"BadRequestError"),
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

    def response_done(self, keep_alive: bool) -> None:
        """The active response ended: close, or answer the next pipelined request."""
        self._active = None
        if not keep_alive:
            self.closed = True  # what the client pipelined after it is not answered
            if self._transport is not None:
                self._transport.close()
            return
        if self._queue:
            asyncio.get_running_loop().call_soon(self._dispatch_next)
        elif self._failure is not None or self._continue_pending:
            self._idle()


async def serve(
    handler: Handler,
    host: str,
    port: int,
    max_body: int | None = None,
    *,
    request_timeout: float = REQUEST_TIMEOUT_S,
) -> asyncio.Server:
    """Listen on host:port; every connection's requests go to `handler`.

    Bodies over `max_body` bytes get a 413 and the connection is closed; a request that stalls
    for `request_timeout` seconds before it is complete gets a 408.
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _Connection(handler, max_body, request_timeout),
        host,
        port,
        reuse_address=True,
        backlog=4096,
    )
