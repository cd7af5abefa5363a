"""The engine's exact cache view: KV events where a worker's stream is whole, the tree elsewhere."""

from __future__ import annotations

from array import array

from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.kv_wire import AllBlocksCleared, BlockRemoved, BlockStored, chain_ids
from sglang_dp.router.engine import EVENTS, TREE, EngineConfig, Outcome, RoutingEngine
from sglang_dp.router.kv_events import Batch
from sglang_dp.router.kv_index import KvIndex
from sglang_dp.router.policies import PolicyConfig

PAGE = 4
PREFIX = list(range(100, 132))  # 8 pages


def tokens(*parts: list[int]) -> array[int]:
    return array("I", [t for part in parts for t in part])


def engine_with_events(workers: int, policy: str = "cache_aware") -> tuple[RoutingEngine, KvIndex]:
    engine = RoutingEngine(
        EngineConfig(policy=PolicyConfig(policy=policy, seed=0), token_keys=True)
    )
    index = KvIndex(block_size=PAGE)
    engine.use_events(index)
    for i in range(workers):
        engine.add_worker(f"w{i}")
        index.apply(f"w{i}", Batch(0, 0.0, [AllBlocksCleared()]), 0.0)  # a whole, empty picture
    return engine, index


def store(index: KvIndex, worker: str, seq: int, ids: list[int]) -> None:
    whole = len(ids) // PAGE * PAGE
    event = BlockStored(chain_ids(ids[:whole], PAGE), None, ids[:whole], PAGE)
    index.apply(worker, Batch(seq, 0.0, [event]), 0.0)


def test_events_overrule_a_stale_tree() -> None:
    engine, index = engine_with_events(2)
    first = engine.route(tokens(PREFIX, [1, 2, 3]), now=1.0)
    held, other = first.worker, "w1" if first.worker == "w0" else "w0"
    store(index, held, 1, PREFIX)
    engine.observe(first, Outcome(35, 0), now=2.0)
    # the tree believes `held` holds the prefix; its events say it evicted it, `other` stored it
    removed = BlockRemoved(chain_ids(PREFIX, PAGE))
    index.apply(held, Batch(2, 0.0, [removed]), 2.0)
    store(index, other, 1, PREFIX)
    second = engine.route(tokens(PREFIX, [7, 8, 9]), now=10.0)
    assert second.worker == other
    assert second.decision.reason == "cache_hit"
    assert second.decision.matched == len(PREFIX)
    assert engine.tree.walk(tokens(PREFIX)).matched.get(held) == len(PREFIX)  # the tree kept


def test_matches_are_whole_pages_as_sglang_caches_them() -> None:
    engine, index = engine_with_events(1)
    store(index, "w0", 1, [*PREFIX, 1, 2])  # 8 whole pages; the last 2 tokens are no page
    explained = engine.explain(tokens(PREFIX, [1, 2, 3, 4]), now=0.0)
    assert explained.matches == {"w0": len(PREFIX)}
    assert explained.views == {"w0": EVENTS}


def test_a_worker_whose_stream_broke_is_matched_on_the_tree() -> None:
    engine, index = engine_with_events(2)
    first = engine.route(tokens(PREFIX, [1]), now=1.0)
    engine.observe(first, Outcome(33, 0), now=1.5)
    index.apply(first.worker, Batch(5, 0.0, []), 2.0)  # seq 1..4 missing
    index.replay_done(first.worker, 2.0)  # and not replayed: lost
    assert not index.trusted(first.worker)
    other = "w1" if first.worker == "w0" else "w0"
    explained = engine.explain(tokens(PREFIX, [2]), now=10.0)
    assert explained.views == {first.worker: TREE, other: EVENTS}
    assert explained.matches[first.worker] == len(PREFIX)  # what the tree holds
    stats = {w.url: w.cache_view for w in engine.snapshot(10.0).workers}
    assert stats == {first.worker: TREE, other: EVENTS}


def test_routed_pages_count_before_their_events_come() -> None:
    engine, _ = engine_with_events(4)
    first = engine.route(tokens(PREFIX, [1]), now=1.0)
    second = engine.route(tokens(PREFIX, [2]), now=1.1)  # no event yet: speculation holds it
    assert second.worker == first.worker and second.decision.matched == len(PREFIX)
    assert second.decision.matched % PAGE == 0  # whole pages, as the worker will cache them
    speculated = {w.url: w.speculated for w in engine.snapshot(1.1).workers}
    assert speculated[first.worker] == 1 and sum(speculated.values()) == 1
    later = engine.explain(tokens(PREFIX, [3]), now=100.0)  # speculation expired, no event
    assert later.matches[first.worker] == 0


def test_character_keys_never_use_events() -> None:
    engine = RoutingEngine(EngineConfig(policy=PolicyConfig(policy="cache_aware", seed=0)))
    index = KvIndex(block_size=PAGE)
    engine.use_events(index)
    engine.add_worker("w0")
    index.apply("w0", Batch(0, 0.0, [AllBlocksCleared()]), 0.0)
    dispatch = engine.route("some text prompt", now=1.0)
    assert engine.explain("some text prompt", now=2.0).views == {"w0": TREE}
    assert dispatch.worker == "w0"


@given(
    held=st.lists(st.integers(0, 8), min_size=3, max_size=3),
    trusted=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_each_worker_is_matched_on_exactly_one_view(held: list[int], trusted: list[bool]) -> None:
    """Against a brute force: trusted workers match their stored whole pages, others the tree."""
    engine, index = engine_with_events(3)
    for i, pages in enumerate(held):
        store(index, f"w{i}", 1, PREFIX[: pages * PAGE])
        if not trusted[i]:
            index.apply(f"w{i}", Batch(9, 0.0, []), 0.0)
            index.replay_done(f"w{i}", 0.0)
    explained = engine.explain(tokens(PREFIX, [1]), now=0.0)
    for i, pages in enumerate(held):
        worker = f"w{i}"
        expected = (pages * PAGE, EVENTS) if trusted[i] else (0, TREE)  # the tree is empty
        assert (explained.matches[worker], explained.views[worker]) == expected


def test_a_prefix_waiting_for_its_prefill_stays_held_past_the_ttl() -> None:
    """SGLang publishes a prompt's pages once computed: behind a long queue, after the TTL."""
    engine, _ = engine_with_events(2)
    first = engine.route(tokens(PREFIX, [1]), now=1.0, streamed=True)
    waiting = engine.explain(tokens(PREFIX, [2]), now=30.0)
    assert waiting.matches[first.worker] == len(PREFIX)
    engine.first_token(first, now=31.0)  # computed: its events are due within the TTL
    assert engine.explain(tokens(PREFIX, [2]), now=40.0).matches[first.worker] == 0
