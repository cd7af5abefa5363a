"""The fault matrix: every injected worker fault × stream / non-stream × retries off / on, with
workers on the lean httpserver and, for the faults whose bytes depend on the server's framing,
on uvicorn + Starlette (`--http-server uvicorn`: SGLang's own stack). Faults: a 500, a hang,
garbled chunks, a close after the head, a body short of its content-length, a TCP reset
mid-response, and stalls (with --instant, and timed by the scheduler).

Whatever a worker does, the client gets, within a bound (the socket timeout), either a whole
well-formed answer with the status the outcome table names, or — once a stream's bytes reached
it — an SSE error event and a closed connection WITHOUT the chunked terminator. Afterwards the
in-flight counts are back to 0 and the tree holds no speculation for failed attempts.

Simulated workers are real processes shared by the module; the routers run in this process on
a loop in a thread (a `RouterServer` each: one per fault and retry setting, cheap to start),
and are reached through real loopback sockets. A second request on the same router finds a
pooled connection to the worker when the fault left it open (a 500 does): the task-less path.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httptools
import pytest
import uvloop

from sglang_dp.router.config import RouterConfig
from sglang_dp.router.engine import EngineConfig
from sglang_dp.router.policies import PolicyConfig
from sglang_dp.router.server import RouterServer
from sglang_dp.sim.faults import INSTANT, MATRIX
from tests.processes import Worker, free_port, sim_worker, wait_for

CLIENT_TIMEOUT_S = 6.0  # request timeout 1 s: an answer later than this is a hang
WORKERS = {"good": INSTANT, "slow": ("--max-total-tokens", "20000")}  # (slow: real time)
# The workers serve with the lean httpserver, and with uvicorn + Starlette (SGLang's stack) for
# the faults whose bytes depend on the server's framing (a hang, and a stall the scheduler does
# not time, look the same on any server: not repeated, to keep the suite short).
SERVERS = ("lean", "uvicorn")
ON_UVICORN = ("fail", "garble", "close_after_head", "truncate", "reset", "stall_timed")
CASES = [
    pytest.param(server, fault, id=f"{server}-{fault}")
    for server in SERVERS
    for fault in MATRIX
    if server == "lean" or fault in ON_UVICORN
]
# a stall ends in the router's timeout on any worker: beside a good one, once is enough
CASES_RETRIED = [case for case in CASES if case.id not in ("lean-stall", "uvicorn-stall_timed")]
# what the client gets from a router whose only worker has the fault (no retry possible):
# a status, or "broken" (an error event, then a close without the terminator)
ALONE: dict[tuple[str, bool], Any] = {
    ("fail", False): 500,  # the worker's own answer, relayed
    ("fail", True): 500,
    ("hang", False): 504,
    ("hang", True): 504,
    ("garble", False): 502,
    ("garble", True): "broken",  # its first event reached the client
    ("close_after_head", False): 502,
    ("close_after_head", True): 502,  # its head never reached the client: not started
    ("truncate", False): 502,  # the body fell short of its content-length: nothing relayed
    ("truncate", True): "broken",  # the head and half an event reached the client
    ("reset", False): 502,
    ("reset", True): "broken",  # its first event reached the client, then the reset
    ("stall", False): 504,
    ("stall", True): "broken",  # two tokens reached the client, then the timeout
    ("stall_timed", False): 504,
    ("stall_timed", True): "broken",
}
# beside a good worker with retries, these always end well (nothing reached the client)
RETRIED = {("fail", s) for s in (False, True)} | {
    ("close_after_head", True),
    ("close_after_head", False),
    ("garble", False),
    ("truncate", False),
    ("reset", False),
}


@dataclass
class Outcome:
    status: int
    body: bytes
    complete: bool  # the response ended properly (else the connection closed before)


class _Reader:
    """httptools callbacks: one response, and whether it completed."""

    def __init__(self) -> None:
        self.body = b""
        self.complete = False

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def exchange(port: int, body: dict[str, Any]) -> Outcome:
    """POST /generate on a fresh keep-alive connection; read until the answer ends or the
    connection closes (a hang fails by the socket timeout)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S)
    reader = _Reader()
    parser = httptools.HttpResponseParser(reader)
    try:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(data), data)
        )
        while not reader.complete:
            chunk = sock.recv(65536)
            if not chunk:
                break
            parser.feed_data(chunk)
    finally:
        sock.close()
    return Outcome(parser.get_status_code(), reader.body, reader.complete)


