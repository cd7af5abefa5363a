"""Policies: sgl-router's cache_aware semantics, the proposal's two strategies, baselines."""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.router.policies import POLICY_NAMES, PolicyConfig, make_policy


class Candidates(NamedTuple):
    loads: dict[str, int]
    matched: dict[str, int]
    key_length: int


class Picked(NamedTuple):
    worker: str
    reason: str


def pick(policy: str, c: Candidates, **kw: object) -> Picked:
    return Picked(*make_policy(PolicyConfig(policy=policy, **kw)).choose(*c))


W = ["w0", "w1", "w2", "w3"]


def choose(policy: str, loads: list[int], matched: dict[str, int], key_length: int = 100, **kw):
    return pick(policy, Candidates(dict(zip(W, loads)), matched, key_length), seed=7, **kw)


def test_cache_aware_takes_best_match_above_threshold() -> None:
    choice = choose("cache_aware", [5, 0, 0, 0], {"w0": 90, "w2": 40})
    assert (choice.worker, choice.reason) == ("w0", "cache_hit")


def test_cache_aware_threshold_is_strict() -> None:
    choice = choose("cache_aware", [5, 0, 5, 5], {"w0": 30}, key_length=100)
    assert (choice.worker, choice.reason) == ("w1", "below_threshold")


def test_cache_aware_below_threshold_goes_to_least_loaded_not_smallest_tree() -> None:
    choice = choose("cache_aware", [3, 2, 9, 1], {"w0": 10})
    assert (choice.worker, choice.reason) == ("w3", "below_threshold")


def test_cache_aware_miss_goes_to_the_least_pending_prefill_then_least_loaded() -> None:
    cache_aware = make_policy(PolicyConfig(policy="cache_aware", seed=7))
    loads = dict(zip(W, [1, 9, 9, 3]))
    pending = dict(zip(W, [4000, 200, 200, 4000]))
    worker, reason = cache_aware.choose(loads, {"w0": 10}, 100, pending)
    assert worker in ("w1", "w2") and reason == "below_threshold"  # tied on pending and load
    assert {cache_aware.choose(loads, {}, 100, pending)[0] for _ in range(40)} == {"w1", "w2"}
    pending["w2"] = 0
    assert cache_aware.choose(loads, {}, 100, pending)[0] == "w2"
    # hits and the imbalance guard do not look at pending prefill
    assert cache_aware.choose(loads, {"w0": 90}, 100, pending)[0] == "w0"
    heavy = dict(zip(W, [300, 10, 150, 150]))
    assert cache_aware.choose(heavy, {"w0": 90}, 100, {"w1": 10**6}) == ("w1", "imbalanced")


def test_cache_aware_imbalanced_keeps_a_prefix_on_a_worker_that_is_not_overloaded() -> None:
    # imbalanced (300 - 10 > 64, 300 > 15): w0 is overloaded; w2 holds the prefix too and is
    # within 32 of the least loaded, so the prefix is not recomputed on w1
    choice = choose("cache_aware", [300, 10, 40, 150], {"w0": 100, "w2": 80, "w3": 90})
    assert choice == ("w2", "imbalanced_hit")
    # w2 at 43 is past least + 32: nobody near holds enough of it, the least loaded takes it
    choice = choose("cache_aware", [300, 10, 43, 150], {"w0": 100, "w2": 80, "w3": 90})
    assert choice == ("w1", "imbalanced")
    # a match at or under the threshold is no reason to leave the least loaded worker
    choice = choose("cache_aware", [300, 10, 40, 150], {"w0": 100, "w2": 30})
    assert choice == ("w1", "imbalanced")


def test_cache_aware_imbalance_needs_both_thresholds() -> None:
    # gap 70 > 64 and 100 > 30 * 1.5: imbalanced, least loaded wins over a perfect match
    choice = choose("cache_aware", [100, 30, 40, 50], {"w0": 100})
    assert (choice.worker, choice.reason) == ("w1", "imbalanced")
    # gap 65 > 64 but 205 < 140 * 1.5: not imbalanced, the match wins
    choice = choose("cache_aware", [205, 140, 150, 160], {"w0": 100})
    assert (choice.worker, choice.reason) == ("w0", "cache_hit")


def test_threshold_policy_ignores_imbalance() -> None:
    choice = choose("threshold", [1000, 0, 0, 0], {"w0": 100})
    assert (choice.worker, choice.reason) == ("w0", "cache_hit")
    choice = choose("threshold", [1000, 0, 3, 3], {"w0": 10})
    assert (choice.worker, choice.reason) == ("w1", "below_threshold")


