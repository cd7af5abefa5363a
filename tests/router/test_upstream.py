"""The router's upstream client against real simulated workers and scripted loopback servers.

Every scenario runs on both loops the router may use (default asyncio and uvloop). Scripted
servers are `asyncio.start_server` handlers in the test's own loop; conditions are polled with a
deadline (`until`), never slept on. Everything started is stopped: workers by process group
(`sim_worker`), servers and pools in `finally`, leftover tasks cancelled by `run`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import resource
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import psutil
import pytest

from sglang_dp.router.upstream import (
    HIGH_WATER,
    ConnectError,
    LocalResourceError,
    ProtocolError,
    UpstreamClosed,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)
from tests import processes
from tests.processes import Worker, free_port, run_on, sim_worker

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
JSON_HEADERS = [(b"content-type", b"application/json")]


# --- harness -------------------------------------------------------------------------------


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Run one scenario on a fresh loop of the given kind; cancel whatever it left behind."""

    kind: str = request.param
    return lambda scenario: run_on(kind, scenario, timeout=15)


async def until(condition: Callable[[], Any], what: str = "it") -> Any:
    """Poll `condition` until it is truthy (5 s at most: the pool's sockets close fast)."""
    return await processes.until(condition, timeout=5.0, what=what, interval=0.005)


async def all_closed(pool: UpstreamPool) -> None:
    """Closed sockets are reported on the next loop turns (connection_lost), not at once."""
    await until(lambda: pool.open_connections() == 0, what="the pool's sockets to close")


class Stats:
    """What a scripted server saw."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []


@asynccontextmanager
async def scripted(
    handler: Handler, stats: Stats | None = None
) -> AsyncIterator[tuple[str, Stats]]:
    """A loopback server whose every connection runs `handler(reader, writer)`."""
    stats = stats or Stats()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats.connections += 1
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", stats
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head + body) off the connection, or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    match = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
    body = await reader.readexactly(int(match.group(1))) if match else b""
    return head + body


@asynccontextmanager
async def answering(response: bytes) -> AsyncIterator[tuple[str, Stats]]:
    """A server answering every request on every connection with `response`."""
    stats = Stats()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            stats.requests.append(request)
            writer.write(response)
            await writer.drain()

    async with scripted(handler, stats) as (url, _):
        yield url, stats


@asynccontextmanager
async def pool_for_test(**kw: Any) -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(**kw)
    try:
        yield pool
    finally:
        await pool.close()
        assert pool.open_connections() == 0


def ok(body: bytes, extra: bytes = b"", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %b\r\ncontent-length: %d\r\n%b\r\n%b" % (status, len(body), extra, body)


def chunked(*parts: bytes) -> bytes:
    encoded = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts)
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + encoded + b"0\r\n\r\n"


async def post(
    pool: UpstreamPool, url: str, path: str = "/", timeout: float = 5.0
) -> UpstreamResponse:
    return await pool.request(url, "POST", path, JSON_HEADERS, b'{"x": 1}', timeout=timeout)


def client_sockets(port: int) -> set[tuple[str, int]]:
    """This process's open TCP sockets to `port` (their local addresses)."""
    conns = psutil.Process().net_connections("tcp")
    return {tuple(c.laddr) for c in conns if c.raddr and c.raddr.port == port}  # type: ignore[misc]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# --- scripted servers: bodies and framing ---------------------------------------------------


def test_content_length_body_and_keep_alive(run: Any) -> None:
    async def scenario() -> None:
        async with answering(ok(b"hello")) as (url, stats), pool_for_test() as pool:
            for _ in range(3):
                resp = await post(pool, url)
                assert resp.status == 200
                assert resp.header(b"Content-Length") == b"5"
                assert await resp.read() == b"hello"
                assert pool.idle_connections(url) == 1
            assert stats.connections == 1
            assert len(stats.requests) == 3

    run(scenario)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 13])
def test_chunked_body_split_at_odd_boundaries(run: Any, step: int) -> None:
    parts = (b"data: one\n\n", b"x" * 40, b"data: [DONE]\n\n")
    wire = chunked(*parts)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            for i in range(0, len(wire), step):
                writer.write(wire[i : i + step])
                await writer.drain()
                await asyncio.sleep(0)  # let the client read this piece on its own

    async def scenario() -> None:
        async with scripted(handler) as (url, _), pool_for_test() as pool:
            resp = await post(pool, url)
            assert resp.header(b"transfer-encoding") == b"chunked"
            assert b"".join([chunk async for chunk in resp]) == b"".join(parts)
            resp = await post(pool, url)
            assert await resp.read() == b"".join(parts)
            assert pool.idle_connections(url) == 1

    run(scenario)


