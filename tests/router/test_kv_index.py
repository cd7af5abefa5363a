"""KV events decoding and the exact block index: unit cases and properties against brute force.

The event streams come from the simulator's radix cache (real inserts, evictions and resets with
SGLang's event rules), travel as msgpack bytes, and are decoded as the router decodes them.
"""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.kv_wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    chain_ids,
    encode_batch,
    seq_bytes,
)
from sglang_dp.router.kv_events import Batch, Rejected, decode_message, decode_payload
from sglang_dp.router.kv_index import KvIndex
from sglang_dp.sim.radix_cache import RadixCache

GOLDEN = -3488128144981237669


def payload(*events: object, rank: int | None = 0) -> bytes:
    return msgspec.msgpack.encode([1.0, list(events), rank])


def ok(result: Batch | Rejected) -> Batch:
    assert isinstance(result, Batch), result
    return result


# ---------------------------------------------------------------- decoding


def test_decodes_newest_and_older_layouts() -> None:
    newest = payload(["BlockStored", [GOLDEN], None, [1, 2, 3, 4], 4, None, "GPU"])
    older = msgspec.msgpack.encode([2.0, [["BlockStored", [GOLDEN], None, [1, 2, 3, 4], 4, None]]])
    extra = payload(["BlockRemoved", [GOLDEN], "GPU", "future field"], ["AllBlocksCleared"])
    for raw, medium in ((newest, "GPU"), (older, None)):
        batch = ok(decode_payload(7, raw, 4))
        assert batch.seq == 7
        assert batch.events[0] == BlockStored([GOLDEN], None, [1, 2, 3, 4], 4, None, medium)
    batch = ok(decode_message([b"kv", seq_bytes(3), extra], b"kv", 4))
    assert batch.events == [BlockRemoved([GOLDEN], "GPU"), AllBlocksCleared()]
    assert batch.dp_rank == 0


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"kv", seq_bytes(1)], "expected 3 frames"),
        ([b"kv", b"\x01", payload()], "seq frame of 1 bytes"),
        ([b"other", seq_bytes(1), payload()], "topic b'other'"),
        ([b"kv", seq_bytes(1), b"\xc1garbage"], "undecodable"),
        ([b"kv", seq_bytes(1), payload(["BlockMoved", [1]])], "undecodable"),
        (
            [b"kv", seq_bytes(1), payload(["BlockStored", [1], None, [1, 2], 2, None])],
            "block size 2",
        ),
        (
            [b"kv", seq_bytes(1), payload(["BlockStored", [1, 2], None, [1, 2, 3, 4], 4])],
            "2 hashes",
        ),
        ([b"kv", seq_bytes(1), payload(["BlockRemoved", [1 << 63]])], "undecodable"),
        ([b"kv", seq_bytes(1), payload(["BlockStored", [1], None, [-1] * 4, 4])], "undecodable"),
        ([b"kv", seq_bytes(1), msgspec.msgpack.encode({"ts": 1})], "undecodable"),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(frames: list[bytes], reason: str) -> None:
    result = decode_message(frames, b"kv", 4)
    assert isinstance(result, Rejected) and reason in result.reason
    if len(frames) == 3 and len(frames[1]) == 8:
        assert result.seq == 1


def test_oversized_payload_is_rejected_before_decoding() -> None:
    result = decode_payload(5, b"\x00" * 101, 4, max_bytes=100)
    assert result == Rejected("payload of 101 bytes exceeds 100", 5)


# ---------------------------------------------------------------- index: unit cases


def batch(seq: int, *events: BlockStored | BlockRemoved | AllBlocksCleared) -> Batch:
    return Batch(seq, 0.0, list(events))


def test_match_counts_leading_whole_pages_per_worker() -> None:
    index = KvIndex(block_size=2)
    a, b = chain_ids([1, 2, 3, 4, 5, 6], 2), chain_ids([1, 2, 9, 9], 2)
    index.apply("w0", batch(0, BlockStored(a, None, [1, 2, 3, 4, 5, 6], 2)), 0.0)
    index.apply("w1", batch(0, BlockStored(b, None, [1, 2, 9, 9], 2)), 0.0)
    assert index.match([1, 2, 3, 4, 5, 6, 7]) == {"w0": 6, "w1": 2}
    assert index.match([1, 2, 9, 9, 9]) == {"w0": 2, "w1": 4}
    assert index.match([1]) == {"w0": 0, "w1": 0}
    assert index.matched_tokens("w1", [7, 7]) == 0
    assert index.size() == 4  # [1,2] is shared
    assert index.trusted("w0") and index.status("w0").blocks == 3