def test_variance_drops_overloaded_workers_then_takes_highest_match() -> None:
    # mean 12.5, pstdev ~21.6: w0 (50) is out of the band, so the best match inside wins
    choice = choose("variance", [50, 0, 0, 0], {"w0": 100, "w2": 20})
    assert (choice.worker, choice.reason) == ("w2", "cache_hit")
    choice = choose("variance", [50, 4, 1, 2], {"w0": 100})
    assert (choice.worker, choice.reason) == ("w2", "no_match")


def test_variance_k_widens_the_band() -> None:
    choice = choose("variance", [50, 0, 0, 0], {"w0": 100}, variance_k=2.0)
    assert choice.worker == "w0"


def test_best_match_ties_go_to_less_loaded() -> None:
    choice = choose("cache_aware", [4, 2, 0, 0], {"w0": 80, "w1": 80})
    assert choice.worker == "w1"


@pytest.mark.parametrize("policy", ["cache_aware", "threshold", "variance", "shortest_queue"])
def test_ties_are_not_always_broken_towards_the_first_worker(policy: str) -> None:
    chooser = make_policy(PolicyConfig(policy=policy, seed=1))
    picks = Counter(chooser.choose(dict.fromkeys(W, 0), {}, 10)[0] for _ in range(200))
    assert set(picks) == set(W)


def test_round_robin_cycles() -> None:
    chooser = make_policy(PolicyConfig(policy="round_robin"))
    picks = [chooser.choose({"w0": 9, "w1": 0, "w2": 0, "w3": 0}, {}, 1)[0] for _ in range(8)]
    assert picks == W + W


def test_power_of_two_takes_the_less_loaded_of_two() -> None:
    chooser = make_policy(PolicyConfig(policy="power_of_two", seed=3))
    picks = {chooser.choose({"a": 7, "b": 1}, {}, 1)[0] for _ in range(50)}
    assert picks == {"b"}


def test_random_is_reproducible_for_a_seed() -> None:
    def run() -> list[str]:
        chooser = make_policy(PolicyConfig(policy="random", seed=11))
        return [chooser.choose(dict.fromkeys(W, 0), {}, 1)[0] for _ in range(20)]

    assert run() == run()
    assert len(set(run())) > 1


def test_bad_settings_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        PolicyConfig(policy="fastest")
    with pytest.raises(ValueError, match="cache_threshold"):
        PolicyConfig(cache_threshold=1.5)


candidates = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 200), min_size=n, max_size=n),
        st.dictionaries(st.sampled_from([f"w{i}" for i in range(n)]), st.integers(1, 100)),
    ).map(lambda t: Candidates({f"w{i}": load for i, load in enumerate(t[0])}, t[1], 100))
)


@given(c=candidates, policy=st.sampled_from(POLICY_NAMES))
def test_every_policy_picks_a_candidate(c: Candidates, policy: str) -> None:
    assert pick(policy, c, seed=0).worker in c.loads


@given(c=candidates)
def test_shortest_queue_takes_a_minimum(c: Candidates) -> None:
    choice = pick("shortest_queue", c, seed=0)
    assert c.loads[choice.worker] == min(c.loads.values())


@given(c=candidates, pending=st.lists(st.integers(0, 5000), min_size=6, max_size=6))
def test_cache_aware_takes_a_longest_match_or_a_least_pending_worker(
    c: Candidates, pending: list[int]
) -> None:
    queued = {f"w{i}": p for i, p in enumerate(pending)}
    worker, reason = make_policy(PolicyConfig(policy="cache_aware", seed=0)).choose(*c, queued)
    low = min(c.loads.values())
    near = [w for w in c.loads if c.loads[w] <= low + 32]  # half the default abs threshold
    if reason == "cache_hit":
        assert c.matched[worker] == max(c.matched.values())
    elif reason == "imbalanced_hit":
        assert worker in near and c.matched[worker] > 30
        assert c.matched[worker] == max(c.matched.get(w, 0) for w in near)
    elif reason == "imbalanced":
        assert c.loads[worker] == low
        assert all(c.matched.get(w, 0) <= 30 for w in near)
    else:  # brute force: the lowest (pending, load) pair
        assert (queued[worker], c.loads[worker]) == min((queued[w], c.loads[w]) for w in c.loads)
