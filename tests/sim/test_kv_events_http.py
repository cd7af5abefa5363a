"""A real simulated worker publishing KV events over ZMQ on loopback: live stream, replay, flush."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from tests.processes import Worker, free_port_band, sim_worker, wait_for

TOPIC = b"kv"


@pytest.fixture(scope="module")
def publisher() -> Iterator[tuple[Worker, int]]:
    """A worker with page size 4, KV events on two loopback ports, 30 % of batches dropped."""
    base = free_port_band(2)
    config = {
        "publisher": "zmq",
        "endpoint": f"tcp://*:{base}",
        "replay_endpoint": f"tcp://*:{base + 1}",
        "topic": "kv",
    }
    with sim_worker(
        "--time-scale",
        "1000",
        "--page-size",
        "4",
        "--kv-events-config",
        json.dumps(config),
        "--kv-events-drop-rate",
        "0.3",
        "--max-total-tokens",
        "400",
    ) as w:
        yield w, base


def replay(port: int, start: int) -> list[tuple[int, bytes]]:
    """Everything the replay socket answers from `start`, up to its end marker."""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out: list[tuple[int, bytes]] = []
        while True:
            assert dealer.poll(5000), "no replay answer"
            empty, seq, payload = dealer.recv_multipart()
            assert empty == b""
            if seq == (-1).to_bytes(8, "big", signed=True):
                assert payload == b""
                return out
            out.append((int.from_bytes(seq, "big"), payload))
    finally:
        dealer.close()


def generate(w: Worker, text: str, max_new: int = 8) -> None:
    reply = w.post("/generate", {"text": text, "sampling_params": {"max_new_tokens": max_new}})
    assert reply.status == 200, reply.body


def apply(blocks: set[int], payload: bytes) -> list[Any]:
    batch = msgspec.msgpack.decode(payload)
    ts, events, rank = batch  # the newest layout: [ts, events, attn_dp_rank]
    assert isinstance(ts, float) and rank == 0
    for event in events:
        if event[0] == "BlockStored":
            _, hashes, _parent, tokens, block_size, lora, medium = event
            assert block_size == 4 and len(tokens) == 4 * len(hashes)
            assert lora is None and medium == "GPU"
            blocks.update(hashes)
        elif event[0] == "BlockRemoved":
            blocks.difference_update(event[1])
        else:
            assert event == ["AllBlocksCleared"]
            blocks.clear()
    return list(events)


def test_server_info_advertises_the_publisher(publisher: tuple[Worker, int]) -> None:
    w, base = publisher
    info = w.get("/server_info").json()
    assert info["kv_events"] == {
        "publisher": "zmq",
        "endpoint_host": "*",
        "endpoint_port_base": base,
        "topic": "kv",
        "block_size": 4,
        "dp_size": 1,
    }
    assert info["page_size"] == 4


def test_live_stream_replay_and_debug_dump_agree(publisher: tuple[Worker, int]) -> None:
    w, base = publisher
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
    sub.connect(f"tcp://127.0.0.1:{base}")
    live: list[int] = []
    sent = iter(range(1000))
    try:
        # the subscription takes a moment to reach the publisher: send until something arrives
        def received() -> bool:
            generate(w, f"fresh prompt {next(sent)}")  # new tokens: new blocks, new events
            while sub.poll(50):
                topic, seq, _payload = sub.recv_multipart()
                assert topic == TOPIC and len(seq) == 8
                live.append(int.from_bytes(seq, "big"))
            return len(live) >= 5

        wait_for(received, what="live KV event batches")
        for i in range(40):  # enough prompts to evict (400 tokens of KV)
            generate(w, " ".join(f"p{i} x{j}" for j in range(12)))
        assert w.post("/flush_cache").status == 200
        generate(w, "after the flush")
        while sub.poll(200):
            live.append(int.from_bytes(sub.recv_multipart()[1], "big"))
    finally:
        sub.close()
    assert live == sorted(live) and len(set(live)) < live[-1] - live[0] + 1  # drops: gaps
    batches = replay(base + 1, 0)
    assert [seq for seq, _ in batches] == list(range(len(batches)))  # replay holds them all
    blocks: set[int] = set()
    kinds: set[str] = set()
    for i, (_, payload) in enumerate(batches):
        events = apply(blocks, payload)
        if i == 0:
            assert events[0] == ["AllBlocksCleared"]  # the cache's reset at start-up
        kinds.update(e[0] for e in events)
    assert kinds == {"BlockStored", "BlockRemoved", "AllBlocksCleared"}
    dump = w.get("/debug/kv_blocks").json()
    assert dump["block_size"] == 4 and set(dump["blocks"]) == blocks
    assert replay(base + 1, len(batches) - 1)[0][0] == len(batches) - 1


def test_cached_tokens_are_whole_pages(publisher: tuple[Worker, int]) -> None:
    w, _ = publisher
    text = " ".join(f"page{i}" for i in range(10))
    generate(w, text, 1)
    body = w.post(
        "/generate", {"text": text + " more", "sampling_params": {"max_new_tokens": 1}}
    ).json()
    assert body["meta_info"]["cached_tokens"] % 4 == 0 and body["meta_info"]["cached_tokens"] > 0


def test_bad_config_and_taken_endpoint_exit_with_a_clear_error(
    publisher: tuple[Worker, int], tmp_path: Path
) -> None:
    _, base = publisher
    cases = [
        ('{"publisher": "kafka"}', 2, "unknown publisher"),
        (json.dumps({"publisher": "zmq", "endpoint": f"tcp://*:{base}"}), 1, "KV events endpoint"),
    ]
    for config, code, message in cases:
        log = tmp_path / "stderr.log"
        with sim_worker("--kv-events-config", config, ready=False, stderr_file=log) as w:
            assert w.proc.wait(timeout=30) == code
        assert message in log.read_text()