def test_removal_clear_and_restart() -> None:
    index = KvIndex(block_size=2)
    ids = chain_ids([1, 2, 3, 4], 2)
    index.apply("w", batch(0, BlockStored(ids, None, [1, 2, 3, 4], 2)), 0.0)
    index.apply("w", batch(1, BlockRemoved([ids[1]])), 0.0)
    assert index.matched_tokens("w", [1, 2, 3, 4]) == 2
    index.apply("w", batch(2, AllBlocksCleared()), 0.0)
    assert index.matched_tokens("w", [1, 2, 3, 4]) == 0 and index.size() == 0
    index.apply("w", batch(3, BlockStored(ids[:1], None, [1, 2], 2)), 0.0)
    # the publisher restarts: seq back to 0, the old picture goes
    index.apply("w", batch(0, AllBlocksCleared()), 1.0)
    assert index.blocks("w") == set() and index.status("w").restarts == 1
    assert index.trusted("w")


def test_gap_is_replayed_then_trusted_again() -> None:
    index = KvIndex(block_size=2)
    ids = chain_ids([1, 2, 3, 4], 2)
    b0 = batch(0, BlockStored(ids[:1], None, [1, 2], 2))
    b1 = batch(1, BlockStored(ids[1:], ids[0], [3, 4], 2))
    b2 = batch(2, BlockRemoved(ids[1:]))
    assert index.apply("w", b0, 0.0) is None
    assert index.apply("w", b2, 0.0) == 1  # seq 1 missing: replay from 1
    assert not index.trusted("w") and "waiting for replay" in index.status("w").reason
    assert index.apply("w", batch(3), 0.0) is None  # a replay is already under way
    for replayed in (b0, b1, b2):
        assert index.apply("w", replayed, 0.0, replayed=True) is None
    index.replay_done("w", 0.0)
    status = index.status("w")
    assert index.trusted("w") and status.last_seq == 3 and status.gaps_filled == 1
    assert index.blocks("w") == {ids[0]}


def test_live_batches_already_replayed_are_not_a_restart() -> None:
    index = KvIndex(block_size=2)
    index.apply("w", batch(0), 0.0)
    assert index.apply("w", batch(2), 0.0) == 1
    for seq in (1, 2, 3, 4):  # the replay brings what is still to come live, too
        index.apply("w", batch(seq), 0.0, replayed=True)
    index.replay_done("w", 0.0)
    index.apply("w", batch(3), 0.0)
    index.apply("w", batch(4), 0.0)
    index.apply("w", batch(5), 0.0)
    status = index.status("w")
    assert status.restarts == 0 and status.last_seq == 5 and index.trusted("w")


def test_lost_gap_and_joining_late_until_a_clear() -> None:
    index = KvIndex(block_size=2)
    assert index.apply("w", batch(5, AllBlocksCleared()), 0.0) == 0  # joined late: replay from 0
    index.replay_done("w", 0.0)  # the buffer had nothing older
    status = index.status("w")
    # seq 5 itself was a clear: applied after the loss, so the picture is whole again
    assert status.gaps_lost == 1 and index.trusted("w")
    assert index.apply("w", batch(7, BlockStored(chain_ids([1, 2], 2), None, [1, 2], 2)), 0.0) == 6
    index.replay_done("w", 0.0)
    assert not index.trusted("w") and "events 6..6 lost" in index.status("w").reason
    index.apply("w", batch(8, AllBlocksCleared()), 0.0)
    assert index.trusted("w")


def test_inconsistent_streams_and_bad_messages_distrust_the_worker() -> None:
    index = KvIndex(block_size=2, max_blocks=3)
    index.apply("w", batch(0, BlockRemoved([42])), 0.0)
    assert "removal of block 42, never stored" in index.status("w").reason
    index.apply("v", batch(0, BlockStored([7], 99, [1, 2], 2)), 0.0)
    assert "block 99 used as a parent was never stored" in index.status("v").reason
    index.apply(
        "u", batch(0, BlockStored(chain_ids(list(range(8)), 2), None, list(range(8)), 2)), 0
    )
    assert "more than 3 blocks" in index.status("u").reason and index.blocks("u") == set()
    index.reject("t", Rejected("undecodable batch: nope", 0), 0.0)
    index.apply("t", batch(1, AllBlocksCleared()), 0.0)  # seq 0 was consumed by the rejection
    assert index.trusted("t") and index.status("t").rejected == 1


