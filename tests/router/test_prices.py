"""Prices of work on a worker: the estimate and its fit from observed times to first token."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.router.prices import (
    MAX_BASE_S,
    OUTLIER_RUN,
    PRICE_RANGE,
    WARMUP,
    PriceFit,
    Prices,
    WorkerLoad,
    default_prices,
    estimate,
    estimate_parts,
)

PRIOR = Prices(0.02, 1e-5, 2e-4)


def fitted(truth: Prices, samples: int = 200, seed: int = 0) -> PriceFit:
    """A fit fed exact answers of `truth` at varied work and running counts."""
    rng = random.Random(seed)
    fit = PriceFit(PRIOR)
    for _ in range(samples):
        work, running = rng.uniform(0, 200_000), rng.randint(0, 64)
        assert fit.add(truth.base + truth.prefill * work + truth.decode * running, work, running)
    return fit


def test_estimate_is_the_sum_of_its_parts() -> None:
    load = WorkerLoad(Prices(0.01, 2e-5, 1e-3))
    load.queued, load.running = 5_000, 12
    parts = estimate_parts(load, 1_000)
    assert parts == pytest.approx((0.01, 0.1, 0.02, 0.012))
    assert estimate(load, 1_000) == pytest.approx(sum(parts))


@settings(max_examples=60, deadline=None)
@given(
    base=st.floats(0.001, 1.0),
    prefill=st.floats(PRIOR.prefill / 10, PRIOR.prefill * 10),
    decode=st.floats(0.0, 0.01),
)
def test_exact_answers_recover_the_prices(base: float, prefill: float, decode: float) -> None:
    fit = fitted(Prices(base, prefill, decode))
    got = fit.prices
    # the prior still pulls a little (one sample's worth of ~87): the slope within a few
    # percent of its distance from the prior's, the estimate where the answers were (around
    # their mean) within 10 % (the base cannot go below 0 to make up for the slope)
    assert abs(got.prefill - prefill) <= 0.03 * abs(PRIOR.prefill - prefill) + 1e-3 * prefill
    work, running = 100_000, 32
    want = base + prefill * work + decode * running
    assert got.base + got.prefill * work + got.decode * running == pytest.approx(
        want, rel=0.1, abs=0.005
    )


def test_a_slower_gpu_is_priced_slower() -> None:
    fast = fitted(Prices(0.02, 1e-5, 2e-4)).prices
    slow = fitted(Prices(0.02, 3e-5, 2e-4)).prices
    assert slow.prefill == pytest.approx(3 * fast.prefill, rel=0.1)


def test_without_answers_the_prior_holds() -> None:
    fit = PriceFit(PRIOR)
    assert fit.prices.as_tuple() == PRIOR.as_tuple()
    assert default_prices(4.0).prefill == pytest.approx(default_prices(1.0).prefill / 4)


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
    assert fit.add(PRIOR.base + PRIOR.prefill * 1_000, 1_000, 0)  # back to normal
    accepted = [fit.add(50.0 + i, 1_000, 0) for i in range(OUTLIER_RUN)]
    assert accepted == [False] * (OUTLIER_RUN - 1) + [True]


def test_prices_stay_within_sane_bounds() -> None:
    fit = PriceFit(PRIOR)
    for _ in range(WARMUP):  # a worker that claims its first token before any prefill
        fit.add(300.0, 1.0, 0)
    p = fit.prices
    assert 0.0 <= p.base <= MAX_BASE_S
    assert PRIOR.prefill / PRICE_RANGE <= p.prefill <= PRIOR.prefill * PRICE_RANGE
    assert p.decode >= 0.0
