"""The lean HTTP server's raw request handling, against a real server and raw sockets.

Every abuse — malformed, truncated, oversized, pipelined — must end in an answer (a 4xx) or a
closed connection, never a crash (an error reaching the loop) or a connection left hanging.
The server runs `serve()` on the default asyncio loop in a thread; the test talks to it with
blocking sockets whose timeouts turn a hang into a failure. Nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from sglang_dp import httpserver
from sglang_dp.httpserver import HttpRequest, Responder, serve

TIMEOUT_S = 5.0
ALIVE = "/alive"


class Server:
    """`serve(handler)` on a fresh default asyncio loop in its own thread."""

    def __init__(self, handler: Callable[[HttpRequest, Responder], None], **options: Any):
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []  # whatever reached the loop's error handler
        self.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self.requests: list[HttpRequest] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        def recorded(request: HttpRequest, responder: Responder) -> None:
            if request.path == ALIVE:  # the check that the server survived the test
                responder.send(200, b"alive")
                return
            self.requests.append(request)
            handler(request, responder)

        start = serve(recorded, "127.0.0.1", 0, **options)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(TIMEOUT_S)
        self.port: int = self.server.sockets[0].getsockname()[1]

    def connect(self) -> Client:
        return Client(socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT_S))

    def call(self, fn: Callable[[], object], delay: float = 0.0) -> None:
        """Run `fn` on the server's loop after `delay` s (responders are not thread-safe)."""
        self.loop.call_soon_threadsafe(self.loop.call_later, delay, fn)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT_S)
        self.loop.close()


@contextmanager
def running(
    handler: Callable[[HttpRequest, Responder], None] | None = None, **options: Any
) -> Iterator[Server]:
    """A server that must survive the test: nothing reaches its loop's error handler."""
    server = Server(handler or echo, **options)
    try:
        yield server
        if server.server.shutting_down:  # (the test stopped it)
            return
        # it still answers a fresh, well-formed request
        client = server.connect()
        client.send(b"GET %b HTTP/1.1\r\nhost: x\r\n\r\n" % ALIVE.encode())
        assert client.response()[::2] == (200, b"alive")
        client.close()
    finally:
        server.stop()
    assert not server.errors, server.errors


class Client:
    """A raw socket with a read buffer, so pipelined answers can be read one by one."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            message = f"the server left the connection hanging: {self.buffer!r}"
            raise AssertionError(message) from None
        if not data:
            raise EOFError(f"connection closed; unread: {self.buffer!r}")
        self.buffer += data

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    def read_exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """One whole response: status, headers (names lower-case), body (chunks joined)."""
        head = self.read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = head.split("\r\n")[:-2]
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self.read_until(b"\r\n")[:-2], 16):
                body += self.read_exactly(size)
                assert self.read_exactly(2) == b"\r\n"
            assert self.read_exactly(2) == b"\r\n"
        else:
            body = self.read_exactly(int(headers.get("content-length", "0")))
        return int(status_line.split(" ")[1]), headers, body

    def closed(self) -> bool:
        """The server closed the connection (EOF or reset), and sent nothing more."""
        try:
            self._fill()
        except (EOFError, ConnectionResetError):
            return not self.buffer
        return False


def echo(request: HttpRequest, responder: Responder) -> None:
    responder.send(
        200, request.method.encode() + b" " + request.path.encode() + b" " + request.body
    )


def later(request: HttpRequest, responder: Responder) -> None:
    """Answers on the next loop iteration: pipelined requests queue up behind it."""
    asyncio.get_running_loop().call_soon(echo, request, responder)


def wait_until(condition: Callable[[], object]) -> None:
    """Poll a condition on the server's state with a deadline."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    head = b"POST %b HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n" % (path.encode(), len(body))
    return head + extra + b"\r\n" + body


# --- well-formed traffic


