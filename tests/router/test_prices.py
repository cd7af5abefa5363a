"""Prices of work on a worker: the estimate and its fit from observed times to first token."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sglang_dp.router.prices import (
    MAX_BASE_S,
    OUTLIER_RUN,
    PRICE_RANGE,
    WARMUP,
    PriceFit,
    Prices,
    WorkerLoad,
    decode_time,
    default_step_prices,
    default_ttft_prices,
    estimate,
    estimate_parts,
    queue_wait,
)

PRIOR = Prices(0.02, 1e-5, 2e-4)


def fitted(truth: Prices, samples: int = 200, seed: int = 0) -> PriceFit:
    """A fit fed exact answers of `truth` at varied work and running counts."""
    rng = random.Random(seed)
    fit = PriceFit(PRIOR)
    for _ in range(samples):
        work, running = rng.uniform(0, 200_000), rng.randint(0, 64)
        y = truth.base + truth.per_element * work + truth.per_request * running
        assert fit.add(y, work, running)
    return fit


def test_estimate_is_the_sum_of_its_parts() -> None:
    load = WorkerLoad(Prices(0.01, 2e-5, 1e-3), Prices(0.005, 1e-8, 1e-5))
    load.queued, load.running, load.context = 5_000, 12, 40_000
    parts = estimate_parts(load, 1_000, 20, 3_000, 100)
    decode = 100 * (0.005 + 1e-8 * 43_000 + 1e-5 * 21)
    assert parts == pytest.approx((0.01, 0.1, 0.02, 0.012, decode))
    assert estimate(load, 1_000) == pytest.approx(sum(parts[:4]))
    assert decode_time(load, 20, 3_000, 100) == pytest.approx(decode)
    assert queue_wait(load) == pytest.approx(0.1 + 0.012)


@settings(max_examples=60, deadline=None)
@example(base=0.0117, prefill=1e-6, decode=0.0)  # the base clamped to 0: tiny predictions
@given(
    base=st.floats(0.001, 1.0),
    prefill=st.floats(PRIOR.per_element / 10, PRIOR.per_element * 10),
    decode=st.floats(0.0, 0.01),
)
def test_exact_answers_recover_the_prices(base: float, prefill: float, decode: float) -> None:
    fit = fitted(Prices(base, prefill, decode))
    got = fit.prices
    # the prior still pulls a little (one sample's worth of ~87): the slope within a few
    # percent of its distance from the prior's, the estimate where the answers were (around
    # their mean) within 10 % (the base cannot go below 0 to make up for the slope)
    gap = abs(PRIOR.per_element - prefill)
    assert abs(got.per_element - prefill) <= 0.03 * gap + 1e-3 * prefill
    work, running = 100_000, 32
    want = base + prefill * work + decode * running
    assert got.base + got.per_element * work + got.per_request * running == pytest.approx(
        want, rel=0.1, abs=0.005
    )


def test_a_slower_gpu_is_priced_slower() -> None:
    fast = fitted(Prices(0.02, 1e-5, 2e-4)).prices
    slow = fitted(Prices(0.02, 3e-5, 2e-4)).prices
    assert slow.per_element == pytest.approx(3 * fast.per_element, rel=0.1)


def test_without_answers_the_prior_holds() -> None:
    fit = PriceFit(PRIOR)
    assert fit.prices.as_tuple() == PRIOR.as_tuple()
    for default in (default_ttft_prices, default_step_prices):
        assert default(4.0).per_element == pytest.approx(default(1.0).per_element / 4)


@pytest.mark.parametrize(
    "ttft, work, running",
    [
        (-1.0, 100, 0),
        (0.0, 100, 0),
        (math.nan, 100, 0),
        (math.inf, 100, 0),
        (1e9, 100, 0),
        (0.1, -5, 0),
        (0.1, math.nan, 0),
        (0.1, math.inf, 0),
        (0.1, 100, -1),
    ],
)
def test_nonsense_is_refused(ttft: float, work: float, running: float) -> None:
    fit = fitted(PRIOR, samples=20)
    before = fit.prices.as_tuple()
    assert not fit.add(ttft, work, running)
    assert fit.prices.as_tuple() == before
    assert fit.refused == 1


def test_one_outlier_is_ignored_but_a_run_of_them_is_a_change() -> None:
    fit = fitted(PRIOR, samples=WARMUP * 4)
    before = fit.prices.as_tuple()
    assert not fit.add(500.0, 1_000, 0)  # a hung request: 500 s for 1,000 elements
    assert fit.prices.as_tuple() == before
    assert fit.add(PRIOR.base + PRIOR.per_element * 1_000, 1_000, 0)  # back to normal
    accepted = [fit.add(50.0 + i, 1_000, 0) for i in range(OUTLIER_RUN)]
    assert accepted == [False] * (OUTLIER_RUN - 1) + [True]


def test_prices_stay_within_sane_bounds() -> None:
    fit = PriceFit(PRIOR)
    for _ in range(WARMUP):  # a worker that claims its first token before any prefill
        fit.add(300.0, 1.0, 0)
    p = fit.prices
    assert 0.0 <= p.base <= MAX_BASE_S
    assert PRIOR.per_element / PRICE_RANGE <= p.per_element <= PRIOR.per_element * PRICE_RANGE
    assert p.per_request >= 0.0
