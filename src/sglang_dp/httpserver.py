"""A lean HTTP/1.1 server on asyncio protocols and httptools (router front and simulator).

Why not Starlette: eight simulated workers, a router and a load generator share two cores, and a
general-purpose ASGI stack costs several times the CPU per request. Here a request is parsed by
httptools' C parser and handed to one callback, `handler(request, responder)`, with no task per
request: the handler answers at once (`responder.send`) or keeps the responder and answers later
(the scheduler's events), streaming with chunked transfer encoding (`start_stream`, `write`,
`end`).

Keep-alive and pipelining: requests on one connection are answered in order (a pipelined request
waits until the previous response ends). A closed connection calls `responder.on_disconnect`
when its response was not finished, so the app can abort the request and free its KV.
"""

from __future__ import annotations

import asyncio
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


def _status_line(code: int) -> bytes:
    return f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\n".encode()


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


class _Connection(asyncio.Protocol):
    """One client connection: parse, dispatch in order, track the open response."""

    def __init__(self, handler: Handler, max_body: int | None = None) -> None:
        self._handler = handler
        self._max_body = max_body
        self._body_size = 0
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._queue: deque[tuple[HttpRequest, bool]] = deque()
        self._active: Responder | None = None
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, b"upgrade not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, str(exc).encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
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

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._headers.get("expect", "").lower() == "100-continue" and self._transport:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._max_body is not None and self._body_size > self._max_body:
            self._fail(413, b"request body larger than %d bytes" % self._max_body)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.closed:
            return
        path, _, query = self._url.decode("latin-1").partition("?")
        method = self._parser.get_method().decode()
        request = HttpRequest(method, path, query, self._headers, b"".join(self._body))
        self._queue.append((request, self._parser.should_keep_alive()))
        if self._active is None:
            self._dispatch_next()

    # internals
    def _dispatch_next(self) -> None:
        if not self._queue or self.closed:
            return
        request, keep_alive = self._queue.popleft()
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

    def _fail(self, code: int, message: bytes) -> None:
        if self._transport is not None and not self.closed:
            kind = b"BadRequestError" if code == 400 else b"PayloadTooLargeError"
            body = b'{"error":{"message":"%b","type":"%b"}}' % (message.replace(b'"', b"'"), kind)
            self.closed = True  # nothing more is parsed or dispatched on this connection
            self._transport.write(
                _status_line(code) + b"content-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body
            )
            self._transport.close()

    def write(self, data: bytes) -> None:
        """Send bytes unless the client is gone."""
        if not self.closed and self._transport is not None:
            self._transport.write(data)

    def response_done(self, keep_alive: bool) -> None:
        """The active response ended: close, or answer the next pipelined request."""
        self._active = None
        if not keep_alive:
            if self._transport is not None:
                self._transport.close()
            return
        if self._queue:
            asyncio.get_running_loop().call_soon(self._dispatch_next)


async def serve(
    handler: Handler, host: str, port: int, max_body: int | None = None
) -> asyncio.Server:
    """Listen on host:port; every connection's requests go to `handler`.

    Bodies over `max_body` bytes get a 413 and the connection is closed.
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _Connection(handler, max_body), host, port, reuse_address=True, backlog=4096
    )