def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    with running() as server:
        client = server.connect()
        for i in range(3):
            client.send(post(f"/r{i}", b"body%d" % i))
            status, headers, body = client.response()
            assert (status, body) == (200, b"POST /r%d body%d" % (i, i))
            assert "connection" not in headers
        client.close()


def test_request_fields_are_parsed() -> None:
    with running() as server:
        client = server.connect()
        client.send(b"GET /p/a?x=1&y=2 HTTP/1.1\r\nHost: x\r\nX-Thing: caf\xe9\r\n\r\n")
        assert client.response()[0] == 200
        request = server.requests[0]
        assert (request.method, request.path, request.query) == ("GET", "/p/a", "x=1&y=2")
        assert request.headers["x-thing"] == "café" and request.headers["host"] == "x"


def test_pipelined_requests_are_answered_in_order() -> None:
    def slow_first(request: HttpRequest, responder: Responder) -> None:
        delay = 0.05 if request.path == "/1" else 0.0  # the first answer is the last ready
        asyncio.get_running_loop().call_later(delay, echo, request, responder)

    with running(slow_first) as server:
        client = server.connect()
        client.send(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n" + post("/2", b"two") + post("/3", b""))
        assert [client.response()[2] for _ in range(3)] == [b"GET /1 ", b"POST /2 two", b"POST /3 "]


def test_many_pipelined_requests_all_answered_in_order() -> None:
    # More than MAX_PIPELINE wait at once: reading pauses and resumes, nothing is lost
    count = httpserver.MAX_PIPELINE * 3
    with running(later) as server:
        client = server.connect()
        client.send(b"".join(b"GET /%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(count)))
        for i in range(count):
            assert client.response()[2] == b"GET /%d " % i


def test_a_request_split_into_single_bytes_is_assembled() -> None:
    with running() as server:
        client = server.connect()
        for byte in post("/bytes", b"hello"):
            client.send(bytes([byte]))
        assert client.response()[2] == b"POST /bytes hello"


def test_chunked_request_body() -> None:
    with running() as server:
        client = server.connect()
        client.send(
            b"POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        assert client.response()[2] == b"POST /c abcde"


def test_connection_close_and_http_1_0_close_after_the_answer() -> None:
    with running() as server:
        for request in (
            b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
            b"GET /b HTTP/1.0\r\n\r\n",
        ):
            client = server.connect()
            client.send(request)
            status, headers, _ = client.response()
            assert status == 200 and headers["connection"] == "close"
            assert client.closed()
        assert [r.path for r in server.requests] == ["/a", "/b"]


def test_expect_100_continue() -> None:
    with running() as server:
        client = server.connect()
        client.send(
            b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
        )
        assert client.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"data")
        assert client.response()[:3:2] == (200, b"POST /e data")


def test_expect_100_continue_waits_for_its_turn_behind_a_pipelined_answer() -> None:
    with running(later) as server:
        client = server.connect()
        client.send(post("/first", b"1") + post("/second", b"", b"expect: 100-continue\r\n"))
        # the second head declared no body yet: its interim answer must not cut into the first
        client.send(
            post("/third", b"")[: -len(b"\r\n")].replace(b"content-length: 0", b"content-length: 2")
            + b"expect: 100-continue\r\n\r\n"
        )
        assert client.response()[2] == b"POST /first 1"
        assert client.response()[2] == b"POST /second "
        assert client.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"ok")
        assert client.response()[2] == b"POST /third ok"


def test_upgrade_without_a_body_is_answered_as_plain_http() -> None:
    with running() as server:
        client = server.connect()
        client.send(
            b"GET /h2c HTTP/1.1\r\nhost: x\r\nconnection: upgrade, http2-settings\r\n"
            b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n" + post("/next", b"n")
        )
        assert client.response()[:3:2] == (200, b"GET /h2c ")
        assert client.response()[:3:2] == (200, b"POST /next n")


def test_handler_error_is_a_500_and_the_connection_goes_on() -> None:
    def broken(request: HttpRequest, responder: Responder) -> None:
        if request.path == "/bug":
            raise RuntimeError("bug")
        echo(request, responder)

    with running(broken) as server:
        client = server.connect()
        client.send(b"GET /bug HTTP/1.1\r\nhost: x\r\n\r\nGET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
        assert client.response()[0] == 500
        assert client.response()[:3:2] == (200, b"GET /ok ")


# --- streaming and disconnects


def test_client_closing_mid_stream_triggers_on_disconnect() -> None:
    gone = threading.Event()
    responders: list[Responder] = []

    def stream(request: HttpRequest, responder: Responder) -> None:
        responder.on_disconnect = gone.set
        responders.append(responder)
        responder.start_stream(200, headers=b"x-id: 1\r\n")
        responder.write(b"data: 1\n\n")

    with running(stream) as server:
        client = server.connect()
        client.send(b"POST /s HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        head = client.read_until(b"data: 1\n\n")
        assert b"transfer-encoding: chunked" in head and b"x-id: 1" in head
        client.close()
        assert gone.wait(TIMEOUT_S)
        responder = responders[0]
        assert responder.closed and not responder.done
        done = threading.Event()

        def write_after_close() -> None:  # the app may still be writing: no error
            responder.write(b"data: 2\n\n")
            responder.end()
            done.set()

        server.call(write_after_close)
        assert done.wait(TIMEOUT_S)


def test_client_closing_a_pipelined_connection_reports_only_the_open_response() -> None:
    gone = threading.Event()

    def hold(request: HttpRequest, responder: Responder) -> None:
        responder.on_disconnect = gone.set  # never answered

    with running(hold) as server:
        client = server.connect()
        client.send(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\nGET /2 HTTP/1.1\r\nhost: x\r\n\r\n")
        client.close()
        assert gone.wait(TIMEOUT_S)
        assert [r.path for r in server.requests] == ["/1"]


# --- malformed requests: 400 and close


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"FOO / HTTP/1.1\r\nhost: x\r\n\r\n", id="bad-method"),
        pytest.param(b"\x00\x01\x02\xff garbage\r\n\r\n", id="garbage"),
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", id="not-http"),
        pytest.param(b"GET / HTTP/1.1\r\nbad header: x\r\n\r\n", id="space-in-header-name"),
        pytest.param(b"GET / HTTP/1.1\r\nnocolon\r\n\r\n", id="header-without-colon"),
        pytest.param(b"GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n", id="nul-in-header-value"),
        pytest.param(b"GET / HTTP/1.1\r\nx: a\r\n folded\r\n\r\n", id="obsolete-line-folding"),
        pytest.param(b"GET /a\x01b HTTP/1.1\r\n\r\n", id="control-char-in-url"),
        pytest.param(b"GET / HTTP/9.9\r\n\r\n", id="bad-version"),
        pytest.param(b"GET / HTTP/1.1\nhost: x\n\n", id="bare-lf"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http2-preface"),
        pytest.param(post("/", b"abc", b"content-length: 4\r\n"), id="two-content-lengths"),
        pytest.param(
            post("/", b"abc", b"transfer-encoding: chunked\r\n"), id="content-length-and-chunked"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n", id="negative-length"),
        pytest.param(
            b"POST / HTTP/1.1\r\ncontent-length: 99999999999999999999999\r\n\r\n",
            id="overflowing-length",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nconnection: upgrade\r\nupgrade: x\r\ncontent-length: 3\r\n\r\nabc",
            id="upgrade-with-body",
        ),
    ],
)
def test_malformed_request_gets_400_and_close(raw: bytes) -> None:
    with running() as server:
        client = server.connect()
        client.send(raw)
        status, headers, body = client.response()
        assert status == 400 and headers["connection"] == "close"
        assert b'"type":"BadRequestError"' in body
        assert client.closed()
        assert not server.requests


def test_garbage_after_pipelined_requests_is_answered_after_them() -> None:
    with running(later) as server:
        client = server.connect()
        client.send(post("/1", b"a") + post("/2", b"b") + b"\x16\x03\x01 not http\r\n\r\n")
        assert client.response()[2] == b"POST /1 a"
        assert client.response()[2] == b"POST /2 b"
        assert client.response()[0] == 400
        assert client.closed()


# --- oversized requests


def test_body_over_max_body_is_413_from_its_content_length() -> None:
    with running(max_body=1024) as server:
        client = server.connect()
        # the whole upload is sent: the server drops it rather than resetting the connection
        client.send(post("/big", b"x" * 1_000_000))
        status, headers, body = client.response()
        assert status == 413 and headers["connection"] == "close"
        assert b"PayloadTooLargeError" in body
        assert client.closed()
        assert not server.requests


def test_chunked_body_over_max_body_is_413() -> None:
    with running(max_body=10) as server:
        client = server.connect()
        client.send(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n8\r\n12345678\r\n")
        client.send(b"8\r\n12345678\r\n0\r\n\r\n")
        assert client.response()[0] == 413
        assert client.closed()


def test_body_of_exactly_max_body_is_accepted() -> None:
    with running(max_body=10) as server:
        client = server.connect()
        client.send(post("/fits", b"0123456789"))
        assert client.response()[:3:2] == (200, b"POST /fits 0123456789")


def test_expect_100_continue_with_a_body_too_large_gets_413_instead() -> None:
    with running(max_body=10) as server:
        client = server.connect()
        client.send(b"POST / HTTP/1.1\r\ncontent-length: 11\r\nexpect: 100-continue\r\n\r\n")
        assert client.response()[0] == 413  # and no `100 Continue` before it
        assert client.closed()


@pytest.mark.parametrize("endless", [False, True], ids=["huge-header", "endless-header"])
def test_head_over_the_limit_gets_431_and_close(endless: bool) -> None:
    with running() as server:
        client = server.connect()
        value = b"v" * (httpserver.MAX_HEAD + 1024)
        client.send(b"GET / HTTP/1.1\r\nx-big: " + value + (b"" if endless else b"\r\n\r\n"))
        status, headers, _ = client.response()
        assert status == 431 and headers["connection"] == "close"
        assert client.closed()


def test_many_headers_over_the_limit_get_431() -> None:
    with running() as server:
        client = server.connect()
        lines = b"".join(b"x-h%d: %b\r\n" % (i, b"v" * 60) for i in range(2000))
        client.send(b"GET / HTTP/1.1\r\n" + lines + b"\r\n")
        assert client.response()[0] == 431
        assert client.closed()


# --- truncated requests


@pytest.mark.parametrize(
    "partial",
    [b"GE", b"GET / HTTP/1.1\r\nhost: x\r\n", post("/", b"12345")[:-2]],
    ids=["request-line", "head", "body"],
)
def test_truncated_request_then_close_is_dropped_quietly(partial: bytes) -> None:
    with running() as server:
        client = server.connect()
        client.send(partial)
        client.sock.shutdown(socket.SHUT_WR)
        assert client.closed()
        assert not server.requests


@pytest.mark.parametrize(
    "partial",
    [b"GET / HTT", b"GET / HTTP/1.1\r\nhost: x\r\n", post("/", b"12345")[:-2]],
    ids=["request-line", "head", "body"],
)
def test_truncated_request_that_stalls_gets_408(partial: bytes) -> None:
    with running(request_timeout=0.2) as server:
        client = server.connect()
        client.send(partial)
        status, headers, body = client.response()  # within the socket timeout, not never
        assert status == 408 and headers["connection"] == "close" and b"RequestTimeout" in body
        assert client.closed()


def test_a_slow_request_that_keeps_sending_is_not_timed_out() -> None:
    """A request trickled in over twice the request timeout, in pieces less than the timeout
    apart (the head cut mid-line, the body mid-way): the timeout counts from the last bytes,
    not the first, and the pieces are put together."""
    timeout = 0.3
    request = post("/slow", b"abcdef")
    size = -(-len(request) // 6)
    with running(request_timeout=timeout) as server:
        client = server.connect()
        for start in range(0, len(request), size):
            client.send(request[start : start + size])
            pause(server, timeout / 3)
        assert client.response()[:3:2] == (200, b"POST /slow abcdef")
        assert len(server.requests) == 1


def pause(server: Server, seconds: float) -> None:
    """Keep quiet for `seconds` of the server's loop (its timer: at least that long passes)."""
    passed = threading.Event()
    server.call(passed.set, delay=seconds)
    assert passed.wait(TIMEOUT_S)


def test_idle_keep_alive_connection_is_not_timed_out() -> None:
    with running(request_timeout=0.05) as server:
        client = server.connect()
        client.send(post("/1", b""))
        assert client.response()[0] == 200
        # idle between requests: the timeout covers only a request that has begun
        ping = threading.Event()
        server.call(ping.set, delay=0.15)
        assert ping.wait(TIMEOUT_S)
        client.send(post("/2", b""))
        assert client.response()[:3:2] == (200, b"POST /2 ")


# --- HEAD, HTTP/1.0, broken streams


def test_head_gets_the_head_only_and_the_next_answer_parses() -> None:
    with running() as server:
        client = server.connect()
        client.send(b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\nGET /g HTTP/1.1\r\nhost: x\r\n\r\n")
        head = client.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 8\r\n" in head  # "HEAD /h "
        assert client.response()[:3:2] == (200, b"GET /g ")


def streamed(request: HttpRequest, responder: Responder) -> None:
    responder.start_stream(200)
    responder.write(b"data: 1\n\n")
    responder.end(b"data: 2\n\n")


def test_a_stream_is_chunked_and_ends_with_the_terminator() -> None:
    with running(streamed) as server:
        client = server.connect()
        client.send(b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n")
        status, headers, body = client.response()  # reads the chunks up to "0\r\n\r\n"
        assert (status, headers["transfer-encoding"]) == (200, "chunked")
        assert body == b"data: 1\n\ndata: 2\n\n"


def test_head_of_a_stream_has_no_body() -> None:
    with running(streamed) as server:
        client = server.connect()
        client.send(b"HEAD /s HTTP/1.1\r\nhost: x\r\n\r\nGET /alive HTTP/1.1\r\nhost: x\r\n\r\n")
        assert b"transfer-encoding: chunked" in client.read_until(b"\r\n\r\n")
        assert client.response()[:3:2] == (200, b"alive")


@pytest.mark.parametrize("headers", [b"", b"connection: keep-alive\r\n"])
def test_http_1_0_stream_is_close_delimited_not_chunked(headers: bytes) -> None:
    # a keep-alive HTTP/1.0 client too: without chunking, only the close can end the stream
    with running(streamed) as server:
        client = server.connect()
        client.send(b"GET /s HTTP/1.0\r\n" + headers + b"\r\n")
        head = client.read_until(b"\r\n\r\n")
        assert b"transfer-encoding" not in head and b"connection: close" in head
        assert client.read_exactly(len(b"data: 1\n\ndata: 2\n\n")) == b"data: 1\n\ndata: 2\n\n"
        assert client.closed()


def test_a_broken_stream_closes_without_the_terminator() -> None:
    def broken(request: HttpRequest, responder: Responder) -> None:
        responder.start_stream(200)
        responder.write(b"data: 1\n\n")
        responder.abort_stream(b"data: error\n\n")
        responder.send(504, b"too late")  # never a second response inside the first

    with running(broken) as server:
        client = server.connect()
        client.send(b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n")
        client.read_until(b"\r\n\r\n")
        assert client.read_until(b"data: error\n\n\r\n").endswith(b"data: error\n\n\r\n")
        assert client.closed()  # and no "0\r\n\r\n" came before the close


# --- connection ownership: flow control, idle timeout, shutdown, cap


def test_a_writer_that_awaits_drain_stops_while_the_client_does_not_read() -> None:
    chunk = b"x" * 65536
    total = 256  # 16 MiB if nothing held the writer back
    state = {"written": 0, "waiting": False}

    async def produce(responder: Responder) -> None:
        responder.start_stream(200, b"application/octet-stream")
        for _ in range(total):
            responder.write(chunk)
            state["written"] += 1
            drained = responder.drain()
            if drained is not None:
                state["waiting"] = True
                await drained
                state["waiting"] = False
        responder.end()

    def handler(request: HttpRequest, responder: Responder) -> None:
        asyncio.get_running_loop().create_task(produce(responder))

    with running(handler) as server:
        client = server.connect()
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.send(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        deadline = time.monotonic() + TIMEOUT_S
        while not state["waiting"]:  # the writer blocks on the client's full buffer
            assert time.monotonic() < deadline, "the writer never had to wait"
            time.sleep(0.01)
        assert state["written"] < total // 2
        received = bytearray(client.buffer)
        while not received.endswith(b"0\r\n\r\n"):  # reading lets it finish
            received += client.sock.recv(1 << 20)
        assert len(received) > total * len(chunk)


def test_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() -> None:
    with running(keepalive_timeout=0.2) as server:
        client = server.connect()
        client.send(post("/1", b""))
        assert client.response()[0] == 200
        assert client.closed()  # (the socket timeout would fail a connection left open)


def test_shutdown_finishes_in_flight_refuses_new_and_closes_idle() -> None:
    held: dict[str, Responder] = {}

    def hold(request: HttpRequest, responder: Responder) -> None:
        if request.path == "/stream":  # under way: its head is out, keep-alive
            responder.start_stream(200)
            responder.write(b"data: 1\n\n")
        if request.path in ("/stream", "/held"):
            held[request.path] = responder
        else:
            echo(request, responder)

    with running(hold) as server:
        idle, streaming, waiting = server.connect(), server.connect(), server.connect()
        idle.send(post("/1", b""))
        assert idle.response()[0] == 200
        streaming.send(post("/stream", b""))
        streaming.read_until(b"data: 1\n\n")
        waiting.send(post("/held", b""))
        wait_until(lambda: len(held) == 2)
        done = asyncio.run_coroutine_threadsafe(server.server.shutdown(TIMEOUT_S), server.loop)
        assert idle.closed()
        streaming.send(post("/after", b""))  # a new request on a busy connection
        # (it was read, and waits behind the stream)
        wait_until(lambda: any(c._queue for c in server.server.connections))

        def finish() -> None:
            held["/stream"].end(b"data: 2\n\n")
            held["/held"].send(200, b"finished")

        server.call(finish)
        assert streaming.read_until(b"0\r\n\r\n").endswith(b"data: 2\n\n\r\n0\r\n\r\n")
        status, headers, _ = streaming.response()
        assert status == 503 and headers["connection"] == "close"
        assert streaming.closed()
        status, headers, body = waiting.response()  # its head was not out: it says close
        assert (status, body, headers["connection"]) == (200, b"finished", "close")
        assert waiting.closed()
        done.result(TIMEOUT_S)


def test_connections_over_the_cap_get_a_503() -> None:
    with running(max_connections=2) as server:
        first, second = server.connect(), server.connect()
        for client in (first, second):  # both are registered once they were answered
            client.send(post("/1", b""))
            assert client.response()[0] == 200
        third = server.connect()
        status, headers, _ = third.response()
        assert status == 503 and headers["connection"] == "close"
        first.close()
        second.close()
        wait_until(lambda: len(server.server.connections) == 0)