def test_foreign_namespaced_blocks_are_never_matched() -> None:
    index = KvIndex(block_size=2)
    salted = [123456789, 987654321]  # a re-seeded chain: not SGLang's default one for these tokens
    index.apply("w", batch(0, BlockStored(salted, None, [1, 2, 3, 4], 2)), 0.0)
    index.apply("w", batch(1, BlockStored([5], None, [1, 2], 2, lora_id=3)), 0.0)
    assert index.matched_tokens("w", [1, 2, 3, 4]) == 0
    assert index.status("w").foreign_blocks == 3 and index.trusted("w")
    index.apply("w", batch(2, BlockRemoved(salted)), 0.0)
    assert index.status("w").foreign_blocks == 1 and index.trusted("w")


# ---------------------------------------------------------------- properties against brute force


def cache_stream(
    page: int, ops: list[tuple[str, list[int]]], rng: random.Random
) -> tuple[RadixCache, list[bytes]]:
    """Run `ops` on a real simulated cache with events on; one msgpack batch per op."""
    cache = RadixCache(page_size=page, events=True)
    payloads = []
    for t, (op, key) in enumerate(ops):
        if op == "insert":
            cache.insert(key, now=float(t))
        elif op == "evict":
            cache.evict(rng.randint(1, 8))
        else:
            cache.reset()
        payloads.append(encode_batch(EventBatch(float(t), cache.take_events(), 0)))
    return cache, payloads


def brute_match(cache: RadixCache, probe: list[int]) -> int:
    best = 0
    for path in cache.paths():
        n = 0
        while n < min(len(path), len(probe)) and path[n] == probe[n]:
            n += 1
        best = max(best, n)
    return best - best % cache.page_size


token_lists = st.lists(st.integers(0, 3), max_size=14)
op_lists = st.lists(
    st.tuples(st.sampled_from(["insert", "insert", "evict", "reset"]), token_lists),
    min_size=1,
    max_size=20,
)


@settings(max_examples=120, deadline=None)
@given(
    page=st.integers(1, 3),
    streams=st.lists(op_lists, min_size=1, max_size=3),
    probes=st.lists(token_lists, max_size=5),
    seed=st.integers(0, 1000),
)
def test_index_equals_every_workers_real_cache(
    page: int, streams: list[list[tuple[str, list[int]]]], probes: list[list[int]], seed: int
) -> None:
    rng = random.Random(seed)
    index = KvIndex(block_size=page)
    caches = {}
    for n, ops in enumerate(streams):
        worker = f"w{n}"
        caches[worker], payloads = cache_stream(page, ops, rng)
        for seq, raw in enumerate(payloads):
            assert index.apply(worker, ok(decode_payload(seq, raw, page)), float(seq)) is None
    for worker, cache in caches.items():
        assert index.blocks(worker) == cache.block_ids()
        assert index.trusted(worker), index.status(worker).reason
    for probe in [*probes, *(p for c in caches.values() for p in c.paths())]:
        assert index.match(probe) == {w: brute_match(c, probe) for w, c in caches.items()}


@settings(max_examples=80, deadline=None)
@given(
    page=st.integers(1, 2),
    ops=op_lists,
    drop=st.lists(st.booleans(), min_size=20, max_size=20),
    buffer=st.integers(1, 25),
    seed=st.integers(0, 1000),
)
def test_dropped_batches_are_replayed_or_the_worker_is_untrusted(
    page: int, ops: list[tuple[str, list[int]]], drop: list[bool], buffer: int, seed: int
) -> None:
    """Live batches dropped at random; the replay buffer keeps the last `buffer` of them."""
    cache, payloads = cache_stream(page, ops, random.Random(seed))
    index = KvIndex(block_size=page)
    lost = False
    for seq, raw in enumerate(payloads):
        if drop[seq] and seq != len(payloads) - 1:
            continue  # never sent (the last is sent, so every gap shows)
        start = index.apply("w", ok(decode_payload(seq, raw, page)), 0.0)
        if start is not None:
            kept = range(max(0, seq + 1 - buffer), seq + 1)
            lost |= start < kept[0]
            for old in kept:
                if old >= start:
                    index.apply("w", ok(decode_payload(old, payloads[old], page)), 0.0, True)
            index.replay_done("w", 0.0)
    status = index.status("w")
    assert status.last_seq == len(payloads) - 1
    if not lost:
        assert index.trusted("w") and index.blocks("w") == cache.block_ids()
    elif index.trusted("w"):  # trust came back through a clear: exact again
        assert index.blocks("w") == cache.block_ids()
