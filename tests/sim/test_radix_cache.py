"""Radix cache: matching, splitting, locking, LRU eviction; properties against brute force."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.sim.radix_cache import RadixCache


def test_match_insert_and_split() -> None:
    cache = RadixCache()
    assert cache.insert([1, 2, 3, 4], now=1.0)[0] == 4
    assert cache.insert([1, 2, 5], now=2.0)[0] == 1  # splits the edge after [1, 2]
    assert cache.match_prefix([1, 2, 3, 9])[0] == 3
    assert cache.match_prefix([1, 2])[0] == 2
    assert cache.match_prefix([7])[0] == 0
    assert cache.size == 5
    assert cache.paths() == [[1, 2, 3, 4], [1, 2, 5]]


def test_lru_evicts_least_recently_used_leaf_first() -> None:
    cache = RadixCache()
    cache.insert([1, 1, 1], now=1.0)
    cache.insert([2, 2, 2], now=2.0)
    cache.insert([3, 3, 3], now=3.0)
    cache.match_prefix([1, 1, 1], now=4.0)  # touching makes [1,1,1] the most recent
    assert cache.evict(3) == 3
    assert cache.paths() == [[1, 1, 1], [3, 3, 3]]
    assert cache.evict(3) == 3
    assert cache.paths() == [[1, 1, 1]]


def test_locked_path_is_never_evicted() -> None:
    cache = RadixCache()
    _, node = cache.insert([1, 2, 3], now=1.0)
    cache.insert([1, 2, 4, 5], now=2.0)
    cache.lock(node)
    assert cache.protected_size == 3
    assert cache.evictable_size == 2
    assert cache.evict(100) == 2
    assert cache.paths() == [[1, 2, 3]]
    cache.unlock(node)
    assert cache.evict(100) == 3
    assert cache.size == 0


def test_parent_becomes_evictable_after_its_children() -> None:
    cache = RadixCache()
    cache.insert([1, 2, 3], now=1.0)
    cache.insert([1, 2, 4], now=1.0)
    assert cache.evict(3) == 4  # both leaves (1 token each) and then their parent [1, 2]
    assert cache.size == 0


def test_disabled_cache_stores_nothing() -> None:
    cache = RadixCache(enabled=False)
    cache.insert([1, 2, 3], now=1.0)
    assert cache.match_prefix([1, 2, 3])[0] == 0
    assert cache.size == 0


seqs = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), max_size=12)


@settings(max_examples=150, deadline=None)
@given(seqs, st.lists(st.integers(0, 3), max_size=12))
def test_match_and_size_agree_with_brute_force(inserted: list[list[int]], probe: list[int]) -> None:
    cache = RadixCache()
    for i, seq in enumerate(inserted):
        cache.insert(seq, now=float(i))
    best = max((_common(seq, probe) for seq in inserted), default=0)
    assert cache.match_prefix(probe)[0] == best
    prefixes = {tuple(seq[:k]) for seq in inserted for k in range(1, len(seq) + 1)}
    assert cache.size == len(prefixes)
    assert cache.evictable_size == cache.size


@settings(max_examples=100, deadline=None)
@given(seqs, st.integers(0, 40), st.data())
def test_eviction_keeps_locked_tokens_and_counts(
    inserted: list[list[int]], amount: int, data: st.DataObject
) -> None:
    cache = RadixCache()
    nodes = [cache.insert(seq, now=float(i))[1] for i, seq in enumerate(inserted)]
    locked = [i for i in range(len(nodes)) if data.draw(st.booleans())]
    for i in locked:
        cache.lock(nodes[i])
    before = cache.size
    freed = cache.evict(amount)
    assert cache.size == before - freed
    assert freed >= min(amount, before - cache.protected_size) or cache.evictable_size == 0
    for i in locked:
        assert cache.match_prefix(inserted[i])[0] == len(inserted[i])
    for i in locked:
        cache.unlock(nodes[i])
    assert cache.evictable_size == cache.size


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
