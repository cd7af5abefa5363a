"""The simulated worker on SGLang's own server stack: uvicorn + Starlette (`--http-server uvicorn`).

SGLang serves its HTTP API with FastAPI on uvicorn (`uvicorn.run(app, timeout_keep_alive=5,
loop="uvloop")`, httptools' parser with uvicorn[standard]): whole answers are Starlette
`Response`s (content-length), streams `StreamingResponse`s (uvicorn's chunked encoding), and a
client that goes away is noticed by Starlette's disconnect listener. The default simulated
worker serves with our lean `httpserver`, written from the same reading of HTTP as the router's
upstream client; this server lets that client meet the framing, keep-alive and disconnect
behaviour of the stack real workers run.

An adapter only: every request goes to the same `SimWorker.handle` as on the lean server.
`AsgiResponder` implements the handler's `Responder` by queueing what the handler does; one
Starlette endpoint (every path and method: the handler routes, and answers 404/405 itself) waits
for the first thing queued and turns it into a `Response` (a whole answer) or a
`StreamingResponse` that relays the rest of the queue as it comes.

Why Starlette and not FastAPI: FastAPI adds request validation and OpenAPI documents on top of
Starlette's routing, requests and responses; the bytes on the wire are Starlette's and uvicorn's,
and those are what this server is for. FastAPI is not a dependency; Starlette and uvicorn are.

Settings: httptools' parser and a keep-alive timeout of 5 s (`KEEPALIVE_TIMEOUT_S`), as
SGLang's; no lifespan (nothing to start) and no access log. The listening socket is bound here
(a taken port is an OSError for `sim.run`, as with the lean server) and SIGINT/SIGTERM stay
`sim.run`'s.

Faults (the simulator's fault injection), as the stack itself fails where it can:
- a broken stream (`abort_stream`) raises inside the stream: uvicorn logs it and closes the
  connection without the chunked terminator, as when SGLang's stream generator fails;
- a truncated answer (`send_partial`, then `abort_stream`) is a `StreamingResponse` that
  declares a content-length and ends short of it: uvicorn refuses to complete it ("Response
  content shorter than Content-Length") and closes the connection;
- bytes outside the framing (`write_unframed`) and a TCP reset (`reset`) go below ASGI, to the
  connection's transport, found by the client's address among uvicorn's open connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NamedTuple

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sglang_dp.httpserver import JSON, SSE, HttpRequest
from sglang_dp.sim.server import SimWorker

log = logging.getLogger("sglang_dp.sim")

KEEPALIVE_TIMEOUT_S = 5  # SGLang's `uvicorn.run(..., timeout_keep_alive=5)`
BACKLOG = 2048  # uvicorn's default
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]  # (Starlette adds HEAD to GET)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_SHORT = "Response content shorter than Content-Length"  # uvicorn's error for a truncated body


class InjectedBreak(Exception):
    """Raised inside a stream the handler broke off (`abort_stream`): uvicorn closes it."""


class _Op(NamedTuple):
    """One thing the handler did to its response, in order."""

    kind: str  # whole, head, data, raw, end, break, reset, gone
    data: bytes = b""
    code: int = 0
    content_type: bytes = b""
    headers: bytes = b""  # extra header lines, each ending with CRLF
    length: int | None = None  # head: a declared content-length (else chunked)


class AsgiResponder:
    """The handler's `Responder` over ASGI: what the handler does is queued for the endpoint.
    A stream's head waits for its first chunk, as on the lean server (a stream that never
    wrote can still become a whole answer)."""

    def __init__(self) -> None:
        self.done = False
        self.started = False
        self.streaming = False
        self.gone = False  # the client went away
        self.on_disconnect: Callable[[], object] | None = None
        self._head: _Op | None = None
        self._ops: deque[_Op] = deque()
        self._wake: asyncio.Future[None] | None = None

    @property
    def closed(self) -> bool:
        return self.done or self.gone

    def send(
        self, code: int, body: bytes, content_type: bytes = JSON, headers: bytes = b""
    ) -> None:
        if self.started:  # never a second head: a stream under way is broken
            self.abort_stream()
            return
        self.done = True
        self.streaming = False
        self._head = None
        self._push(_Op("whole", body, code, content_type, headers))

    def start_stream(
        self, code: int = 200, content_type: bytes = SSE, headers: bytes = b""
    ) -> None:
        self.streaming = True
        self._head = _Op("head", b"", code, content_type, headers)

    def write(self, data: bytes) -> None:
        if data and not self.done:
            self._push(_Op("data", data))

    def end(self, data: bytes = b"") -> None:
        if not self.done:
            self.done = True
            self._push(_Op("end", data))

    def abort_stream(self, data: bytes = b"") -> None:
        if not self.done:
            self.write(data)
            self.done = True
            self._push(_Op("break"))

    def write_unframed(self, data: bytes) -> None:
        self._push(_Op("raw", data))

    def send_partial(self, code: int, body: bytes, sent: int, content_type: bytes = JSON) -> None:
        self.streaming = True
        self._head = _Op("head", b"", code, content_type, b"", len(body))
        self._push(_Op("data", body[:sent]))

    def reset(self) -> None:
        if not self.done:
            self.done = True
            self._push(_Op("reset"))

    def client_gone(self) -> None:
        """The client went away (or the response is over): tell the handler if it was not."""
        if self.gone:
            return
        self.gone = True
        self._wakeup()
        if not self.done and self.on_disconnect is not None:
            self.on_disconnect()

    async def next(self) -> _Op:
        """The next thing the handler did (`gone` once the client went away)."""
        while not self._ops:
            if self.gone:
                return _Op("gone")
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake
        return self._ops.popleft()

    def _push(self, op: _Op) -> None:
        self.started = True
        if self._head is not None:  # a stream's head goes out with its first chunk
            self._ops.append(self._head)
            self._head = None
        self._ops.append(op)
        self._wakeup()

    def _wakeup(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.done():
            wake.set_result(None)


def _headers(op: _Op) -> dict[str, str]:
    """The head's headers but its content type (Starlette's `media_type`: it adds a charset
    to text/* ones, as on SGLang's `text/event-stream; charset=utf-8`)."""
    out = {}
    for line in op.headers.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name:
            out[name.strip().lower()] = value.strip()
    if op.kind == "head":
        if op.length is None:
            out["cache-control"] = "no-cache"  # a stream's, as on the lean server
        else:
            out["content-length"] = str(op.length)
    return out


def _media_type(op: _Op) -> str:
    return op.content_type.decode("latin-1")


class SimApp:
    """The Starlette application: one endpoint in front of `SimWorker.handle`."""

    def __init__(self, worker: SimWorker) -> None:
        self.worker = worker
        self.server: uvicorn.Server | None = None  # its open connections: see `_transport`
        self.app = Starlette(routes=[Route("/{path:path}", self.endpoint, methods=METHODS)])

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        scope = request.scope
        responder = AsgiResponder()
        query = scope["query_string"].decode("latin-1")
        parsed = HttpRequest(request.method, scope["path"], query, dict(request.headers), body)
        self.worker.handle(parsed, responder)
        watch = asyncio.ensure_future(_watch_disconnect(request, responder))
        try:
            op = await responder.next()
        finally:
            watch.cancel()  # a stream's disconnects are Starlette's to notice from here on
        if op.kind == "whole":
            return Response(op.data, op.code, _headers(op), _media_type(op))
        if op.kind == "head":
            relay = self._relay(scope.get("client"), responder, op.length is not None)
            return StreamingResponse(relay, op.code, _headers(op), _media_type(op))
        return Response(b"", 499)  # the client went away before an answer: nobody reads it

    async def _relay(
        self, client: Any, responder: AsgiResponder, declared: bool
    ) -> AsyncIterator[bytes]:
        """A stream's chunks, as the handler writes them."""
        try:
            while True:
                op = await responder.next()
                if op.kind == "data":
                    yield op.data
                elif op.kind == "end":
                    if op.data:
                        yield op.data
                    return
                elif op.kind == "raw":
                    transport = self._transport(client)
                    if transport is not None:
                        transport.write(op.data)
                elif op.kind == "reset":
                    self._reset(client)
                    await asyncio.get_running_loop().create_future()  # cancelled: disconnect
                elif op.kind == "break":
                    if declared:
                        return  # short of its content-length: uvicorn refuses to end it
                    raise InjectedBreak("the simulated worker broke the stream off")
                else:  # gone
                    return
        finally:
            responder.client_gone()  # (nothing is told when the response was over)

    def _transport(self, client: Any) -> asyncio.Transport | None:
        """The transport of the connection from `client` (host, port), if still open."""
        server = self.server
        if server is None or client is None:
            return None
        for conn in server.server_state.connections:
            if getattr(conn, "client", None) == tuple(client):
                transport: asyncio.Transport | None = getattr(conn, "transport", None)
                return transport
        return None

    def _reset(self, client: Any) -> None:
        transport = self._transport(client)
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()


async def _watch_disconnect(request: Request, responder: AsgiResponder) -> None:
    """Until cancelled: a client that goes away before its answer aborts its request."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    responder.client_gone()


class _QuietInjected(logging.Filter):
    """uvicorn logs a traceback for every response that fails; for the injected ones (a broken
    stream, a truncated answer) one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InjectedBreak) or str(exc) == _SHORT:
            record.msg, record.args, record.exc_info = "injected fault: %s", (exc,), None
        return True


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # SIGINT and SIGTERM are `sim.run`'s


class UvicornServer:
    """uvicorn serving a `SimApp` on a socket bound beforehand."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], sock: socket.socket):
        self._server = server
        self._task = task
        self._sock = sock
        task.add_done_callback(self._ended)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def close(self) -> None:
        """Stop at once (the lean server's `close`: requests in flight are dropped)."""
        self._server.should_exit = self._server.force_exit = True

    async def wait_closed(self) -> None:
        await asyncio.wait([self._task])

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("uvicorn stopped", exc_info=task.exception())


async def serve_uvicorn(worker: SimWorker, host: str, port: int, log_level: str) -> UvicornServer:
    """Listen on host:port (an OSError if taken); uvicorn + Starlette serve `worker`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    sim_app = SimApp(worker)
    config = uvicorn.Config(
        sim_app.app,
        http="httptools",
        timeout_keep_alive=KEEPALIVE_TIMEOUT_S,
        lifespan="off",
        access_log=False,
        log_config=None,
        log_level=log_level,
        backlog=BACKLOG,
    )
    logging.getLogger("uvicorn.error").addFilter(_QuietInjected())
    server = _Server(config)
    sim_app.server = server
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    return UvicornServer(server, task, sock)