def test_chunks_are_yielded_as_they_arrive(run: Any) -> None:
    first_seen = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await first_seen.wait()  # the second chunk only exists once the first was delivered
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await read_request(reader)

    async def scenario() -> None:
        async with scripted(handler) as (url, _), pool_for_test() as pool:
            resp = await post(pool, url)
            received = []
            async for chunk in resp:
                received.append(chunk)
                first_seen.set()
            assert received == [b"first", b"second"]

    run(scenario)


def test_5xx_is_a_normal_response(run: Any) -> None:
    error = b'{"error": "overloaded"}'

    async def scenario() -> None:
        async with (
            answering(ok(error, status=b"503 Service Unavailable")) as (url, _),
            pool_for_test() as pool,
        ):
            resp = await post(pool, url)
            assert resp.status == 503
            assert await resp.read() == error
            assert pool.idle_connections(url) == 1

    run(scenario)


def test_informational_responses_are_skipped(run: Any) -> None:
    async def scenario() -> None:
        async with (
            answering(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"done")) as (url, _),
            pool_for_test() as pool,
        ):
            resp = await post(pool, url)
            assert (resp.status, await resp.read()) == (200, b"done")
            assert pool.idle_connections(url) == 1

    run(scenario)


def test_request_framing_and_headers(run: Any) -> None:
    async def scenario() -> None:
        async with answering(ok(b"{}")) as (url, stats), pool_for_test() as pool:
            headers = [
                (b"content-type", b"application/json"),
                (b"x-request-id", b"abc"),
                (b"Host", b"evil.example"),
                (b"content-length", b"1"),
                (b"connection", b"close"),
            ]
            resp = await pool.request(url, "POST", "/generate?x=1", headers, b"12345", timeout=5)
            assert await resp.read() == b"{}"
            sent = stats.requests[0]
            head, body = sent.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            assert lines[0] == b"POST /generate?x=1 HTTP/1.1"
            assert lines[1:] == [
                b"host: " + url.removeprefix("http://").encode(),
                b"content-length: 5",
                b"content-type: application/json",
                b"x-request-id: abc",
            ]
            assert body == b"12345"
            with pytest.raises(ValueError, match="line break"):
                await pool.request(url, "GET", "/", [(b"x", b"a\r\nb: c")], b"", timeout=5)
            with pytest.raises(ValueError, match="path"):
                await pool.request(url, "GET", "/a b", [], b"", timeout=5)
            with pytest.raises(ValueError, match="http://"):
                await pool.request("https://127.0.0.1:1", "GET", "/", [], b"", timeout=5)
            assert len(stats.requests) == 1

    run(scenario)


# --- scripted servers: what is pooled -------------------------------------------------------


def test_connection_close_response_is_not_pooled(run: Any) -> None:
    async def scenario() -> None:
        async with (
            answering(ok(b"bye", b"connection: close\r\n")) as (url, stats),
            pool_for_test() as pool,
        ):
            for _ in range(2):
                resp = await post(pool, url)
                assert await resp.read() == b"bye"
                assert pool.idle_connections(url) == 0
            await all_closed(pool)
            assert stats.connections == 2

    run(scenario)


