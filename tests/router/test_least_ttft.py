"""least_ttft: routing by estimated time to first token, and the engine's queues and prices."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.router.engine import EngineConfig, Outcome, RoutingEngine
from sglang_dp.router.policies import TIE_S, PolicyConfig, make_policy
from sglang_dp.router.prices import Fleet, Prices, WorkerLoad, decode_time, estimate

SYSTEM = "You are a helpful assistant. " * 40  # 1,160 characters
PRICES = Prices(0.02, 1e-5, 1e-3)
STEP = Prices(0.006, 1e-10, 1e-7)  # a decode step: batches matter little in these tests


def engine_with(n: int, **policy: object) -> RoutingEngine:
    engine = RoutingEngine(EngineConfig(policy=PolicyConfig(seed=0, **policy), token_keys=True))
    engine.set_prior(PRICES, STEP)
    for i in range(n):
        engine.add_worker(f"w{i}")
    return engine


def queues(engine: RoutingEngine) -> dict[str, tuple[int, int]]:
    return {w.url: (w.queued, w.running) for w in engine.snapshot(0).workers}


def answer(engine: RoutingEngine, dispatch: object, now: float, cached: int = 0) -> None:
    key_length = dispatch.decision.key_length  # type: ignore[attr-defined]
    engine.observe(dispatch, Outcome(key_length, cached), now)  # type: ignore[arg-type]


def test_the_default_policy_is_least_ttft() -> None:
    assert PolicyConfig().policy == "least_ttft"


def test_a_prefix_stays_where_it_is_cached_while_waiting_there_is_cheap() -> None:
    engine = engine_with(4)
    first = engine.route([*list(range(2000)), 1], now=0)
    second = engine.route([*list(range(2000)), 2], now=0)
    assert second.worker == first.worker
    assert second.decision.reason == "cache_hit"


def test_a_prefix_is_recomputed_elsewhere_once_its_queue_costs_twice_more() -> None:
    engine = engine_with(2)
    prefix = list(range(1000))
    home = engine.route(prefix + [0] * 50, now=0).worker
    other = engine.route(list(range(90_000, 90_050)), now=0).worker  # not idle: no [idle] rule
    assert other != home
    # each request adds its 50 new tokens to the home queue (1,050 after the first); elsewhere
    # it would cost its 1,050 tokens plus the 1,000 recomputed again: 2,050
    choices = [
        engine.route(prefix + list(range(10_000 + 50 * i, 10_050 + 50 * i)), now=0).decision
        for i in range(30)
    ]
    assert all(d.worker == home and d.reason == "cache_hit" for d in choices[:15])
    spilled = [i for i, d in enumerate(choices) if d.worker != home]
    assert spilled and choices[spilled[0]].reason == "recompute"
    # 1,050 + 50 i + 50 passes 50 + 2,050 + the 2 ms tie band (200)
    assert 21 <= spilled[0] <= 26


def test_an_idle_worker_takes_a_request_bound_for_a_busy_one() -> None:
    engine = engine_with(2)
    prefix = list(range(1000))
    home = engine.route([*prefix, 1], now=0).worker
    assert engine.route([*prefix, 2], now=0).decision.reason == "cache_hit"  # 1 in flight
    third = engine.route([*prefix, 3], now=0)  # 2 in flight at home: the idle one takes it
    assert third.worker != home and third.decision.reason == "idle"


def test_a_worker_idle_only_between_two_requests_is_not_idle() -> None:
    """A conversation's next turn comes as its last one ends: its home is empty for an
    instant, and another worker must not take that instant for idleness."""
    engine = engine_with(2)
    prefix = list(range(1000))
    home = engine.route([*prefix, 1], now=0).worker
    other = engine.route(list(range(5000, 5100)), now=0.1)
    assert other.worker != home
    answer(engine, other, now=1.0)  # the other worker is empty from 1.0
    engine.route([*prefix, 2], now=1.1)  # 2 in flight at home
    assert engine.route([*prefix, 3], now=1.05).worker == home  # empty for 0.05 s only
    late = engine.route([*prefix, 4], now=1.2)  # empty for 0.2 s: idle
    assert (late.worker, late.decision.reason) == (other.worker, "idle")


def test_a_late_joiner_takes_its_share_at_once() -> None:
    """The demo's case: eight applications' prefixes placed on three workers under load, then
    a fourth worker becomes healthy. With request counts it got nothing for 19 s."""
    engine = engine_with(3)
    apps = [[1000 * a + i for i in range(2000)] for a in range(8)]
    rng = random.Random(0)

    def request(n: int) -> list[int]:  # an application's prefix and a 200-token question
        return rng.choice(apps) + list(range(100_000 + 200 * n, 100_200 + 200 * n))

    for n in range(60):  # steady streamed load: 20 queued per worker, no first token yet
        engine.route(request(n), now=n * 0.01, streamed=True)
    engine.add_worker("w3")
    routed = [engine.route(request(60 + n), now=1.0, streamed=True).worker for n in range(40)]
    assert routed.count("w3") >= 10  # its fair share: 10 of 40
    queued = {w: q for w, (q, _) in queues(engine).items()}
    # balanced by work, to within the recompute charge (twice a prefix) and the tie band
    assert max(queued.values()) - queued["w3"] <= 2 * 2000 + 200 + 2200


def test_first_token_moves_a_request_from_the_queue_to_running() -> None:
    engine = engine_with(1)
    dispatch = engine.route(list(range(500)), now=0)
    assert queues(engine)["w0"] == (500, 0)
    engine.first_token(dispatch, now=0.1)
    engine.first_token(dispatch, now=0.2)  # twice: no effect
    assert queues(engine)["w0"] == (0, 1)
    answer(engine, dispatch, now=1)
    assert queues(engine)["w0"] == (0, 0)


def test_a_request_with_no_first_token_counts_as_running_after_its_deadline() -> None:
    engine = engine_with(1)
    dispatch = engine.route(list(range(500)), now=0)
    due = 1.5 * estimate(WorkerLoad(PRICES, STEP), 500)
    engine.route([7], now=due * 0.9)
    assert queues(engine)["w0"][1] == 0
    engine.route([8], now=due * 1.01)
    assert queues(engine)["w0"] == (2, 1)  # the first left the queue; [7] and [8] wait
    engine.release(dispatch)
    assert queues(engine)["w0"] == (2, 0)


@settings(max_examples=80, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["route", "first", "observe", "fail", "release"]),
            st.integers(0, 30),
            st.floats(0, 0.5),
        ),
        max_size=60,
    )
)
def test_queues_and_running_counts_never_leak(steps: list[tuple[str, int, float]]) -> None:
    """Brute force: the queue is the uncached elements of requests in flight whose first token
    has not come (nor their deadline), running the others; all back to 0 once all end."""
    engine = engine_with(3)
    live: list[object] = []
    now = 0.0
    for op, pick, dt in steps:
        now += dt
        if op == "route" or not live:
            live.append(engine.route(list(range(pick * 7, pick * 7 + 50)), now=now))
            continue
        dispatch = live[pick % len(live)]
        if op == "first":
            engine.first_token(dispatch, now)  # type: ignore[arg-type]
        elif op == "observe":
            answer(engine, dispatch, now)
        elif op == "fail":
            engine.fail(dispatch, "connect_error")  # type: ignore[arg-type]
        else:
            engine.release(dispatch)  # type: ignore[arg-type]
        for w in engine.snapshot(now).workers:
            assert w.queued >= 0 and w.running >= 0
            assert w.queued + w.running == 0 or w.in_flight > 0
            assert w.running <= w.in_flight
    for dispatch in live:
        engine.release(dispatch)  # type: ignore[arg-type]
    assert set(queues(engine).values()) == {(0, 0)}


def test_streamed_answers_teach_each_worker_its_prices() -> None:
    engine = engine_with(2)
    truth = {"w0": 2e-5, "w1": 8e-5}  # w1 is a slower GPU
    for n in range(60):
        for worker, price in truth.items():
            dispatch = engine.route(list(range(n * 1000, n * 1000 + 500 + n)), now=n)
            if dispatch.worker != worker:
                engine.release(dispatch)
                continue
            engine.first_token(dispatch, now=n + 0.01 + price * (dispatch.ahead + 500 + n))
            answer(engine, dispatch, now=n + 0.5)
    prices = {w.url: w.ttft_prices for w in engine.snapshot(0).workers}
    assert prices["w1"][1] > 2 * prices["w0"][1]


@pytest.mark.parametrize("ttft", [-1.0, 0.0, float("nan"), float("inf"), 1e9])
def test_nonsense_timings_do_not_move_the_prices(ttft: float) -> None:
    engine = engine_with(1)
    dispatch = engine.route(list(range(500)), now=100.0)
    engine.first_token(dispatch, now=100.0 + ttft)
    answer(engine, dispatch, now=101)
    w = engine.snapshot(0).workers[0]
    assert w.ttft_prices == PRICES.as_tuple() and w.ttft_samples == 0


def test_identical_workers_are_priced_alike_despite_noise() -> None:
    engine = engine_with(2)
    rng = random.Random(1)
    for n in range(200):
        dispatch = engine.route(list(range(n * 1000, n * 1000 + 800)), now=n)
        noise = rng.uniform(0.9, 1.1)
        engine.first_token(dispatch, now=n + noise * (0.02 + 1e-5 * (dispatch.ahead + 800)))
        answer(engine, dispatch, now=n + 0.5)
    w0, w1 = engine.snapshot(0).workers
    assert w0.ttft_samples > 8 and w1.ttft_samples > 8
    assert w0.ttft_prices == w1.ttft_prices  # the fleet's: within 25 % of each other


@settings(max_examples=200, deadline=None)
@given(
    decode_weight=st.sampled_from([0.0, 1.0, 3.0]),
    queued=st.lists(st.integers(0, 100_000), min_size=1, max_size=6),
    running=st.lists(st.integers(0, 64), min_size=6, max_size=6),
    matched=st.lists(st.integers(0, 3000), min_size=6, max_size=6),
    key_length=st.integers(3000, 6000),
)
def test_least_ttft_takes_a_cheapest_worker(
    decode_weight: float, queued: list[int], running: list[int], matched: list[int], key_length: int
) -> None:
    """Brute force over the estimate, the decode time and the recompute charge: the choice is
    within the tie band of the cheapest."""
    fleet = Fleet(100.0)
    loads = {}  # requests in flight: at least one each, so that no worker is [idle]
    for i, q in enumerate(queued):
        load = WorkerLoad(PRICES, Prices(0.006, 2e-8, 1e-4))
        load.queued, load.running = q, running[i]
        loads[f"w{i}"] = running[i] + q // 1000 + 1
        load.context = loads[f"w{i}"] * 2000
        fleet.loads[f"w{i}"] = load
    costs = fleet.loads
    policy = make_policy(PolicyConfig(seed=0, decode_weight=decode_weight), fleet)
    held = {f"w{i}": matched[i] for i in range(len(queued))}
    worker, reason = policy.choose(loads, held, key_length)
    longest = max(held.values())

    def charge(w: str) -> float:
        first = estimate(costs[w], key_length - held[w])
        answer = decode_weight * decode_time(costs[w], loads[w], key_length, fleet.outputs)
        return first + answer + PRICES.per_element * (longest - held[w])

    cheapest = min(charge(w) for w in costs)
    assert charge(worker) <= cheapest + TIE_S + 1e-12
    if longest == 0:
        assert reason == "least_wait"
    else:
        assert reason == ("cache_hit" if held[worker] == longest else "recompute")
