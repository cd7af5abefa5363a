"""The seeded fault draw (pure): which generation request fails how, the same on every run.
What each fault does on the wire is tested against real workers (test_http, router/test_faults).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.sim import faults
from sglang_dp.sim.config import SimConfig
from sglang_dp.sim.faults import Faults
from sglang_dp.sim.run import check_config

RATES = ("fail_rate", "garble_rate", "close_after_head", "truncate_rate", "reset_rate", "hang_rate")
NAMES = ("fail", "garble", "close", "truncate", "reset", "hang")


def draws(faults: Faults, n: int) -> list[str | None]:
    return [faults.draw() for _ in range(n)]


def reference(config: SimConfig, n: int) -> list[str | None]:
    """The draw spelled out: one number per set rate, in the flags' order, until one hits."""
    rng = random.Random(config.random_seed)
    out: list[str | None] = []
    for i in range(1, n + 1):
        if config.crash_after is not None and i > config.crash_after:
            out.append("crash")
            continue
        hit = None
        for name, rate in zip(NAMES, (getattr(config, r) for r in RATES), strict=True):
            if rate and rng.random() < rate:
                hit = name
                break
        out.append(hit)
    return out


@given(
    rates=st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]), min_size=6, max_size=6),
    seed=st.integers(0, 2**32),
    crash_after=st.none() | st.integers(0, 30),
)
def test_the_draw_is_the_seeded_reference(
    rates: list[float], seed: int, crash_after: int | None
) -> None:
    config = SimConfig(
        random_seed=seed, crash_after=crash_after, **dict(zip(RATES, rates, strict=True))
    )
    assert draws(Faults(config), 40) == reference(config, 40)


def test_no_rates_no_faults() -> None:
    assert draws(Faults(SimConfig()), 100) == [None] * 100


def test_the_same_seed_repeats_and_another_differs() -> None:
    config = SimConfig(fail_rate=0.3, hang_rate=0.3, random_seed=7)
    assert draws(Faults(config), 50) == draws(Faults(config), 50)
    assert draws(Faults(config), 50) != draws(Faults(config.replace(random_seed=8)), 50)


def test_crash_after_n_spares_the_first_n_requests() -> None:
    faults = Faults(SimConfig(crash_after=2, fail_rate=1.0))
    assert draws(faults, 4) == ["fail", "fail", "crash", "crash"]


def test_a_certain_fault_hides_the_later_ones() -> None:
    assert set(draws(Faults(SimConfig(garble_rate=1.0, hang_rate=1.0)), 20)) == {"garble"}


@pytest.mark.parametrize("field", [*RATES, "kv_events_drop_rate"])
@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_a_rate_outside_0_to_1_is_refused_by_name(field: str, rate: float) -> None:
    flag = "--" + field.replace("_", "-")
    assert check_config(SimConfig(**{field: rate})) == f"{flag} must be between 0 and 1"


def test_every_fault_rate_is_drawn() -> None:
    assert tuple(field for _, field in faults.RATES) == RATES
