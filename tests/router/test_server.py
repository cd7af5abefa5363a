"""The router server against real simulated workers on loopback."""

from __future__ import annotations

import json
import select
import signal
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.processes import Reply, Worker, free_port, sim_worker, wait_for
from tests.router.cluster import Cluster, cluster, router_process

SYSTEM = " ".join(f"rule{i}" for i in range(300))  # a long shared system prompt


@pytest.fixture(scope="module")
def four() -> Iterator[Cluster]:
    with cluster(4) as c:
        yield c


def unique() -> str:
    """A prompt sharing no prefix with any other (so routing balances by load)."""
    return uuid.uuid4().hex + " question"


def generate(c: Cluster, text: str, **extra: Any) -> Reply:
    body = {"text": text, "sampling_params": {"max_new_tokens": 4}, **extra}
    return c.router.post("/generate", body)


def test_shared_prefixes_stick_to_one_worker_and_others_spread(four: Cluster) -> None:
    groups = {g: f"group {g} " + SYSTEM for g in range(8)}
    first = {g: generate(four, groups[g] + " q0").headers["x-sglang-dp-worker"] for g in groups}
    for g, text in groups.items():
        for q in range(1, 4):
            reply = generate(four, text + f" q{q}")
            assert reply.status == 200
            assert reply.headers["x-sglang-dp-worker"] == first[g]
    assert len(set(first.values())) >= 2  # misses at idle are not all sent to one worker


def test_correction_counts_real_cache_hits(four: Cluster) -> None:
    text = "correction " + SYSTEM
    generate(four, text + " a")
    reply = generate(four, text + " b")
    assert reply.json()["meta_info"]["cached_tokens"] > 250
    worker = next(
        w for w in four.stats()["workers"] if w["url"] == reply.headers["x-sglang-dp-worker"]
    )
    assert worker["cached_tokens"] > 250 and worker["predicted_tokens"] > 0


def test_request_id_is_passed_through_or_generated(four: Cluster) -> None:
    reply = four.router.post("/generate", {"text": "x"}, headers={"x-request-id": "abc-123"})
    assert reply.headers["x-request-id"] == "abc-123"
    assert len(generate(four, "y").headers["x-request-id"]) >= 16


def test_streaming_generate_passes_cumulative_events(four: Cluster) -> None:
    reply = four.router.post(
        "/generate",
        {"text": "stream " + SYSTEM, "stream": True, "sampling_params": {"max_new_tokens": 6}},
    )
    assert reply.status == 200 and "x-sglang-dp-worker" in reply.headers
    events = [b[6:] for b in reply.body.decode().split("\n\n") if b.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["text"] for e in events[:-1]]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert four.in_flight() == 0


def test_openai_client_through_the_router(four: Cluster) -> None:
    client = openai.OpenAI(base_url=four.router.url + "/v1", api_key="none", max_retries=0)
    messages: list[Any] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "first"},
    ]
    one = client.chat.completions.create(model="m", messages=messages, max_tokens=5)
    messages += [
        {"role": "assistant", "content": one.choices[0].message.content},
        {"role": "user", "content": "second"},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=messages, max_tokens=5
    )
    two = raw.parse()
    assert two.usage is not None and two.usage.prompt_tokens_details is not None
    assert two.usage.prompt_tokens_details.cached_tokens > 250  # same worker, history cached
    chunks = list(
        client.chat.completions.create(model="m", messages=messages, max_tokens=5, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    completion = client.completions.create(model="m", prompt="complete me", max_tokens=3)
    assert completion.choices[0].text


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "message"),
    [
        ("POST", "/generate", b"{oops", 400, "not valid JSON"),
        ("POST", "/generate", b"{}", 400, "exactly one of 'text' and 'input_ids'"),
        ("POST", "/v1/completions", b'{"model": "m"}', 400, "'prompt' is required"),
        ("POST", "/v1/chat/completions", b'{"messages": 5}', 400, "'messages' must be"),
        ("POST", "/generate", b'{"text": "a", "stream": 1}', 400, "'stream' must be"),
        ("GET", "/generate", None, 405, "takes POST"),
        ("GET", "/no/such/route", None, 404, ""),
    ],
)
def test_bad_input_gets_a_clear_4xx(
    four: Cluster, method: str, path: str, raw: bytes | None, status: int, message: str
) -> None:
    reply = four.router.request(method, path, raw=raw)
    assert reply.status == status
    assert message in reply.body.decode()


def test_oversized_body_is_refused_with_413() -> None:
    with sim_worker("--instant") as w, router_process([w.url], "--max-payload-size", "1000") as r:
        reply = r.post("/generate", {"text": "x" * 2000})
        assert reply.status == 413
        assert r.post("/generate", {"text": "small"}).status == 200


def test_no_healthy_worker_is_a_clear_503() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with router_process([dead], ready_workers=0) as r:
        assert r.get("/readiness").status == 503
        reply = r.post("/generate", {"text": "hello"})
        assert reply.status == 503
        assert "no worker available" in reply.json()["error"]["message"]