def test_http10_close_delimited_body(run: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ")
        await writer.drain()
        writer.write(b"the end")

    async def scenario() -> None:
        async with scripted(handler) as (url, _), pool_for_test() as pool:
            resp = await post(pool, url)
            assert await resp.read() == b"until the end"
            assert pool.idle_connections(url) == 0

    run(scenario)


def test_max_idle_per_host(run: Any) -> None:
    async def scenario() -> None:
        async with answering(ok(b"x")) as (url, _), pool_for_test(max_idle_per_host=2) as pool:
            responses = await asyncio.gather(*(post(pool, url) for _ in range(5)))
            assert pool.open_connections() == 5
            for resp in responses:
                await resp.read()
            assert pool.idle_connections(url) == 2
            await until(lambda: pool.open_connections() == 2, what="extra sockets to close")

    run(scenario)


def test_expired_idle_connections_are_not_reused(run: Any) -> None:
    async def scenario() -> None:
        async with answering(ok(b"x")) as (url, stats), pool_for_test(keepalive_expiry=-1) as pool:
            for _ in range(3):
                assert await (await post(pool, url)).read() == b"x"
            assert stats.connections == 3
            await until(lambda: pool.open_connections() == 1, what="expired sockets to close")

    run(scenario)


def test_a_response_dropped_unread_does_not_hold_its_socket(run: Any) -> None:
    async def scenario() -> None:
        async with answering(chunked(b"a", b"b")) as (url, _), pool_for_test() as pool:
            resp = await post(pool, url)
            del resp  # a caller bug; the finalizer closes the socket
            gc.collect()
            await all_closed(pool)

    run(scenario)


def test_drop_host_and_close(run: Any) -> None:
    async def scenario() -> None:
        async with answering(ok(b"x")) as (url, _):
            pool = UpstreamPool()
            first, busy = await asyncio.gather(post(pool, url), post(pool, url))
            await first.read()  # pooled; `busy` stays in flight during drop_host
            assert pool.idle_connections(url) == 1
            pool.drop_host(url)
            assert pool.idle_connections(url) == 0
            await busy.read()
            assert pool.idle_connections(url) == 0  # from before the drop: never pooled
            await all_closed(pool)
            await (await post(pool, url)).read()
            assert pool.idle_connections(url) == 1
            await pool.close()
            await all_closed(pool)
            with pytest.raises(ConnectError):
                await post(pool, url)

    run(scenario)


# --- scripted servers: keep-alive races ------------------------------------------------------


def test_idle_connection_closed_by_server(run: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"once"))  # keep-alive promised, then closed while idle

    async def scenario() -> None:
        async with scripted(handler) as (url, stats), pool_for_test() as pool:
            assert await (await post(pool, url)).read() == b"once"
            await until(lambda: pool.idle_connections(url) == 0, what="the pool to see the EOF")
            assert await (await post(pool, url)).read() == b"once"
            assert stats.connections == 2

    run(scenario)


def test_keep_alive_race_is_retried_once_on_a_fresh_connection(run: Any) -> None:
    requests: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        requests.append(1)
        writer.write(ok(b"first"))
        await read_request(reader)  # the next request on this socket: closed, not answered,
        requests.append(2)  # as if the idle timeout fired just as it arrived

    async def scenario() -> None:
        async with scripted(handler) as (url, stats), pool_for_test() as pool:
            assert await (await post(pool, url)).read() == b"first"
            assert pool.idle_connections(url) == 1
            assert await (await post(pool, url)).read() == b"first"
            assert stats.connections == 2
            assert requests == [1, 2, 1]

    run(scenario)


def test_fresh_connection_closed_before_answering_is_not_retried(run: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def scenario() -> None:
        async with scripted(handler) as (url, stats), pool_for_test() as pool:
            with pytest.raises(UpstreamClosed, match="before answering"):
                await post(pool, url)
            assert stats.connections == 1

    run(scenario)


def test_reused_connection_closed_mid_head_is_not_retried(run: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"first"))
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")  # the worker had started answering: not retried

    async def scenario() -> None:
        async with scripted(handler) as (url, stats), pool_for_test() as pool:
            await (await post(pool, url)).read()
            with pytest.raises(UpstreamClosed):
                await post(pool, url)
            assert stats.connections == 1

    run(scenario)


# --- scripted servers: failures --------------------------------------------------------------


def test_connection_refused(run: Any) -> None:
    async def scenario() -> None:
        async with pool_for_test() as pool:
            with pytest.raises(ConnectError, match="could not connect"):
                await post(pool, f"http://127.0.0.1:{free_port()}")
            await all_closed(pool)

    run(scenario)


def test_running_out_of_file_descriptors_is_a_local_error(run: Any, worker: Worker) -> None:
    # The server is another process: one in this process would share the lowered limit, and
    # its accept() could be the call that runs out, leaving the client waiting for a head.
    async def scenario() -> None:
        async with pool_for_test() as pool:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            held: list[UpstreamResponse] = []
            # a limit a few descriptors above what is open now (this process only)
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 4, hard))
            try:
                with pytest.raises(LocalResourceError, match="Too many open files"):
                    for _ in range(16):  # each held response keeps its connection busy
                        held.append(await post_generate(pool, worker.url, generate()))
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert held  # some got through before the limit
            for response in held:
                response.abort()

    run(scenario)


def test_connections_per_worker_are_capped(run: Any) -> None:
    async def scenario() -> None:
        async with answering(ok(b"{}")) as (url, _), pool_for_test(max_per_host=2) as pool:
            first, second = await post(pool, url), await post(pool, url)
            with pytest.raises(LocalResourceError, match="2 connections"):
                await post(pool, url)
            await first.read()  # back in the pool: the next request reuses it
            await (await post(pool, url)).read()
            second.abort()
            await (await post(pool, url)).read()  # a free place again

    run(scenario)