class Routers:
    """RouterServers on one uvloop in a thread of this process."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.started: list[RouterServer] = []

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def start(self, urls: list[str], retries: int) -> RouterServer:
        policy = PolicyConfig(policy="round_robin")
        config = RouterConfig(
            worker_urls=tuple(urls),
            port=free_port(),
            retries=retries,
            request_timeout_secs=1.0,
            health_check_interval_secs=30.0,
            engine=EngineConfig(policy=policy),
        )
        server = RouterServer(config)
        self.run(server.start())
        self.started.append(server)
        return server

    def in_flight(self, server: RouterServer) -> int:
        async def count() -> int:
            return sum(w.in_flight for w in server.engine.snapshot(0).workers)

        return int(self.run(count()))

    def healthy(self, server: RouterServer) -> int:
        async def count() -> int:
            return len(server.engine.healthy_workers())

        return int(self.run(count()))

    def tree_size(self, server: RouterServer, url: str) -> int:
        async def size() -> int:
            return server.engine.tree.size(url)

        return int(self.run(size()))

    def close(self) -> None:
        for server in self.started:
            self.run(server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Matrix:
    """Routers on one loop, and a worker per server and fault, started when first asked for."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._workers: dict[tuple[str, str], Worker] = {}
        self.routers = Routers()
        stack.callback(self.routers.close)

    def worker(self, server: str, fault: str) -> Worker:
        key = (server, fault)
        if key not in self._workers:
            args = MATRIX.get(fault, WORKERS.get(fault, ()))
            worker = sim_worker(*args, "--http-server", server)
            self._workers[key] = self._stack.enter_context(worker)
        return self._workers[key]


@contextmanager
def matrix() -> Iterator[Matrix]:
    with ExitStack() as stack:
        yield Matrix(stack)


@pytest.fixture(scope="module")
def faults() -> Iterator[Matrix]:
    with matrix() as m:
        yield m


def request(stream: bool, text: str) -> dict[str, Any]:
    return {"text": text, "stream": stream, "sampling_params": {"max_new_tokens": 8}}


def check_shape(outcome: Outcome, stream: bool) -> Any:
    """The outcome is well formed; returns its kind: a status, or "broken"."""
    if outcome.complete:
        if outcome.status == 200 and stream:
            assert outcome.body.endswith(b"data: [DONE]\n\n")
        elif outcome.status != 200:
            assert "error" in json.loads(outcome.body)
        return outcome.status
    assert stream and outcome.status == 200, outcome
    # the last thing before the close is the router's error event
    last = outcome.body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ") and "error" in json.loads(last[6:]), outcome.body
    return "broken"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("server", "fault"), CASES)
def test_fault_alone_without_retry(faults: Matrix, server: str, fault: str, stream: bool) -> None:
    worker = faults.worker(server, fault)
    router = faults.routers.start([worker.url], retries=0)
    rounds = 1 if fault.startswith(("hang", "stall")) else 2  # the second may find a pooled one
    for i in range(rounds):
        # a failure reported the worker down until a health check (started at once) passes
        wait_for(lambda: faults.routers.healthy(router) == 1, what="worker healthy")
        outcome = exchange(router.port, request(stream, f"{fault} {stream} {i} alone"))
        assert check_shape(outcome, stream) == ALONE[(fault, stream)]
    wait_for(lambda: faults.routers.in_flight(router) == 0, what="in-flight back to 0")
    if ALONE[(fault, stream)] != "broken":  # no speculation left for failed attempts
        assert faults.routers.tree_size(router, worker.url) == 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("server", "fault"), CASES_RETRIED)