def test_failing_worker_is_retried_elsewhere() -> None:
    per_worker = [("--fail-rate", "1.0"), ()]
    with cluster(2, per_worker=per_worker) as c:
        statuses = Counter(generate(c, unique()).status for i in range(20))
        assert statuses == {200: 20}
        errors = {w["url"]: w["errors"] for w in c.stats()["workers"]}
        assert errors[c.workers[0].url] > 0 and errors[c.workers[1].url] == 0


def test_crashed_worker_leaves_routing_and_requests_keep_succeeding() -> None:
    per_worker = [("--crash-after", "3"), ()]
    with cluster(2, per_worker=per_worker) as c:
        statuses = Counter(generate(c, unique()).status for i in range(30))
        assert statuses == {200: 30}
        wait_for(lambda: not c.workers[0].alive(), what="worker crash")
        wait_for(
            lambda: c.router.get("/readiness").json()["healthy_workers"] == 1,
            what="crashed worker marked down",
        )
        assert c.in_flight() == 0


def test_timeout_is_a_504_and_does_not_leak() -> None:
    with cluster(
        1, "--request-timeout-secs", "0.5", "--retries", "0", per_worker=[("--hang-rate", "1")]
    ) as c:
        reply = generate(c, "never answered")
        assert reply.status == 504
        assert c.in_flight() == 0


def test_client_disconnect_mid_stream_releases_in_flight() -> None:
    with cluster(1, worker_args=("--time-scale", "1")) as c:
        body = json.dumps(
            {"text": "long", "stream": True, "sampling_params": {"max_new_tokens": 100000}}
        ).encode()
        sock = socket.create_connection(("127.0.0.1", c.router.port), timeout=10)
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body)
        )
        assert b"data: " in sock.recv(65536)
        assert c.in_flight() == 1
        sock.close()
        wait_for(lambda: c.in_flight() == 0, what="in-flight back to 0")
        wait_for(
            lambda: c.workers[0].get("/get_load").json()[0]["num_reqs"] == 0,
            what="the worker aborted the request",
        )


def test_api_keys_guard_inference_and_admin_routes() -> None:
    with (
        sim_worker("--instant", "--api-key", "inf") as w,
        router_process([w.url], "--api-key", "inf", "--admin-api-key", "adm") as r,
    ):
        assert r.post("/generate", {"text": "a"}).status == 401
        bad = r.post("/generate", {"text": "a"}, headers={"authorization": "Bearer nope"})
        assert bad.status == 401
        ok = r.post("/generate", {"text": "a"}, headers={"authorization": "Bearer inf"})
        assert ok.status == 200
        assert r.get("/debug/stats", headers={"authorization": "Bearer inf"}).status == 401
        assert r.get("/debug/stats", headers={"authorization": "Bearer adm"}).status == 200
        assert r.get("/v1/models", headers={"authorization": "Bearer inf"}).status == 200
        assert r.get("/health").status == 200


def test_workers_can_be_added_and_removed_under_traffic() -> None:
    with sim_worker("--instant") as a, sim_worker("--instant") as b, router_process([a.url]) as r:
        assert r.post("/workers", {"url": b.url}).status == 201
        wait_for(lambda: r.get("/readiness").json()["healthy_workers"] == 2, what="b healthy")
        served = Counter(
            r.post("/generate", {"text": unique()}).headers["x-sglang-dp-worker"] for i in range(20)
        )
        assert set(served) == {a.url, b.url}
        assert r.request("DELETE", f"/workers?url={a.url}").status == 200
        served = Counter(
            r.post("/generate", {"text": unique()}).headers["x-sglang-dp-worker"] for i in range(10)
        )
        assert served == {b.url: 10}
        assert r.get("/list_workers").json() == {"urls": [b.url]}
        assert r.post("/remove_worker?url=http://127.0.0.1:1").status == 404
        assert r.post("/workers", {"url": "ftp://x"}).status == 400


@pytest.mark.parametrize(
    "policy",
    [
        "cache_aware",
        "threshold",
        "variance",
        "round_robin",
        "random",
        "power_of_two",
        "shortest_queue",
    ],
)
def test_every_policy_is_reachable_from_the_cli(policy: str) -> None:
    with (
        sim_worker("--instant") as a,
        sim_worker("--instant") as b,
        router_process([a.url, b.url], "--policy", policy, "--seed", "1") as r,
    ):
        assert all(r.post("/generate", {"text": unique()}).status == 200 for i in range(6))
        stats = r.get("/debug/stats").json()
        assert stats["policy"] == policy and stats["routed"] == 6


def test_debug_route_is_a_dry_run_and_explains(four: Cluster) -> None:
    text = "explain " + SYSTEM
    served = generate(four, text + " one").headers["x-sglang-dp-worker"]
    before = four.router.get("/debug/tree").json()["total_size"]
    reply = four.router.post("/debug/route", {"text": text + " two"})
    assert reply.status == 200
    explained = reply.json()
    assert explained["decision"]["worker"] == served
    assert explained["decision"]["reason"] == "cache_hit"
    assert len(explained["workers"]) == 4
    assert four.router.get("/debug/tree").json()["total_size"] == before


