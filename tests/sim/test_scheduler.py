"""Fidelity of the simulated scheduler against SGLang's behaviour, with a fake clock.

Time is a parameter of every call, so these tests drive the scheduler through simulated time
directly: `drain` jumps from one `next_event_time()` to the next.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.sim.cost_model import CostModel
from sglang_dp.sim.scheduler import FINISHED, Scheduler, SimRequest


def model(**overrides: float) -> CostModel:
    values: dict[str, float] = {
        "prefill_tokens_per_s": 10000.0,
        "decode_step_s": 0.01,
        "decode_per_seq_s": 0.001,
        "decode_per_kv_token_s": 0.0,
        "max_total_tokens": 100_000,
        "max_running_requests": 64,
        "chunked_prefill_size": 8192,
        "context_length": 100_000,
    }
    values.update(overrides)
    ints = ("max_total_tokens", "max_running_requests", "chunked_prefill_size", "context_length")
    return CostModel(**{k: int(v) if k in ints else v for k, v in values.items()})  # type: ignore[arg-type]


def req(rid: str, prompt: list[int], new: int = 4) -> SimRequest:
    return SimRequest(rid, prompt, [90_000 + i for i in range(new)])


def drain(s: Scheduler, until: float = float("inf")) -> float:
    """Advance through every event up to `until`; returns the last time."""
    t = 0.0
    while (nxt := s.next_event_time()) is not None and nxt <= until:
        t = nxt
        s.advance(t)
    return t


def run_alone(s: Scheduler, r: SimRequest, at: float) -> None:
    s.submit(r, at)
    drain(s)
    assert r.state == FINISHED


def prompt(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + n))


def test_repeated_2048_token_prompt_reports_2047_cached() -> None:
    s = Scheduler(model())
    first, again = req("a", prompt(2048)), req("b", prompt(2048))
    run_alone(s, first, 0.0)
    run_alone(s, again, 10.0)
    assert first.cached_tokens == 0
    assert again.cached_tokens == 2047
    assert s.stats.cached_tokens == 2047


def test_prefill_time_is_tokens_over_rate() -> None:
    s = Scheduler(model(prefill_tokens_per_s=5000.0))
    r = req("a", prompt(2500))
    s.submit(r, 1.0)
    drain(s)
    assert r.first_token_time == pytest.approx(1.0 + 2500 / 5000)


def test_cached_prefix_shortens_prefill() -> None:
    s = Scheduler(model(prefill_tokens_per_s=1000.0))
    run_alone(s, req("a", prompt(1000)), 0.0)
    r = req("b", prompt(1000) + prompt(100, base=5000))
    s.submit(r, 100.0)
    drain(s)
    assert r.cached_tokens == 1000
    assert r.first_token_time == pytest.approx(100.0 + 100 / 1000)


def test_decode_steps_follow_the_cost_model() -> None:
    cost = model(decode_step_s=0.01, decode_per_seq_s=0.002, decode_per_kv_token_s=1e-6)
    s = Scheduler(cost)
    a, b = req("a", prompt(100), new=10), req("b", prompt(100, base=1000), new=10)
    s.submit_all([a, b], 0.0)
    drain(s)
    assert a.first_token_time == b.first_token_time == pytest.approx(200 / 10000)
    # 9 decode steps of batch 2; context starts at 2 × (100 + 1) and grows by 2 a step
    steps = sum(0.01 + 0.002 * 2 + 1e-6 * (202 + 2 * k) for k in range(9))
    assert a.finish_time == pytest.approx(a.first_token_time + steps)
    assert a.generated == b.generated == 10


def test_progress_is_one_token_per_step_for_every_request() -> None:
    s = Scheduler(model(decode_per_seq_s=0.0))
    r = req("a", prompt(10), new=50)
    s.submit(r, 0.0)
    first = 10 / 10000
    s.advance(first)
    assert s.generated(r, first) == 1
    s.advance(first + 0.0355)
    assert s.generated(r, first + 0.0355) == 4  # 3 whole steps of 10 ms


def test_same_batch_duplicates_both_compute() -> None:
    s = Scheduler(model())
    s.submit(req("busy", prompt(1000, base=9000)), 0.0)
    a, b = req("a", prompt(500)), req("b", prompt(500))
    s.submit(a, 0.01)  # both wait for the running prefill, then share the next batch
    s.submit(b, 0.02)
    drain(s)
    assert a.first_token_time == b.first_token_time
    assert (a.cached_tokens, b.cached_tokens) == (0, 0)


def test_cached_tokens_are_counted_when_scheduled_not_on_arrival() -> None:
    s = Scheduler(model(prefill_tokens_per_s=1000.0))
    a, b = req("a", prompt(1000)), req("b", prompt(1000))
    s.submit(a, 0.0)
    s.submit(b, 0.5)  # arrives while a's prefill runs: scheduled after it, sees a's prompt
    drain(s)
    assert b.cached_tokens == 999


def test_capacity_pressure_evicts_least_recently_used_prefix() -> None:
    s = Scheduler(model(max_total_tokens=1000))
    run_alone(s, req("a", prompt(300, base=0)), 0.0)
    run_alone(s, req("b", prompt(300, base=10_000)), 1.0)
    run_alone(s, req("a2", prompt(300, base=0)), 2.0)  # touches a's prefix
    run_alone(s, req("c", prompt(500, base=20_000)), 3.0)  # needs room: evicts b, not a
    assert s.cache.match_prefix(prompt(300, base=0))[0] == 300
    assert s.cache.match_prefix(prompt(300, base=10_000))[0] < 300
    assert s.cache.size <= 1000


def test_running_request_prefix_is_never_evicted() -> None:
    s = Scheduler(model(max_total_tokens=2000, decode_step_s=1.0))
    long = req("long", prompt(800), new=100)
    s.submit(long, 0.0)
    for i in range(10):  # others pass through and need room
        s.submit(req(f"o{i}", prompt(600, base=10_000 * (i + 1)), new=2), 1.0 + i)
        s.advance(1.0 + i)
        assert s.cache.match_prefix(prompt(800))[0] == 800
        assert s.cache.size + s.held <= 2000
    drain(s)
    assert long.state == FINISHED


def test_admission_waits_for_kv_instead_of_overcommitting() -> None:
    s = Scheduler(model(max_total_tokens=1000, decode_step_s=0.1))
    a, b = req("a", prompt(400), new=300), req("b", prompt(400, base=5000), new=300)
    s.submit(a, 0.0)
    s.submit(b, 0.0)
    s.advance(0.05)
    assert [r.rid for r in s.waiting] == ["b"]  # 400 + 299 reserved for a leaves too little
    drain(s)
    assert b.first_token_time is not None and a.finish_time is not None
    assert b.first_token_time > a.finish_time


def test_max_running_requests_limits_the_batch() -> None:
    s = Scheduler(model(max_running_requests=2))
    reqs = [req(str(i), prompt(10, base=100 * i), new=5) for i in range(3)]
    s.submit_all(reqs, 0.0)
    s.advance(0.0025)
    assert len(s.running) == 2 and [r.rid for r in s.waiting] == ["2"]
    drain(s)
    assert reqs[2].first_token_time is not None and reqs[0].finish_time is not None
    assert reqs[2].first_token_time >= reqs[0].finish_time


def test_long_prompt_is_chunked() -> None:
    s = Scheduler(model(chunked_prefill_size=1000, prefill_tokens_per_s=1000.0))
    r = req("a", prompt(2500))
    s.submit(r, 0.0)
    assert s.batch is not None and s.batch.end == pytest.approx(1.0)
    s.advance(1.0)
    assert r.prefilled == 1000 and s.cache.size == 1000  # the first chunk is cached
    drain(s)
    assert r.first_token_time == pytest.approx(2.5)


def pairs(cached: int, new: int) -> float:
    return new * cached + new * (new + 1) / 2


def test_each_chunk_pays_attention_over_the_chunks_before_it() -> None:
    cost = model(
        chunked_prefill_size=1000, prefill_tokens_per_s=1000.0,
        prefill_per_pair_s=1e-6, prefill_fixed_s=0.01,
    )  # fmt: skip
    s = Scheduler(cost)
    r = req("a", prompt(2500))
    s.submit(r, 0.0)
    ends = []
    while r.first_token_time is None:
        assert s.batch is not None
        ends.append(s.batch.end)
        s.advance(s.batch.end)
    chunks = [(0, 1000), (1000, 1000), (2000, 500)]
    expected = [0.01 + n / 1000 + 1e-6 * pairs(c, n) for c, n in chunks]
    durations = [b - a for a, b in zip([0.0, *ends], ends, strict=False)]
    assert durations == pytest.approx(expected)
    assert durations[1] > durations[0]  # same tokens, more to attend to


def test_a_mixed_batch_costs_the_sum_over_its_requests() -> None:
    cost = model(
        chunked_prefill_size=1500, prefill_tokens_per_s=1000.0,
        prefill_per_pair_s=1e-6, prefill_fixed_s=0.01,
    )  # fmt: skip
    s = Scheduler(cost)
    run_alone(s, req("warm", prompt(800)), 0.0)
    s.submit(req("busy", prompt(10, base=50_000)), 100.0)  # the next two share a batch
    hit = req("hit", prompt(800) + prompt(100, base=9000))
    fresh = req("fresh", prompt(2000, base=20_000))
    s.submit_all([hit, fresh], 100.001)
    while s.batch is not None and not any(r is hit for r, _ in s.batch.prefill):
        s.advance(s.batch.end)
    assert s.batch is not None
    assert [(r.rid, n) for r, n in s.batch.prefill] == [("hit", 100), ("fresh", 1400)]
    # one fixed part; each request's tokens and attention over what precedes them
    expected = 0.01 + 1500 / 1000 + 1e-6 * (pairs(800, 100) + pairs(0, 1400))
    assert s.batch.end - s.batch.start == pytest.approx(expected)


def test_a_short_batch_takes_the_launch_floor() -> None:
    s = Scheduler(model(prefill_tokens_per_s=1000.0, prefill_floor_s=0.5))
    short, long = req("short", prompt(10)), req("long", prompt(800, base=5000))
    run_alone(s, short, 0.0)
    assert short.first_token_time == pytest.approx(0.5)
    run_alone(s, long, 10.0)
    assert long.first_token_time == pytest.approx(10.8)


def test_lpm_admits_the_longest_cached_prefix_first() -> None:
    s = Scheduler(model(max_running_requests=1, decode_step_s=1.0), policy="lpm")
    run_alone(s, req("warm", prompt(500, base=7000)), 0.0)
    blocker = req("blocker", prompt(10), new=3)
    s.submit(blocker, 100.0)
    cold, warm = req("cold", prompt(500, base=1)), req("hot", prompt(500, base=7000))
    s.submit(cold, 100.1)
    s.submit(warm, 100.2)
    drain(s)
    assert warm.first_token_time is not None and cold.first_token_time is not None
    assert warm.first_token_time < cold.first_token_time


def test_fcfs_keeps_arrival_order() -> None:
    s = Scheduler(model(max_running_requests=1, decode_step_s=1.0), policy="fcfs")
    run_alone(s, req("warm", prompt(500, base=7000)), 0.0)
    s.submit(req("blocker", prompt(10), new=3), 100.0)
    cold, warm = req("cold", prompt(500, base=1)), req("hot", prompt(500, base=7000))
    s.submit(cold, 100.1)
    s.submit(warm, 100.2)
    drain(s)
    assert cold.first_token_time is not None and warm.first_token_time is not None
    assert cold.first_token_time < warm.first_token_time


def test_flush_refuses_while_busy() -> None:
    s = Scheduler(model())
    s.submit(req("a", prompt(100)), 0.0)
    assert not s.flush()
    drain(s)
    assert s.cache.size > 0
    assert s.flush()
    assert s.cache.size == 0


def test_abort_releases_kv_and_locks() -> None:
    s = Scheduler(model(decode_step_s=0.1))
    r = req("a", prompt(100), new=1000)
    s.submit(r, 0.0)
    s.advance(1.0)
    aborted = s.abort("a", 1.0)
    assert aborted is r and 0 < r.generated < 1000
    drain(s)
    assert not s.busy
    assert s.cache.protected_size == 0 and s.held == 0 and s.reserved == 0
    assert s.stats.finished_requests == 0


def test_disabled_cache_computes_every_prompt() -> None:
    s = Scheduler(model(), cache_enabled=False)
    a, b = req("a", prompt(300)), req("b", prompt(300))
    run_alone(s, a, 0.0)
    run_alone(s, b, 1.0)
    assert b.cached_tokens == 0 and s.held == 0 and s.cache.size == 0


def test_instant_mode_still_caches() -> None:
    s = Scheduler(model())
    a, b = req("a", prompt(64)), req("b", [*prompt(64), 1, 2])
    s.run_instant(a, 0.0)
    s.run_instant(b, 0.0)
    assert (a.cached_tokens, b.cached_tokens) == (0, 64)
    # prompt + output (minus the last token) is cached: a follow-up turn hits all of it
    c = req("c", prompt(64) + a.output + [7])
    s.run_instant(c, 0.0)
    assert c.cached_tokens == 64 + len(a.output) - 1


def test_instant_mode_respects_capacity() -> None:
    s = Scheduler(model(max_total_tokens=500))
    for i in range(20):
        s.run_instant(req(str(i), prompt(100, base=1000 * i)), float(i))
        assert s.cache.size <= 500


ops = st.lists(
    st.tuples(
        st.sampled_from(["submit", "abort"]),
        st.integers(0, 5),
        st.integers(1, 400),
        st.integers(0, 40),
        st.floats(0, 0.2),
    ),
    max_size=25,
)


@settings(max_examples=120, deadline=None)
@given(ops, st.sampled_from(["fcfs", "lpm"]), st.booleans(), st.sampled_from([1, 1, 4, 7]))
def test_kv_accounting_never_leaks(
    program: list[tuple[str, int, int, int, float]], policy: str, enabled: bool, page: int
) -> None:
    s = Scheduler(
        model(max_total_tokens=1500, chunked_prefill_size=300, max_running_requests=4),
        policy=policy,
        cache_enabled=enabled,
        page_size=page,
    )
    t, n = 0.0, 0
    submitted: list[SimRequest] = []
    for op, family, length, new, dt in program:
        t += dt
        s.advance(t)
        if op == "submit":
            r = req(f"r{n}", prompt(length, base=family * 1000), new=new)
            n += 1
            submitted.append(r)
            s.submit(r, t)
        elif submitted:
            s.abort(submitted[family % len(submitted)].rid, t)
        assert s.cache.size + s.held <= s.capacity
        assert s.reserved >= 0 and s.held >= 0
    drain(s)
    assert not s.busy
    assert all(r.state == FINISHED for r in submitted)
    assert s.held == 0 and s.reserved == 0 and s.context == 0
    assert s.cache.protected_size == 0


@pytest.mark.parametrize("new", [0, 1])
def test_tiny_outputs_finish_with_the_prefill(new: int) -> None:
    s = Scheduler(model())
    r = req("a", prompt(100), new=new)
    run_alone(s, r, 0.0)
    assert r.finish_time == r.first_token_time == pytest.approx(100 / 10000)
    assert r.generated == new
    assert s.held == 0 and s.reserved == 0 and s.cache.protected_size == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 512), st.integers(0, 10**6), st.integers(1, 5000), st.floats(0, 1e5))
def test_decode_steps_within_inverts_run_seconds(
    batch: int, context: int, steps: int, start: float
) -> None:
    cost = model(decode_per_kv_token_s=5e-8)
    end = start + cost.decode_run_seconds(batch, context, steps)
    assert cost.decode_steps_within(batch, context, end - start) == steps
