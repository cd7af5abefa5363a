"""The simulated worker over HTTP: real `sglang-dp sim-worker` processes on loopback ports."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from sglang_dp.sim.tokenizer import WordTokenizer
from tests.processes import Worker, make_chat_tokenizer, make_hf_tokenizer, sim_worker, wait_for

WORDS = " ".join(f"w{i}" for i in range(300))


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    """A fast worker (1000× real time) shared by the tests that do not need a busy one."""
    with sim_worker(
        "--time-scale",
        "1000",
        "--enable-metrics",
        "--enable-cache-report",
        "--served-model-name",
        "sim-model",
        "--stream-interval",
        "2",
    ) as w:
        yield w


@pytest.fixture(scope="module")
def slow() -> Iterator[Worker]:
    """A worker at real speed: long generations stay busy until aborted."""
    with sim_worker("--max-total-tokens", "20000") as w:
        wait_for(lambda: _idle(w), what="warm-up request done")
        yield w


def generate(w: Worker, text: str, max_new: int = 4, **extra: Any) -> dict[str, Any]:
    reply = w.post(
        "/generate", {"text": text, "sampling_params": {"max_new_tokens": max_new}, **extra}
    )
    assert reply.status == 200, reply.body
    body: dict[str, Any] = reply.json()
    return body


# ---------------------------------------------------------------- info routes


def test_info_routes(worker: Worker) -> None:
    assert worker.get("/health").status == 200
    info = worker.get("/get_model_info").json()
    assert info["model_path"] is None and info["is_generation"] is True  # not a local folder
    assert worker.get("/model_info").json() == info
    server = worker.get("/get_server_info").json()
    assert server["max_total_num_tokens"] > 400_000 and server["time_scale"] == 1000
    assert (
        worker.get("/server_info").json()["max_total_num_tokens"] == server["max_total_num_tokens"]
    )
    models = worker.get("/v1/models").json()
    assert models["data"][0]["id"] == "sim-model" and models["data"][0]["owned_by"] == "sglang"
    load = worker.get("/get_load").json()
    assert load[0]["dp_rank"] == 0 and load[0]["num_reqs"] >= 0
    assert worker.get("/health_generate").status == 200


# ---------------------------------------------------------------- /generate


def test_generate_reports_cached_tokens(worker: Worker) -> None:
    first = generate(worker, WORDS + " first", 8)
    again = generate(worker, WORDS + " first", 8)
    meta = again["meta_info"]
    assert meta["prompt_tokens"] == 301 and meta["completion_tokens"] == 8
    assert meta["cached_tokens"] == 300 and first["meta_info"]["cached_tokens"] < 300
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert again["text"] == first["text"] and len(again["text"].split()) == 8
    assert meta["e2e_latency"] > 0


def test_generate_batch_and_input_ids(worker: Worker) -> None:
    reply = worker.post(
        "/generate", {"text": ["a b c", "d e f"], "sampling_params": {"max_new_tokens": 3}}
    )
    bodies = reply.json()
    assert isinstance(bodies, list) and len(bodies) == 2
    assert all(b["meta_info"]["completion_tokens"] == 3 for b in bodies)
    ids = worker.post(
        "/generate", {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 2}}
    ).json()
    assert ids["meta_info"]["prompt_tokens"] == 4


def test_generate_reports_the_output_ids_a_next_turn_hits_in_the_cache(worker: Worker) -> None:
    prompt = list(range(1000, 1040))
    first = worker.post(
        "/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": 6}}
    ).json()
    out = first["output_ids"]
    assert len(out) == 6 and WordTokenizer().encode(first["text"]) == out
    turn = worker.post(
        "/generate", {"input_ids": prompt + out + [7], "sampling_params": {"max_new_tokens": 1}}
    ).json()
    # the last output token was never run through the model: it is not in the cache
    assert turn["meta_info"]["cached_tokens"] == len(prompt) + len(out) - 1


def test_generate_stop_string(worker: Worker) -> None:
    full = generate(worker, "stop test", 20)["text"]
    stop = " " + full.split()[3]
    cut = generate(
        worker, "stop test", 20, **{"sampling_params": {"max_new_tokens": 20, "stop": stop}}
    )
    assert cut["text"] == full[: full.index(stop)]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_generate_stream_is_cumulative(worker: Worker) -> None:
    events = worker.events(
        "/generate", {"text": "stream me", "stream": True, "sampling_params": {"max_new_tokens": 9}}
    )
    assert events[-1] == "[DONE]"
    texts = [e["text"] for e in events[:-1]]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    counts = [e["meta_info"]["completion_tokens"] for e in events[:-1]]
    assert counts[0] == 1 and counts[-1] == 9 and len(counts) <= 1 + 9 // 2 + 1  # interval 2
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "length"
    assert texts[-1] == generate(worker, "stream me", 9)["text"]
    ids = [e["output_ids"] for e in events[:-1]]
    assert [len(i) for i in ids] == counts and ids[-1][: len(ids[0])] == ids[0]


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/generate", b"{not json"),
        ("/generate", b'{"text": 5}'),
        ("/generate", b'{"text": "x", "sampling_params": {"max_new_tokens": -3}}'),
        ("/generate", b'{"text": ""}'),
        ("/generate", json.dumps({"input_ids": list(range(9000))}).encode()),
        ("/v1/completions", b'{"prompt": {}}'),
        ("/v1/chat/completions", b'{"messages": "hi"}'),
        ("/v1/chat/completions", b"[]"),
        ("/abort_request", b"nope"),
    ],
)
def test_bad_input_is_a_json_400(worker: Worker, path: str, raw: bytes) -> None:
    reply = worker.request("POST", path, raw=raw)
    assert reply.status == 400
    assert reply.json()["error"]["message"]


def test_unknown_route_and_method(worker: Worker) -> None:
    assert worker.get("/nope").status == 404
    assert worker.get("/generate").status == 405
    assert worker.get("/nope").json()["error"]["type"] == "NotFoundError"


def test_keep_alive_serves_several_requests(worker: Worker) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=10)
    for _ in range(3):
        conn.request(
            "POST", "/generate", body=b'{"text": "again", "sampling_params": {"max_new_tokens": 2}}'
        )
        assert conn.getresponse().read()
    conn.close()


# ---------------------------------------------------------------- OpenAI routes


@pytest.fixture
def client(worker: Worker) -> openai.OpenAI:
    return openai.OpenAI(base_url=worker.url + "/v1", api_key="none", max_retries=0)


def test_openai_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model="sim-model", prompt=WORDS + " c", max_tokens=5)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 5
    again = client.completions.create(model="sim-model", prompt=WORDS + " c", max_tokens=5)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    two = client.completions.create(model="sim-model", prompt=["x y", "z"], max_tokens=2)
    assert [c.index for c in two.choices] == [0, 1]


def test_openai_chat_multi_turn_hits_the_cache(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": WORDS},
        {"role": "user", "content": "first question"},
    ]
    one = client.chat.completions.create(model="sim-model", messages=messages, max_tokens=6)
    answer = one.choices[0].message.content
    assert answer and one.choices[0].message.role == "assistant"
    messages += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "second question"},
    ]
    two = client.chat.completions.create(model="sim-model", messages=messages, max_tokens=6)
    assert one.usage is not None and two.usage is not None
    details = two.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    # the whole first turn, prompt and answer (minus its last token), was cached
    assert details.cached_tokens >= one.usage.prompt_tokens + 6 - 1


def test_openai_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sim-model",
        messages=[{"role": "user", "content": "stream"}],
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 7
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    parts = list(client.completions.create(model="m", prompt="s", max_tokens=3, stream=True))
    assert len("".join(c.choices[0].text for c in parts).split()) == 3
    assert parts[-1].choices[0].finish_reason == "length"


# ---------------------------------------------------------------- metrics


def test_metrics_have_sglang_names(worker: Worker) -> None:
    generate(worker, "metrics please", 2)
    text = worker.get("/metrics").body.decode()
    for name in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
        "sglang:prompt_tokens_total",
        "sglang:cached_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:time_to_first_token_seconds_bucket",
        "sglang:e2e_request_latency_seconds_count",
    ):
        assert name in text


# ---------------------------------------------------------------- busy worker


def _start_stream(w: Worker, rid: str, tokens: int = 100_000) -> socket.socket:
    """Open a long streaming /generate and wait for its first event."""
    body = json.dumps(
        {
            "text": "long " * 10,
            "stream": True,
            "rid": rid,
            "sampling_params": {"max_new_tokens": tokens},
        }
    ).encode()
    sock = socket.create_connection(("127.0.0.1", w.port), timeout=10)
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    received = b""
    while b"data: " not in received:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        received += chunk
    return sock


def _idle(w: Worker) -> bool:
    load = w.get("/get_load").json()[0]
    return bool(load["num_reqs"] == 0 and load["num_tokens"] == 0)


def test_flush_refuses_while_busy_and_abort_frees(slow: Worker) -> None:
    sock = _start_stream(slow, "busy-1", tokens=10_000)
    try:
        assert slow.get("/get_load").json()[0]["num_reqs"] == 1
        refused = slow.post("/flush_cache")
        assert refused.status == 400 and "not flushed" in refused.json()["error"]["message"]
        assert slow.post("/abort_request", {"rid": "busy-1"}).status == 200
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, "stream closed before its end"
            rest += chunk
        assert b'"abort"' in rest and b"[DONE]" in rest
    finally:
        sock.close()
    wait_for(lambda: _idle(slow), what="idle worker")
    assert slow.post("/flush_cache").status == 200


def test_disconnect_aborts_and_frees_kv(slow: Worker) -> None:
    sock = _start_stream(slow, "gone-1")
    assert slow.get("/get_load").json()[0]["num_tokens"] > 0
    sock.close()
    wait_for(lambda: _idle(slow), what="KV freed after disconnect")


def test_non_streaming_abort_answers_with_abort_reason(slow: Worker) -> None:
    import threading

    result: dict[str, Any] = {}

    def call() -> None:
        result["reply"] = generate(slow, "to abort", 100_000, rid="abort-me")

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(lambda: slow.get("/get_load").json()[0]["num_reqs"] == 1, what="request running")
    slow.post("/abort_request", {"rid": "abort-me"})
    thread.join(10)
    meta = result["reply"]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 100_000


# ---------------------------------------------------------------- other modes


def test_api_key_and_fail_rate() -> None:
    with sim_worker("--api-key", "sekret", "--fail-rate", "1", "--time-scale", "1000") as w:
        assert w.get("/health").status == 200
        assert w.get("/get_model_info").status == 401
        auth = {"Authorization": "Bearer sekret"}
        assert w.get("/get_model_info", headers=auth).status == 200
        assert w.post("/generate", {"text": "x"}).status == 401
        failed = w.post("/generate", {"text": "x"}, headers=auth)
        assert failed.status == 500 and failed.json()["error"]["message"]


def test_hang_rate_and_crash_after() -> None:
    with sim_worker("--hang-rate", "1", "--crash-after", "1", "--time-scale", "1000") as w:
        with pytest.raises(TimeoutError):
            w.post("/generate", {"text": "x"}, timeout=0.5)
        with pytest.raises((ConnectionError, OSError)):
            w.post("/generate", {"text": "y"}, timeout=5)
        wait_for(lambda: not w.alive(), what="process exit")
        assert w.proc.returncode != 0


def test_instant_mode() -> None:
    with sim_worker("--instant") as w:
        first = generate(w, WORDS, 16)
        again = generate(w, WORDS, 16)
        assert again["meta_info"]["cached_tokens"] == 299 and again["text"] == first["text"]
        events = w.events(
            "/generate", {"text": "s", "stream": True, "sampling_params": {"max_new_tokens": 5}}
        )
        assert events[-1] == "[DONE]" and events[-2]["meta_info"]["completion_tokens"] == 5
        chat = w.events(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "q"}], "max_tokens": 3, "stream": True},
        )
        assert chat[-1] == "[DONE]" and chat[-2]["choices"][0]["finish_reason"] == "length"


def test_module_entry_startup_tokenizer_and_unknown_flags(tmp_path: Path) -> None:
    folder = make_hf_tokenizer(tmp_path / "tok")
    log = tmp_path / "stderr.log"
    args = (
        "--startup-seconds",
        "4",  # from process start: leaves seconds of 503s to observe after the port binds
        "--tokenizer-path",
        "org/hub-name",  # not local: ignored, the model folder's tokenizer is used
        "--model-path",
        str(folder),
        "--log-level",
        "info",
        "--trust-remote-code",
        "--watchdog-timeout",
        "300",
        "--schedule-policy",
        "dfs-weight",
    )
    with sim_worker(*args, module=True, ready=False, stderr_file=log) as w:

        def status() -> int | None:
            try:
                return w.get("/health", timeout=1).status
            except OSError:
                return None

        assert wait_for(status, what="listening") == 503  # loading the model
        assert w.post("/generate", {"text": "hello"}).status == 503
        assert w.get("/ready").status == 503
        wait_for(lambda: status() == 200, what="ready")
        info = w.get("/get_model_info").json()
        assert info["model_path"] == str(folder) and info["tokenizer_path"] == str(folder)
        out = generate(w, "hello world the capital", 3)
        assert out["meta_info"]["prompt_tokens"] == 4  # 4 words of the tiny vocabulary, no BOS
    warnings = [line for line in log.read_text().splitlines() if "ignoring options" in line]
    assert len(warnings) == 1 and "--watchdog-timeout 300" in warnings[0]
    assert "dfs-weight is not modelled" in log.read_text()
    assert "org/hub-name is not a local folder" in log.read_text()


def test_chat_follows_the_tokenizers_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = make_chat_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    history = [{"role": "user", "content": "hello world, the capital of France is"}]
    with sim_worker("--tokenizer-path", str(folder), "--enable-cache-report") as w:
        first = w.post("/v1/chat/completions", {"messages": history, "max_tokens": 5}).json()
        text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        # as SGLang: the template's tokens (its own BOS), no special token added to them
        assert first["usage"]["prompt_tokens"] == len(tok.encode(text, add_special_tokens=False))
        answer = first["choices"][0]["message"]["content"]
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Paris"}]
        second = w.post("/v1/chat/completions", {"messages": history, "max_tokens": 5}).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"]  # the last turn's prompt is a prefix