def test_flush_cache_fans_out_and_resets_the_tree(four: Cluster) -> None:
    generate(four, "flush me " + SYSTEM)
    wait_for(lambda: four.in_flight() == 0, what="idle")
    reply = four.router.post("/flush_cache")
    assert reply.status == 200, reply.body
    assert set(reply.json()["workers"].values()) == {"flushed"}
    assert four.router.get("/debug/tree").json()["total_size"] == 0


def test_metrics_and_info_routes(four: Cluster) -> None:
    generate(four, "metrics")
    text = four.router.get("/metrics").body.decode()
    for name in (
        "sglang_dp_requests_total",
        "sglang_dp_in_flight",
        "sglang_dp_decisions_total",
        "sglang_dp_predicted_tokens_total",
        "sglang_dp_cached_tokens_total",
        "sglang_dp_tree_size",
        "sglang_dp_routing_latency_seconds_bucket",
        "sglang_dp_upstream_latency_seconds_bucket",
    ):
        assert name in text
    assert four.router.get("/get_model_info").json()["is_generation"] is True
    assert "max_total_num_tokens" in four.router.get("/get_server_info").json()
    assert four.router.get("/v1/models").json()["object"] == "list"
    workers = four.router.get("/workers").json()["workers"]
    assert {w["state"] for w in workers} == {"healthy"}


def test_head_then_get_on_one_keep_alive_connection(four: Cluster) -> None:
    """What load balancers do: the HEAD answer has no body, so the GET's answer parses."""
    sock = socket.create_connection(("127.0.0.1", four.router.port), timeout=10)
    try:
        sock.sendall(
            b"HEAD /health HTTP/1.1\r\nhost: x\r\n\r\nGET /health HTTP/1.1\r\nhost: x\r\n\r\n"
        )
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b'{"status":"ok"}'):
            data += sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 15" in head
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n")  # no HEAD body before it
    finally:
        sock.close()


def test_sigint_with_an_idle_keep_alive_connection_exits_at_once() -> None:
    """An idle keep-alive connection is closed at shutdown instead of holding the router for
    its whole grace (bench_faults measures the busy case: shutdown_s_under_load)."""
    with sim_worker("--instant") as w, router_process([w.url]) as r:
        sock = socket.create_connection(("127.0.0.1", r.port), timeout=10)
        body = json.dumps({"text": "keep busy"}).encode()
        request = (
            b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body)
        )
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        r.proc.send_signal(signal.SIGINT)
        r.proc.wait(timeout=5)  # (its grace is 10 s: an idle connection no longer holds it)
        sock.close()


def test_running_out_of_file_descriptors_is_the_router_own_503() -> None:
    """An open-files limit (40) too low for the client connections the router serves (at
    least 16, each needing one to the worker, beside its own): a connection past those gets the
    router's own 503 at once, and requests that find no descriptor left to reach the worker get
    its own 503 naming the limit. Neither is blamed on the worker, and once the clients are gone
    requests succeed again."""
    long = json.dumps({"text": "busy", "sampling_params": {"max_new_tokens": 8000}}).encode()
    post = (
        b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(long), long)
    )
    with sim_worker() as w, router_process([w.url], max_files=40) as r:
        held: list[socket.socket] = []
        answers: dict[socket.socket, tuple[int, bytes]] = {}
        try:
            status = 200
            while status == 200:  # the connections it serves: each asks the router's /health
                held.append(socket.create_connection(("127.0.0.1", r.port), timeout=10))
                held[-1].sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                status, answer = read_answer(held[-1])
            held.pop().close()
            assert status == 503 and "too many connections" in answer.decode(), answer
            for sock in held:  # long requests: each holds its connection to the worker
                sock.sendall(post)

            def settled() -> bool:
                readable, _, _ = select.select([s for s in held if s not in answers], [], [], 0)
                answers.update((sock, read_answer(sock)) for sock in readable)
                return len(answers) + w.get("/get_load").json()[0]["num_reqs"] == len(held)

            wait_for(settled, what="every request answered or at the worker")
            assert answers, "every request reached the worker: no descriptor ran out"
            for status, answer in answers.values():
                error = json.loads(answer)["error"]
                assert status == 503 and "open files" in error["message"], answer
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: succeeds(r), what="a 200")
        (worker,) = r.get("/debug/stats").json()["workers"]
        assert worker["state"] == "healthy" and worker["errors"] == 0 and worker["resets"] == 0


def succeeds(router: Worker) -> bool:
    body = {"text": "after", "sampling_params": {"max_new_tokens": 1}}
    try:
        return router.post("/generate", body).status == 200
    except OSError:  # refused while the router's descriptors are still short
        return False


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """One whole content-length answer from a raw socket: its status and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-answer: {data + body!r}"
        body += chunk
    return int(head.split(b" ")[1]), body
