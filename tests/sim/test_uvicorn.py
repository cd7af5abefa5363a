"""The simulated worker on SGLang's own server stack (`--http-server uvicorn`): uvicorn + Starlette
carry the same handler as the lean server, so every route answers the same, disconnects abort,
and the faults reach the wire as the stack's own failures. Real worker processes on loopback.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.processes import Reply, Worker, sim_worker, wait_for
from tests.sim.test_http import _idle, _start_stream

ARGS = (
    "--time-scale",
    "1000",
    "--enable-metrics",
    "--enable-cache-report",
    "--served-model-name",
    "sim-model",
    "--stream-interval",
    "2",
)
VOLATILE = {"id", "created", "e2e_latency", "port", "http_server"}  # differ between any 2 runs
CHAT = [{"role": "user", "content": "hello there"}]
# (method, path, body): every route of the simulated worker, in an order whose answers are
# deterministic (the same cache contents on both workers at every step)
CALLS: list[tuple[str, str, Any]] = [
    ("GET", "/health", None),
    ("POST", "/health", None),
    ("GET", "/ready", None),
    ("GET", "/health_generate", None),
    ("GET", "/get_model_info", None),
    ("GET", "/model_info", None),
    ("GET", "/get_server_info", None),
    ("GET", "/server_info", None),
    ("GET", "/v1/models", None),
    ("POST", "/generate", {"text": "the capital of", "sampling_params": {"max_new_tokens": 6}}),
    ("POST", "/generate", {"text": ["a b", "c d"], "sampling_params": {"max_new_tokens": 3}}),
    ("POST", "/generate", {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3}}),
    ("POST", "/generate", {"text": "stream me", "stream": True}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "once upon", "max_tokens": 5}),
    (
        "POST",
        "/v1/completions",
        {"model": "m", "prompt": "a time", "max_tokens": 5, "stream": True},
    ),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": CHAT, "max_tokens": 5}),
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": CHAT,
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    ("GET", "/get_load", None),
    ("GET", "/debug/kv_blocks", None),
    ("POST", "/abort_request", {"rid": "nobody"}),
    ("POST", "/flush_cache", None),
    ("GET", "/debug/kv_blocks", None),
    ("POST", "/generate", b"{not json"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": "not a list"}),
    ("GET", "/nowhere", None),
    ("DELETE", "/generate", None),
    ("GET", "/generate", None),
]


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Worker, Worker]]:
    """The same worker twice: on the lean server and on uvicorn."""
    with (
        sim_worker(*ARGS) as lean,
        sim_worker(*ARGS, "--http-server", "uvicorn") as uvicorn,
    ):
        for w in (lean, uvicorn):
            wait_for(lambda w=w: _idle(w), what="warm-up request done")  # type: ignore[misc]
        yield lean, uvicorn


def call(w: Worker, method: str, path: str, body: Any) -> Reply:
    raw = body if isinstance(body, bytes) else None
    return w.request(method, path, None if raw else body, raw=raw)


def normal(reply: Reply, path: str) -> Any:
    """What must be equal on both servers: the status and the body, less what varies."""
    content_type = reply.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        events = [
            block[len("data: ") :]
            for block in reply.body.decode().split("\n\n")
            if block.startswith("data: ")
        ]
        # how many progress events a stream gets depends on the timers; what they add up to not
        parsed = [json.loads(e) for e in events if e != "[DONE]"]
        assert events[-1] == "[DONE]"
        if path == "/generate":
            return reply.status, strip(parsed[-1])
        text = "".join(
            (c["choices"][0].get("delta") or {}).get("content") or c["choices"][0].get("text", "")
            for c in parsed
            if c["choices"]
        )
        return reply.status, text, [strip(c) for c in parsed if not c["choices"]]
    if path == "/metrics":
        return reply.status, sorted(
            line.split(" ")[2] for line in reply.body.decode().splitlines() if line[:6] == "# TYPE"
        )
    if content_type.startswith("application/json"):
        return reply.status, strip(json.loads(reply.body))
    return reply.status, content_type, reply.body


def strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def test_every_route_answers_the_same_on_both_servers(pair: tuple[Worker, Worker]) -> None:
    lean, uvicorn = pair
    for method, path, body in [*CALLS, ("GET", "/metrics", None)]:
        a, b = call(lean, method, path, body), call(uvicorn, method, path, body)
        assert normal(a, path) == normal(b, path), (method, path)
        assert b.headers["server"] == "uvicorn" and "server" not in a.headers
        if b.headers.get("content-type", "").startswith("text/event-stream"):
            assert b.headers["transfer-encoding"] == "chunked"  # uvicorn's framing, not ours
    assert uvicorn.get("/get_server_info").json()["http_server"] == "uvicorn"
    assert lean.get("/get_server_info").json()["http_server"] == "lean"


def test_keep_alive_connection_serves_several_requests(pair: tuple[Worker, Worker]) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", pair[1].port, timeout=10)
    try:
        for i in range(3):
            body = json.dumps({"text": f"keep {i}", "sampling_params": {"max_new_tokens": 2}})
            conn.request("POST", "/generate", body=body)
            reply = conn.getresponse()
            assert reply.status == 200 and json.loads(reply.read())["meta_info"]["prompt_tokens"]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def slow() -> Iterator[Worker]:
    """A uvicorn worker at real speed: long generations stay busy until aborted."""
    with sim_worker("--max-total-tokens", "20000", "--http-server", "uvicorn") as w:
        wait_for(lambda: _idle(w), what="warm-up request done")
        yield w


def test_a_stream_whose_client_goes_away_is_aborted(slow: Worker) -> None:
    sock = _start_stream(slow, "uvicorn-gone-stream")
    assert slow.get("/get_load").json()[0]["num_tokens"] > 0
    sock.close()
    wait_for(lambda: _idle(slow), what="KV freed after disconnect")


def test_a_whole_answer_whose_client_goes_away_is_aborted(slow: Worker) -> None:
    body = json.dumps({"text": "wait", "sampling_params": {"max_new_tokens": 100_000}}).encode()
    sock = socket.create_connection(("127.0.0.1", slow.port), timeout=10)
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    wait_for(lambda: slow.get("/get_load").json()[0]["num_reqs"] == 1, what="request running")
    sock.close()
    wait_for(lambda: _idle(slow), what="KV freed after disconnect")


def test_abort_request_ends_a_whole_answer_with_its_reason(slow: Worker) -> None:
    result: dict[str, Any] = {}

    def run() -> None:
        body = {"text": "abort me", "rid": "uv-abort", "sampling_params": {"max_new_tokens": 10**5}}
        result["reply"] = slow.post("/generate", body)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: slow.get("/get_load").json()[0]["num_reqs"] == 1, what="request running")
    assert slow.post("/abort_request", {"rid": "uv-abort"}).status == 200
    thread.join(10)
    assert result["reply"].json()["meta_info"]["finish_reason"]["type"] == "abort"


# ---------------------------------------------------------------- faults on the wire


def raw_answer(port: int, stream: bool) -> tuple[bytes, str]:
    """POST /generate and read until the connection ends: the bytes, and how it ended."""
    body = json.dumps({"text": "f", "stream": stream, "sampling_params": {"max_new_tokens": 4}})
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b"
        % (len(body), body.encode())
    )
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
        return data, "closed"
    except ConnectionResetError:
        return data, "reset"
    finally:
        sock.close()


@pytest.mark.parametrize("server", ["lean", "uvicorn"])
def test_a_truncated_body_and_a_reset_reach_the_wire(server: str) -> None:
    with (
        sim_worker("--instant", "--truncate-rate", "1", "--http-server", server) as short,
        sim_worker("--instant", "--reset-rate", "1", "--http-server", server) as reset,
    ):
        for stream in (False, True):
            data, how = raw_answer(short.port, stream)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            assert how == "closed" and 0 < len(body) < length, data
            data, how = raw_answer(reset.port, stream)
            assert how == "reset" and data.startswith(b"HTTP/1.1 200"), data
            assert b'"reset":true' in data or not stream  # a stream's one event came first