def test_silent_server_times_out(run: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers; returns when the client hangs up

    async def scenario() -> None:
        async with scripted(handler) as (url, _), pool_for_test() as pool:
            with pytest.raises(UpstreamTimeout, match="no response head"):
                await asyncio.wait_for(post(pool, url, timeout=0.2), timeout=10)
            await all_closed(pool)

    run(scenario)


def test_garbage_is_a_protocol_error(run: Any) -> None:
    async def scenario() -> None:
        async with answering(b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as (url, _), pool_for_test() as pool:
            with pytest.raises(ProtocolError):
                await post(pool, url)
            await all_closed(pool)

    run(scenario)


def test_extra_bytes_after_a_response_close_the_connection(run: Any) -> None:
    async def scenario() -> None:
        async with answering(ok(b"a") + ok(b"unasked")) as (url, _), pool_for_test() as pool:
            resp = await post(pool, url)
            assert await resp.read() == b"a"
            await all_closed(pool)

    run(scenario)


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\na\r\n" + b"x" * 10 + b"\r\n",
    ],
    ids=["content-length", "chunked"],
)
def test_server_dies_mid_body(run: Any, wire: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(wire)

    async def scenario() -> None:
        async with scripted(handler) as (url, _), pool_for_test() as pool:
            resp = await post(pool, url)
            received = []
            with pytest.raises(UpstreamClosed, match="mid-response"):
                async for chunk in resp:
                    received.append(chunk)
            assert b"".join(received) == b"x" * 10
            await all_closed(pool)
            with pytest.raises(UpstreamClosed):
                await resp.read()  # ended once, with that error

    run(scenario)


def test_idle_gap_in_body_times_out(run: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await reader.read()

    async def scenario() -> None:
        async with scripted(handler) as (url, _), pool_for_test() as pool:
            resp = await post(pool, url, timeout=0.2)
            assert await resp.__anext__() == b"abc"
            with pytest.raises(UpstreamTimeout, match="no body bytes"):
                await resp.__anext__()
            await all_closed(pool)

    run(scenario)


def test_abort_mid_body_is_seen_by_the_server(run: Any) -> None:
    hung_up = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if b"/stream" not in (request or b""):
            writer.write(ok(b"fine"))
            await read_request(reader)
            return
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await reader.read()  # until the client hangs up
        hung_up.set()

    async def scenario() -> None:
        async with scripted(handler) as (url, _), pool_for_test() as pool:
            resp = await post(pool, url, "/stream")
            assert await resp.__anext__() == b"abc"
            resp.abort()
            resp.abort()
            with pytest.raises(UpstreamClosed, match="aborted"):
                await resp.__anext__()
            await all_closed(pool)
            await asyncio.wait_for(hung_up.wait(), 5)
            assert await (await post(pool, url)).read() == b"fine"

    run(scenario)


def test_cancelled_request_closes_its_connection(run: Any) -> None:
    arrived = asyncio.Event()
    hung_up = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()
        await reader.read()
        hung_up.set()

    async def scenario() -> None:
        async with scripted(handler) as (url, _), pool_for_test() as pool:
            task = asyncio.ensure_future(post(pool, url))
            await asyncio.wait_for(arrived.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(hung_up.wait(), 5)
            await all_closed(pool)

    run(scenario)


def test_slow_consumer_pauses_reading(run: Any) -> None:
    size = 32 * 1024 * 1024  # more than loopback socket buffers can absorb
    written = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        # a small kernel send buffer: what the client does not read stays in this process
        writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024
        )
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"z" * size)
        await writer.drain()
        written.set()
        await read_request(reader)

    async def scenario() -> None:
        async with scripted(handler) as (url, _), pool_for_test() as pool:
            resp = await post(pool, url)
            conn = resp._conn  # white box: the bound on buffered bytes is the point
            await until(lambda: conn.buffered > HIGH_WATER, what="the buffer to fill")
            assert conn._paused
            assert conn.buffered < HIGH_WATER + 1024 * 1024  # one socket read past the mark
            assert not written.is_set()  # the worker is held back, not us buffering it all
            assert len(await resp.read()) == size
            assert pool.idle_connections(url) == 1

    run(scenario)


def test_no_sockets_leak_through_requests_aborts_and_errors(run: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            path = request.split(b" ", 2)[1]
            if path == b"/garbage":
                writer.write(b"nonsense\r\n\r\n")
            elif path == b"/close":
                writer.write(ok(b"c", b"connection: close\r\n"))
            elif path == b"/die":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc")
                return
            else:
                writer.write(chunked(b"a", b"b", b"c"))
            await writer.drain()

    async def one(pool: UpstreamPool, url: str, i: int) -> None:
        path = ["/ok", "/garbage", "/close", "/die", "/abort"][i % 5]
        try:
            resp = await post(pool, url, path)
            if path == "/abort":
                await resp.__anext__()
                resp.abort()
            else:
                await resp.read()
        except (ProtocolError, UpstreamClosed):
            pass

    async def scenario() -> None:
        async with scripted(handler) as (url, _), pool_for_test() as pool:
            for _ in range(20):
                await asyncio.gather(*(one(pool, url, i) for i in range(16)))
            await until(lambda: pool.open_connections() <= 16, what="sockets to close")
            await until(
                lambda: len(client_sockets(port_of(url))) == pool.open_connections(),
                what="the OS to agree with the pool",
            )
            await pool.close()
            assert not client_sockets(port_of(url))

    run(scenario)


# --- a real simulated worker -----------------------------------------------------------------


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with sim_worker("--time-scale", "1000", "--instant") as w:
        yield w


@pytest.fixture(scope="module")
def slow_worker() -> Iterator[Worker]:
    """Real time: a long generation is still running when the client goes away."""
    with sim_worker("--time-scale", "1") as w:
        yield w


def generate(stream: bool = False, max_new_tokens: int = 16) -> bytes:
    body = {"text": "x" * 2048, "sampling_params": {"max_new_tokens": max_new_tokens}}
    return json.dumps({**body, "stream": stream}).encode()


async def post_generate(pool: UpstreamPool, url: str, body: bytes) -> UpstreamResponse:
    return await pool.request(url, "POST", "/generate", JSON_HEADERS, body, timeout=10)


def test_worker_generate_round_trip(run: Any, worker: Worker) -> None:
    async def scenario() -> None:
        async with pool_for_test() as pool:
            resp = await post_generate(pool, worker.url, generate())
            assert resp.status == 200
            assert resp.header(b"content-type") == b"application/json"
            reply = json.loads(await resp.read())
            assert reply["meta_info"]["completion_tokens"] == 16
            assert reply["meta_info"]["prompt_tokens"] > 0

    run(scenario)


def test_worker_stream_ends_with_done(run: Any, worker: Worker) -> None:
    async def scenario() -> None:
        async with pool_for_test() as pool:
            resp = await post_generate(pool, worker.url, generate(stream=True))
            assert resp.header(b"content-type") == b"text/event-stream"
            body = b"".join([chunk async for chunk in resp])
            assert body.endswith(b"data: [DONE]\n\n")
            events = [e for e in body.split(b"\n\n") if e]
            assert all(e.startswith(b"data: ") for e in events)
            assert json.loads(events[-2][6:])["meta_info"]["completion_tokens"] == 16

    run(scenario)


def test_worker_keep_alive_reuses_one_socket(run: Any, worker: Worker) -> None:
    async def scenario() -> None:
        async with pool_for_test() as pool:
            seen: set[tuple[str, int]] = set()
            for stream in (False, True, False, True):
                resp = await post_generate(pool, worker.url, generate(stream=stream))
                seen |= client_sockets(worker.port)
                await resp.read()
                assert pool.idle_connections(worker.url) == 1
            assert len(seen) == 1
            assert pool.open_connections() == 1

    run(scenario)


def test_worker_abort_mid_stream_then_pool_still_usable(run: Any, worker: Worker) -> None:
    async def scenario() -> None:
        async with pool_for_test() as pool:
            resp = await post_generate(pool, worker.url, generate(stream=True))
            assert (await resp.__anext__()).startswith(b"data: ")
            resp.abort()
            assert pool.idle_connections(worker.url) == 0
            await all_closed(pool)
            resp = await post_generate(pool, worker.url, generate())
            assert resp.status == 200
            assert json.loads(await resp.read())["meta_info"]["completion_tokens"] == 16
            assert pool.idle_connections(worker.url) == 1

    run(scenario)


def test_worker_sees_the_abort(run: Any, slow_worker: Worker) -> None:
    async def running(pool: UpstreamPool) -> int:
        resp = await pool.request(slow_worker.url, "GET", "/get_load", [], b"", timeout=5)
        load: int = json.loads(await resp.read())[0]["num_reqs"]
        return load

    async def scenario() -> None:
        async with pool_for_test() as pool:
            body = generate(stream=True, max_new_tokens=4000)  # ~25 s of modelled decoding
            resp = await post_generate(pool, slow_worker.url, body)
            await resp.__anext__()
            assert await running(pool) >= 1
            resp.abort()
            deadline = time.monotonic() + 5
            while await running(pool) != 0:
                assert time.monotonic() < deadline, "the worker kept generating"
                await asyncio.sleep(0.01)
            assert pool.idle_connections(slow_worker.url) == 1

    run(scenario)
