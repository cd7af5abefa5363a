"""KV events of the simulated radix cache: SGLang's msgpack layout, hash chain, pages, config."""

from __future__ import annotations

import hashlib
import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.kv_wire import EventBatch, KvEventsConfig, encode_batch
from sglang_dp.sim.kv_events import binds, describe, local_endpoint
from sglang_dp.sim.radix_cache import RadixCache

GOLDEN = -3488128144981237669  # tokens [1, 2, 3, 4], block size 4, no parent (sgl-router hash.rs)


def sha_id(tokens: list[int], prior: bytes | None = None) -> tuple[int, bytes]:
    """The reference's hash, written out independently of kv_wire."""
    digest = hashlib.sha256((prior or b"") + struct.pack(f"<{len(tokens)}I", *tokens)).digest()
    return struct.unpack(">q", digest[:8])[0], digest


def raw(cache: RadixCache) -> list[object]:
    """The cache's events as one published batch, decoded as plain msgpack (no schema)."""
    payload = encode_batch(EventBatch(12.5, cache.take_events(), 0))
    decoded = msgspec.msgpack.decode(payload)
    assert isinstance(decoded, list)
    return decoded


def test_golden_hash_and_literal_layout() -> None:
    cache = RadixCache(page_size=4, events=True)
    cache.insert([1, 2, 3, 4, 5], now=1.0)  # the unaligned tail (5) is not cached
    assert sha_id([1, 2, 3, 4])[0] == GOLDEN
    assert raw(cache) == [
        12.5,
        [["AllBlocksCleared"], ["BlockStored", [GOLDEN], None, [1, 2, 3, 4], 4, None, "GPU"]],
        0,
    ]
    assert cache.size == 4 and cache.block_ids() == {GOLDEN}


def test_chain_crosses_nodes_and_split_sends_nothing() -> None:
    cache = RadixCache(page_size=2, events=True)
    cache.insert([1, 2, 3, 4], now=1.0)
    cache.take_events()
    cache.insert([1, 2, 5, 6], now=2.0)  # splits [1,2 | 3,4]; stores one new page [5, 6]
    first, d1 = sha_id([1, 2])
    second, _ = sha_id([5, 6], d1)
    assert raw(cache)[1] == [["BlockStored", [second], first, [5, 6], 2, None, "GPU"]]
    assert cache.block_ids() == {first, second, sha_id([3, 4], d1)[0]}


def test_eviction_and_flush_events() -> None:
    cache = RadixCache(page_size=2, events=True)
    cache.insert([1, 2, 3, 4], now=1.0)
    cache.insert([7, 8], now=2.0)
    cache.take_events()
    cache.evict(1)  # the oldest leaf: both pages of [1, 2, 3, 4]
    ids = [sha_id([1, 2])[0], sha_id([3, 4], sha_id([1, 2])[1])[0]]
    assert raw(cache)[1] == [["BlockRemoved", ids, "GPU"]]
    cache.reset()
    assert raw(cache)[1] == [["AllBlocksCleared"]]


def test_page_size_one_hashes_every_token_and_events_off_records_nothing() -> None:
    cache = RadixCache(events=True)
    cache.insert([9, 8], now=1.0)
    a, da = sha_id([9])
    assert raw(cache)[1][1:] == [
        ["BlockStored", [a], None, [9], 1, None, "GPU"],
        ["BlockStored", [sha_id([8], da)[0]], a, [8], 1, None, "GPU"],
    ]
    quiet = RadixCache()
    quiet.insert([1, 2, 3], now=1.0)
    assert quiet.take_events() == []


keys = st.lists(st.integers(0, 3), min_size=0, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    page=st.integers(1, 3),
    ops=st.lists(st.tuples(st.sampled_from(["insert", "evict", "reset"]), keys), max_size=25),
    probe=keys,
)
def test_events_replay_to_the_cache_and_matches_are_whole_pages(
    page: int, ops: list[tuple[str, list[int]]], probe: list[int]
) -> None:
    cache = RadixCache(page_size=page, events=True)
    blocks: set[int] = set()
    inserted: list[list[int]] = []
    for t, (op, key) in enumerate(ops):
        if op == "insert":
            cache.insert(key, now=float(t))
            inserted.append(key[: len(key) - len(key) % page])
        elif op == "evict":
            cache.evict(len(key))
        else:
            cache.reset()
        for event in msgspec.msgpack.decode(encode_batch(EventBatch(0.0, cache.take_events())))[1]:
            if event[0] == "BlockStored":
                blocks.update(event[1])
            elif event[0] == "BlockRemoved":
                assert set(event[1]) <= blocks
                blocks.difference_update(event[1])
            else:
                blocks.clear()
        assert blocks == cache.block_ids()
    matched, _ = cache.match_prefix(probe)
    assert matched % page == 0
    paths = cache.paths()
    best = max((_common(p, probe) for p in paths), default=0)
    assert matched == best - best % page


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_config_defaults_and_errors() -> None:
    default = KvEventsConfig.parse("{}")
    assert default == KvEventsConfig() and not default.enabled
    assert (default.endpoint, default.buffer_steps, default.hwm) == ("tcp://*:5557", 10000, 100000)
    zmq = KvEventsConfig.parse('{"publisher": "zmq", "topic": "kv", "extra": 1}')
    assert zmq.enabled and zmq.topic == "kv"
    for bad, why in [
        ("not json", "not JSON"),
        ("[]", "JSON object"),
        ('{"publisher": "kafka"}', "unknown publisher"),
        ('{"buffer_steps": 0}', "bad buffer_steps"),
        ('{"endpoint": 5}', "bad endpoint"),
    ]:
        with pytest.raises(ValueError, match=why):
            KvEventsConfig.parse(bad)


def test_endpoints_and_server_info_block() -> None:
    assert binds("tcp://*:5557") and binds("ipc:///tmp/x") and not binds("tcp://10.0.0.1:5557")
    assert local_endpoint("tcp://*:5557", "127.0.0.1") == "tcp://127.0.0.1:5557"
    config = KvEventsConfig.parse('{"publisher": "zmq", "endpoint": "tcp://*:6000"}')
    assert describe(config, 16) == {
        "publisher": "zmq",
        "endpoint_host": "*",
        "endpoint_port_base": 6000,
        "topic": "",
        "block_size": 16,
        "dp_size": 1,
    }
    assert describe(KvEventsConfig(), 16) is None
    assert describe(KvEventsConfig(publisher="zmq", endpoint="ipc:///tmp/x"), 16) is None
