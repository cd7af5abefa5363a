"""The lean HTTP/1.1 server on its own: keep-alive, pipelining, streaming, limits, disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sglang_dp.httpserver import HttpRequest, Responder, serve


def run_with_server(
    handler: Callable[[HttpRequest, Responder], None],
    client: Callable[[int], Awaitable[None]],
    max_body: int | None = None,
) -> None:
    async def main() -> None:
        server = await serve(handler, "127.0.0.1", 0, max_body)
        port = server.sockets[0].getsockname()[1]
        try:
            await asyncio.wait_for(client(port), 10)
        finally:
            server.close()

    asyncio.run(main())


def echo(request: HttpRequest, responder: Responder) -> None:
    responder.send(
        200, request.method.encode() + b" " + request.path.encode() + b" " + request.body
    )


def test_pipelined_requests_are_answered_in_order() -> None:
    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\none"
            b"GET /b?q=1 HTTP/1.1\r\nhost: x\r\n\r\n"
        )
        first = await reader.readuntil(b"POST /a one")
        second = await reader.readuntil(b"GET /b ")
        assert first.startswith(b"HTTP/1.1 200 OK") and b"content-length: 11" in first
        assert b"HTTP/1.1 200 OK" in second
        writer.close()

    run_with_server(echo, client)


def test_streaming_with_extra_headers() -> None:
    def stream(request: HttpRequest, responder: Responder) -> None:
        responder.start_stream(200, b"text/event-stream", b"x-request-id: 7\r\n")
        responder.write(b"data: 1\n\n")
        responder.end(b"data: [DONE]\n\n")

    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        data = await reader.readuntil(b"0\r\n\r\n")
        assert b"x-request-id: 7\r\n" in data and b"transfer-encoding: chunked" in data
        assert b"9\r\ndata: 1\n\n\r\n" in data and b"data: [DONE]" in data
        writer.close()

    run_with_server(stream, client)


def test_body_limit_and_bad_requests() -> None:
    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 20\r\n\r\n" + b"x" * 20)
        assert (await reader.read()).startswith(b"HTTP/1.1 413")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400")

    run_with_server(echo, client, max_body=10)


def test_disconnect_is_reported_for_an_open_response() -> None:
    received, gone = asyncio.Event(), asyncio.Event()

    def hold(request: HttpRequest, responder: Responder) -> None:
        responder.on_disconnect = gone.set  # never answered
        received.set()

    async def client(port: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await received.wait()
        writer.close()
        await gone.wait()

    run_with_server(hold, client)


def test_handler_error_is_a_500_not_a_hang() -> None:
    def broken(request: HttpRequest, responder: Responder) -> None:
        raise RuntimeError("bug")

    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 500")
        writer.close()

    run_with_server(broken, client)