def test_fault_beside_a_good_worker_with_retries(
    faults: Matrix, server: str, fault: str, stream: bool
) -> None:
    bad, good = faults.worker(server, fault), faults.worker(server, "good")
    router = faults.routers.start([bad.url, good.url], retries=2)
    retried = (fault, stream) in RETRIED
    for i in range(2):
        wait_for(lambda: faults.routers.healthy(router) == 2, what="workers healthy")
        outcome = exchange(router.port, request(stream, f"{fault} {stream} {i} retried"))
        kind = check_shape(outcome, stream)
        # retryable faults always end well; the others end well when the good worker was first
        assert kind == 200 if retried else kind in (200, ALONE[(fault, stream)])
    wait_for(lambda: faults.routers.in_flight(router) == 0, what="in-flight back to 0")
    errors = {w.url: w.errors for w in router.engine.snapshot(0).workers}
    assert errors[bad.url] >= 1 and errors[good.url] == 0  # round robin tried the bad one
    if retried:
        assert faults.routers.tree_size(router, bad.url) == 0


def test_clients_gone_in_the_same_turn_as_their_request_leak_nothing(faults: Matrix) -> None:
    """A request and the client's close in one read: its task may be cancelled before its
    first step; the attempt's in-flight count must be released all the same."""
    router = faults.routers.start([faults.worker("lean", "good").url], retries=0)
    for i in range(20):
        data = json.dumps(request(i % 2 == 0, f"gone {i}")).encode()
        sock = socket.create_connection(("127.0.0.1", router.port), timeout=CLIENT_TIMEOUT_S)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(data), data)
        )
        sock.close()  # a reset right behind the request
    wait_for(lambda: faults.routers.in_flight(router) == 0, what="in-flight back to 0")


def test_the_worker_headers_are_relayed_less_hop_by_hop_ones(faults: Matrix) -> None:
    """A worker behind a middleware of its own (a scripted HTTP/1.1 server: the simulator sends
    no extra headers): its end-to-end headers reach the client, hop-by-hop ones do not."""
    body = b'{"text": "ok", "meta_info": {}}'
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-worker-own: yes\r\n"
        b"server: uvicorn\r\nkeep-alive: timeout=5\r\nconnection: keep-alive\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            writer.write(answer)

    async def listen() -> asyncio.Server:
        return await asyncio.start_server(worker, "127.0.0.1", 0)

    server = faults.routers.run(listen())
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        router = faults.routers.start([url], retries=0)
        reply = Worker(None, router.port).post("/generate", {"text": "headers"})  # type: ignore[arg-type]
        assert reply.status == 200 and reply.body == body
        assert reply.headers["x-worker-own"] == "yes" and reply.headers["server"] == "uvicorn"
        assert "keep-alive" not in reply.headers and reply.headers["x-sglang-dp-worker"] == url
    finally:
        server.close()


def test_a_removed_worker_pooled_connections_are_closed(faults: Matrix) -> None:
    url = faults.worker("lean", "good").url
    router = faults.routers.start([url], retries=0)
    assert exchange(router.port, request(False, "pool me")).status == 200

    async def pooled() -> int:
        return router.pool.idle_connections(url)

    assert faults.routers.run(pooled()) == 1

    async def remove() -> None:
        router.remove_worker(url)

    faults.routers.run(remove())
    wait_for(lambda: faults.routers.run(open_sockets(router)) == 0, what="sockets closed")


async def open_sockets(router: RouterServer) -> int:
    return router.pool.open_connections()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("server", SERVERS)
def test_a_client_gone_mid_answer_aborts_the_request_at_the_worker(
    faults: Matrix, server: str, stream: bool
) -> None:
    """The router passes a client's disconnect on (it closes the worker's connection), and the
    worker's server tells the worker: the request is aborted there, its KV freed."""
    worker = faults.worker(server, "slow")
    wait_for(lambda: load(worker)["num_tokens"] == 0, what="its warm-up request done")
    router = faults.routers.start([worker.url], retries=0)
    body = {"text": "long " * 10, "stream": stream, "sampling_params": {"max_new_tokens": 5000}}
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", router.port), timeout=CLIENT_TIMEOUT_S)
    try:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(data), data)
        )
        wait_for(lambda: load(worker)["num_reqs"] == 1, what="the request at the worker")
        if stream:
            assert b"data: " in sock.recv(65536)
    finally:
        sock.close()
    wait_for(lambda: load(worker)["num_tokens"] == 0, what="the worker aborted it")
    wait_for(lambda: faults.routers.in_flight(router) == 0, what="in-flight back to 0")


def load(worker: Worker) -> dict[str, int]:
    return worker.get("/get_load").json()[0]  # type: ignore[no-any-return]
