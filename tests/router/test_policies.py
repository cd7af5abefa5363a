"""Policies: sgl-router's cache_aware semantics, the proposal's two strategies, baselines."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.router.policies import POLICY_NAMES, Candidates, PolicyConfig, make_policy

W = ["w0", "w1", "w2", "w3"]


def choose(policy: str, loads: list[int], matched: dict[str, int], key_length: int = 100, **kw):
    config = PolicyConfig(policy=policy, seed=7, **kw)
    return make_policy(config).choose(Candidates(W, loads, matched, key_length))


def test_cache_aware_takes_best_match_above_threshold() -> None:
    choice = choose("cache_aware", [5, 0, 0, 0], {"w0": 90, "w2": 40})
    assert (choice.worker, choice.reason) == ("w0", "cache_hit")


def test_cache_aware_threshold_is_strict() -> None:
    choice = choose("cache_aware", [5, 0, 5, 5], {"w0": 30}, key_length=100)
    assert (choice.worker, choice.reason) == ("w1", "below_threshold")


def test_cache_aware_below_threshold_goes_to_least_loaded_not_smallest_tree() -> None:
    choice = choose("cache_aware", [3, 2, 9, 1], {"w0": 10})
    assert (choice.worker, choice.reason) == ("w3", "below_threshold")


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
    picks = Counter(chooser.choose(Candidates(W, [0, 0, 0, 0], {}, 10)).worker for _ in range(200))
    assert set(picks) == set(W)


def test_round_robin_cycles() -> None:
    chooser = make_policy(PolicyConfig(policy="round_robin"))
    picks = [chooser.choose(Candidates(W, [9, 0, 0, 0], {}, 1)).worker for _ in range(8)]
    assert picks == W + W


def test_power_of_two_takes_the_less_loaded_of_two() -> None:
    chooser = make_policy(PolicyConfig(policy="power_of_two", seed=3))
    picks = {chooser.choose(Candidates(["a", "b"], [7, 1], {}, 1)).worker for _ in range(50)}
    assert picks == {"b"}


def test_random_is_reproducible_for_a_seed() -> None:
    def run() -> list[str]:
        chooser = make_policy(PolicyConfig(policy="random", seed=11))
        return [chooser.choose(Candidates(W, [0] * 4, {}, 1)).worker for _ in range(20)]

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
    ).map(lambda t: Candidates([f"w{i}" for i in range(n)], t[0], t[1], 100))
)


@given(c=candidates, policy=st.sampled_from(POLICY_NAMES))
def test_every_policy_picks_a_candidate(c: Candidates, policy: str) -> None:
    assert make_policy(PolicyConfig(policy=policy, seed=0)).choose(c).worker in c.workers


@given(c=candidates)
def test_shortest_queue_takes_a_minimum(c: Candidates) -> None:
    choice = make_policy(PolicyConfig(policy="shortest_queue", seed=0)).choose(c)
    assert c.loads[list(c.workers).index(choice.worker)] == min(c.loads)


@given(c=candidates)
def test_cache_aware_hit_takes_a_longest_match(c: Candidates) -> None:
    choice = make_policy(PolicyConfig(seed=0)).choose(c)
    if choice.reason == "cache_hit":
        assert c.matched[choice.worker] == max(c.matched.values())
    else:
        assert c.loads[list(c.workers).index(choice.worker)] == min(c.loads)
