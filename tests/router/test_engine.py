"""The routing engine: speculation, in-flight accounting, correction from cached_tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.router.engine import (
    EngineConfig,
    NoWorkerAvailable,
    Outcome,
    RoutingEngine,
    whole_numbers,
)
from sglang_dp.router.keys import KIND_CHAT, KIND_IDS, KIND_TEXT
from sglang_dp.router.policies import PolicyConfig

SYSTEM = "You are a helpful assistant. " * 40  # 1,160 characters


def engine_with(n: int, policy: str = "cache_aware", **config: object) -> RoutingEngine:
    engine = RoutingEngine(EngineConfig(policy=PolicyConfig(policy=policy, seed=0), **config))
    for i in range(n):
        engine.add_worker(f"w{i}")
    return engine


def loads(engine: RoutingEngine) -> dict[str, int]:
    return {w.url: w.in_flight for w in engine.snapshot(0).workers}


def test_speculation_sends_a_shared_prefix_to_the_same_worker() -> None:
    engine = engine_with(4)
    first = engine.route(SYSTEM + "question one", now=1)
    second = engine.route(SYSTEM + "question two", now=2)
    assert second.worker == first.worker
    assert second.decision.reason == "cache_hit"
    assert second.decision.matched == len(SYSTEM + "question ")


def test_misses_spread_by_load() -> None:
    engine = engine_with(4)
    workers = {engine.route(f"{i} unrelated prompt", now=i).worker for i in range(4)}
    assert workers == {"w0", "w1", "w2", "w3"}


def pending(engine: RoutingEngine) -> dict[str, int]:
    return {w.url: w.pending for w in engine.snapshot(0).workers}


def test_pending_prefill_counts_the_uncached_part_of_prompts_in_flight() -> None:
    engine = engine_with(2)
    first = engine.route(SYSTEM + "one", now=1)
    second = engine.route(SYSTEM + "two", now=2)  # speculated: only "two" is new
    assert second.worker == first.worker
    assert pending(engine)[first.worker] == len(SYSTEM + "one") + len("two")
    engine.release(first)
    engine.release(first)
    assert pending(engine)[first.worker] == len("two")
    engine.fail(second, "timeout")
    assert pending(engine) == {"w0": 0, "w1": 0}


def test_a_burst_of_prefix_groups_spreads_evenly() -> None:
    # 16 groups x 8 requests arrive at once, groups interleaved as a shuffled benchmark sends them
    engine = engine_with(4)
    order = [(i * 7 + j * 3) % 16 for j in range(8) for i in range(16)]
    groups: dict[str, set[int]] = {}
    for n, group in enumerate(order):
        system = f"group {group}: " + SYSTEM
        dispatch = engine.route(system + f"question {n}", now=n)
        groups.setdefault(dispatch.worker, set()).add(group)
    assert sorted(len(g) for g in groups.values()) == [4, 4, 4, 4]
    assert sorted(loads(engine).values()) == [32, 32, 32, 32]


def test_a_hot_prefix_spills_to_few_copies_not_everywhere() -> None:
    # one prefix, 200 requests at once on 4 workers: past the imbalance guard the overflow stays
    # on a worker that already took some of it until that one is loaded too
    engine = engine_with(4)
    for n in range(200):
        engine.route(SYSTEM + f"question {n}", now=n)
    reasons = dict(engine.snapshot(0).reasons)
    assert reasons["imbalanced"] <= 3  # a new copy at most once per other worker
    assert reasons["imbalanced_hit"] >= 50  # the overflow follows the copies (70 with seed 0)
    assert all(engine.decisions(reason) == n for reason, n in reasons.items())
    assert engine.decisions("no such reason") == 0
    assert max(loads(engine).values()) - min(loads(engine).values()) <= 65


def test_in_flight_goes_down_exactly_once_whatever_ends_the_request() -> None:
    engine = engine_with(1)
    a, b, c = (engine.route(f"prompt {i}", now=i) for i in range(3))
    assert loads(engine) == {"w0": 3}
    engine.observe(a, Outcome(prompt_tokens=3, cached_tokens=0), now=4)
    engine.release(a)
    engine.fail(b, "connect_error")
    engine.release(b)
    engine.release(c)
    engine.release(c)
    engine.observe(c, Outcome(prompt_tokens=3, cached_tokens=0), now=5)
    assert loads(engine) == {"w0": 0}
    stats = engine.snapshot(6).workers[0]
    assert (stats.routed, stats.errors) == (3, 1)


@settings(max_examples=100, deadline=None)
@given(endings=st.lists(st.lists(st.sampled_from(["observe", "fail", "release"]), max_size=3)))
def test_in_flight_never_leaks(endings: list[list[str]]) -> None:
    engine = engine_with(3)
    dispatches = [engine.route(f"p{i}", now=i) for i in range(len(endings))]
    for dispatch, ends in zip(dispatches, endings):
        for end in ends:
            if end == "observe":
                engine.observe(dispatch, Outcome(prompt_tokens=2, cached_tokens=1), now=99)
            elif end == "fail":
                engine.fail(dispatch, "timeout")
            else:
                engine.release(dispatch)
    expected = sum(1 for ends in endings if not ends)
    assert sum(loads(engine).values()) == expected
    still_in_flight = [d for d, ends in zip(dispatches, endings) if not ends]
    assert sum(pending(engine).values()) == sum(d.uncached for d in still_in_flight)


def test_decide_is_a_dry_run() -> None:
    engine = engine_with(2)
    engine.route(SYSTEM + "a", now=1)
    before = (engine.tree.total_size, loads(engine))
    decision, matches, dry_loads, dry_pending, _, _ = engine.explain(SYSTEM + "b")
    assert decision.reason == "cache_hit"
    assert matches[decision.worker] == len(SYSTEM)
    assert dry_loads == {"w0": 0, "w1": 0} | {decision.worker: 1}
    assert dry_pending == {"w0": 0, "w1": 0} | {decision.worker: len(SYSTEM + "a")}
    assert (engine.tree.total_size, loads(engine)) == before


def test_observe_caches_prompt_and_output_on_the_worker() -> None:
    engine = engine_with(2)
    d = engine.route("user: hi\n", now=1)
    engine.observe(d, Outcome(3, 0, 5, extended_key="user: hi\nassistant: hello\n"), now=2)
    nxt = engine.explain("user: hi\nassistant: hello\nuser: more\n").decision
    assert nxt.worker == d.worker and nxt.matched == len("user: hi\nassistant: hello\n")


def test_prediction_and_reality_are_both_counted() -> None:
    engine = engine_with(1, token_keys=True)
    engine.observe(engine.route(list(range(100)), now=1), Outcome(100, 0), now=2)
    d = engine.route([*range(100), 7, 8], now=3)
    engine.observe(d, Outcome(prompt_tokens=102, cached_tokens=100), now=4)
    stats = engine.snapshot(5).workers[0]
    assert stats.prompt_tokens == 202
    assert stats.predicted_tokens == 100 and stats.cached_tokens == 100
    assert stats.mispredicted == 0


def test_a_request_is_predicted_before_its_answer_teaches_the_rate() -> None:
    """Prediction is judged on what the router knew when it routed: the characters-per-token
    rate learned from a request's own answer must not enter that request's prediction."""
    engine = engine_with(1)
    engine.observe(engine.route("a" * 400, now=1), Outcome(400, 0, kind=KIND_TEXT), now=2)
    before = engine.snapshot(3).workers[0].predicted_tokens  # 1 character a token learned
    d = engine.route("a" * 400 + "b" * 400, now=3)
    assert d.decision.matched == 400
    engine.observe(d, Outcome(prompt_tokens=2000, cached_tokens=399, kind=KIND_TEXT), now=4)
    # at the rate it knew: 400 tokens; after learning 0.4 characters a token it would say 571
    assert engine.snapshot(5).workers[0].predicted_tokens - before == 400


def test_a_confirmed_miss_shrinks_the_workers_share() -> None:
    engine = engine_with(1, token_keys=True)
    for i in range(10):  # ten distinct, finished requests of 100 tokens each
        d = engine.route([i] * 100, now=i)
        engine.observe(d, Outcome(100, 0), now=i + 0.5)
    assert engine.tree.size("w0") == 1000
    d = engine.route([0] * 100, now=20)  # predicted 99 cached, the worker says 0
    engine.observe(d, Outcome(prompt_tokens=100, cached_tokens=0), now=21)
    stats = engine.snapshot(22).workers[0]
    assert stats.corrections == 1 and stats.mispredicted == 1
    assert engine.tree.size("w0") <= 850
    assert engine.tree.match([0] * 100) == {"w0": 100}  # what it just computed is kept
    assert "w0" not in engine.tree.match([1] * 100)  # the least recently used went


def test_an_unconfirmed_miss_changes_only_statistics() -> None:
    engine = engine_with(1, token_keys=True)
    first = engine.route([5] * 100, now=1)
    second = engine.route([5] * 100, now=2)  # same batch: SGLang computes the prefix twice
    engine.observe(first, Outcome(100, 0), now=3)
    engine.observe(second, Outcome(100, 0), now=3)
    stats = engine.snapshot(4).workers[0]
    assert stats.mispredicted == 1 and stats.corrections == 0
    assert engine.tree.size("w0") == 100


def test_known_capacity_bounds_the_share() -> None:
    engine = engine_with(1, token_keys=True)
    engine.set_capacity("w0", 500)
    for i in range(20):
        engine.observe(engine.route([i] * 100, now=i), Outcome(100, 0), now=i)
    assert engine.tree.size("w0") <= 500 * 1.05


def test_global_budget_bounds_the_tree_whatever_the_number_of_workers() -> None:
    engine = engine_with(8, max_tree_size=2000)
    for i in range(100):
        engine.release(engine.route(f"{i:04d}" + "x" * 96, now=i))
    assert engine.tree.total_size <= 2000 * 1.05


def test_reset_worker_forgets_its_share_and_late_results() -> None:
    engine = engine_with(2)
    d = engine.route(SYSTEM, now=1)
    engine.reset_worker(d.worker)
    assert engine.tree.size(d.worker) == 0
    engine.observe(d, Outcome(300, 0), now=2)  # answered by the process before the restart
    assert engine.tree.size(d.worker) == 0
    assert engine.snapshot(3).workers[int(d.worker[1])].resets == 1


def test_unhealthy_workers_leave_routing_and_keep_their_share() -> None:
    engine = engine_with(2)
    d = engine.route(SYSTEM, now=1)
    engine.set_healthy(d.worker, False)
    assert engine.route(SYSTEM, now=2).worker != d.worker
    engine.set_healthy(d.worker, True)
    assert engine.tree.size(d.worker) == len(SYSTEM)


def test_retries_exclude_workers_already_tried() -> None:
    engine = engine_with(2)
    first = engine.route(SYSTEM, now=1)
    engine.fail(first, "connect_error")
    retry = engine.route(SYSTEM, now=2, exclude=[first.worker])
    assert retry.worker != first.worker


def test_no_worker_errors_say_why() -> None:
    with pytest.raises(NoWorkerAvailable, match="no workers are registered"):
        engine_with(0).route("x", now=0)
    engine = engine_with(2)
    engine.set_healthy("w0", False)
    engine.set_healthy("w1", False)
    with pytest.raises(NoWorkerAvailable, match="none of the 2 workers is healthy"):
        engine.route("x", now=0)
    engine.set_healthy("w1", True)
    with pytest.raises(NoWorkerAvailable, match="tried and failed"):
        engine.route("x", now=0, exclude=["w1"])


def test_workers_can_come_and_go_while_requests_are_in_flight() -> None:
    engine = engine_with(1)
    d = engine.route("a prompt", now=1)
    engine.remove_worker("w0")
    engine.add_worker("w0")
    engine.observe(d, Outcome(2, 0), now=2)
    assert loads(engine) == {"w0": 0}
    assert engine.tree.size("w0") == 0


def test_characters_per_token_is_learned_from_responses() -> None:
    engine = engine_with(1)
    for i in range(200):
        d = engine.route(f"{i:08d}" * 10, now=i)  # 80 characters = 20 tokens
        engine.observe(d, Outcome(prompt_tokens=20, cached_tokens=0), now=i)
    assert engine.snapshot(0).elements_per_token == pytest.approx(4.0, rel=0.01)
    for i in range(200):
        d = engine.route(f"{i:08d}" * 10, now=300 + i)  # now 2 characters per token
        engine.observe(d, Outcome(prompt_tokens=40, cached_tokens=39), now=300 + i)
    assert engine.snapshot(0).elements_per_token == pytest.approx(2.0, rel=0.01)


def test_each_kind_of_key_has_its_own_estimate() -> None:
    engine = engine_with(1)
    for i in range(200):  # chat at 3 characters a token, plain text at 6, interleaved
        chat = engine.route(f"c{i:05d}" * 10, now=2 * i)
        engine.observe(chat, Outcome(20, 0, kind=KIND_CHAT), now=2 * i)
        text = engine.route(f"t{i:05d}" * 10, now=2 * i + 1)
        engine.observe(text, Outcome(10, 0, kind=KIND_TEXT), now=2 * i + 1)
    by_kind = dict(engine.snapshot(0).elements_per_token_by_kind)
    assert by_kind["chat"] == pytest.approx(3.0, rel=0.02)
    assert by_kind["text"] == pytest.approx(6.0, rel=0.02)


def test_ids_keys_predict_whole_numbers_exactly() -> None:
    assert whole_numbers("12 345 6", 8) == 3
    assert whole_numbers("12 345 6", 6) == 2
    assert whole_numbers("12 345 6", 5) == 1  # "345" cut short
    assert whole_numbers("12 345 6", 0) == 0
    engine = engine_with(1)
    ids = " ".join(str(100_000 + i) for i in range(50))  # 7 characters a token
    engine.observe(engine.route(ids, now=1), Outcome(50, 0, kind=KIND_IDS), now=2)
    engine.observe(engine.route(ids + " 9", now=3), Outcome(51, 50, kind=KIND_IDS), now=4)
    stats = engine.snapshot(5).workers[0]
    assert stats.predicted_tokens == 50 and stats.mispredicted == 0
