"""Profiles fitted to measured step times: the fit, and the H200 profile against its measurement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.sim.calibration import (
    DecodePoint,
    PrefillFit,
    PrefillPoint,
    attention_pairs,
    decode_points,
    fit_decode,
    fit_prefill,
    prefill_points,
    relative_errors,
    relative_least_squares,
)
from sglang_dp.sim.config import SimConfig
from sglang_dp.sim.cost_model import PROFILES, attention_ns_per_pair, resolve

MEASUREMENT = Path(__file__).parents[2] / "benchmarks" / "h200-llama3-8b-measured.json"


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(MEASUREMENT.read_text())
    return data


def test_attention_pairs_count_causal_pairs_by_brute_force() -> None:
    for cached in (0, 1, 7):
        for new in (1, 2, 5):
            brute = sum(1 for q in range(new) for k in range(cached + new) if k <= cached + q)
            assert attention_pairs(cached, new) == brute


@settings(max_examples=60, deadline=None)
@given(
    st.tuples(
        st.floats(0.5, 20), st.floats(1e-3, 0.1), st.floats(1e-7, 1e-5)
    ),  # fixed, per token, per pair
    st.lists(
        st.tuples(st.integers(1, 64), st.integers(0, 8192), st.integers(1, 4096)),
        min_size=4,
        max_size=20,
        unique=True,
    ),
)
def test_least_squares_recovers_exact_linear_terms(
    terms: tuple[float, float, float], shapes: list[tuple[int, int, int]]
) -> None:
    rows = [(1.0, b * n, b * attention_pairs(c, n)) for b, c, n in shapes]
    ys = [terms[0] + terms[1] * t + terms[2] * p for _, t, p in rows]
    try:
        got = relative_least_squares(rows, ys)
    except ValueError:
        return  # degenerate shapes (e.g. every point proportional): refused, not guessed
    predicted = [got[0] + got[1] * t + got[2] * p for _, t, p in rows]
    assert predicted == pytest.approx(ys, rel=1e-6)


def test_prefill_fit_finds_a_launch_floor() -> None:
    truth = PrefillFit(floor_ms=9.0, fixed_ms=2.0, per_token_ms=0.02, per_pair_ms=2e-6)
    shapes = [(1, 0, 128), (1, 2048, 128), (8, 2048, 128), (1, 0, 2048), (8, 0, 2048)]
    shapes += [(1, 4096, 2048), (2, 0, 8192), (16, 0, 512)]
    points = [
        PrefillPoint(b, c, n, truth.ms(b * n, b * attention_pairs(c, n))) for b, c, n in shapes
    ]
    assert points[0].ms == 9.0 and points[1].ms == 9.0  # two points on the floor
    fit = fit_prefill(points)
    assert fit.floor_ms == pytest.approx(9.0)
    assert (fit.fixed_ms, fit.per_token_ms, fit.per_pair_ms) == pytest.approx((2.0, 0.02, 2e-6))


def test_prefill_fit_without_a_floor_when_none_is_needed() -> None:
    truth = PrefillFit(0.0, 3.0, 0.025, 1.5e-6)
    shapes = [(1, 0, 512), (8, 2048, 128), (1, 0, 2048), (1, 6144, 2048), (2, 0, 8192)]
    points = [
        PrefillPoint(b, c, n, truth.ms(b * n, b * attention_pairs(c, n))) for b, c, n in shapes
    ]
    fit = fit_prefill(points)
    assert fit.floor_ms == 0
    assert (fit.fixed_ms, fit.per_token_ms, fit.per_pair_ms) == pytest.approx((3.0, 0.025, 1.5e-6))


def test_bad_fit_input_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_prefill([PrefillPoint(1, 0, 10, 1.0)])
    with pytest.raises(ValueError, match="positive"):
        relative_least_squares([(1.0, 2.0)], [0.0])
    with pytest.raises(ValueError, match="at least 2 points"):
        relative_least_squares([(1.0, 2.0)], [1.0])
    with pytest.raises(ValueError, match="singular"):
        relative_least_squares([(1.0, 2.0), (2.0, 4.0)], [1.0, 2.0])
    with pytest.raises(ValueError, match="as many targets"):
        relative_least_squares([(1.0,)], [1.0, 2.0])
    same = [PrefillPoint(1, 0, 10, 1.0)] * 4  # every point alike: nothing to fit
    with pytest.raises(ValueError, match="do not determine"):
        fit_prefill(same)


def test_decode_fit_reproduces_the_files_own_fit(measured: dict[str, Any]) -> None:
    fit = fit_decode(decode_points(measured))
    stated = measured["fits"]["decode"]
    assert fit.fixed_ms == pytest.approx(stated["a_ms"], rel=1e-9)
    assert fit.per_seq_ms == pytest.approx(stated["b_ms"], rel=1e-9)
    assert fit.per_kv_token_ms * 1e6 == pytest.approx(stated["c_ns"], rel=1e-9)


def test_h200_profile_is_the_fit_of_its_measurement(measured: dict[str, Any]) -> None:
    prefill = fit_prefill(prefill_points(measured))
    decode = fit_decode(decode_points(measured))
    p = PROFILES["h200-llama3-8b"]
    assert p.prefill_floor_ms == pytest.approx(prefill.floor_ms, rel=1e-4)
    assert p.prefill_fixed_ms == pytest.approx(prefill.fixed_ms, rel=1e-4)
    assert 1e3 / p.prefill_tokens_per_s == pytest.approx(prefill.per_token_ms, rel=1e-4)
    assert p.prefill_per_pair_ns == pytest.approx(prefill.per_pair_ms * 1e6, rel=1e-4)
    assert p.decode_step_ms == pytest.approx(decode.fixed_ms, rel=1e-4)
    assert p.decode_per_seq_ms == pytest.approx(decode.per_seq_ms, rel=1e-4)
    assert p.decode_per_kv_token_ns == pytest.approx(decode.per_kv_token_ms * 1e6, rel=1e-4)
    assert p.kv_bytes_per_token == measured["kv_bytes_per_token"]


def test_h200_cost_model_replays_every_measured_point_within_10pct(
    measured: dict[str, Any],
) -> None:
    cost = resolve(SimConfig(profile="h200-llama3-8b"))

    def prefill_ms(p: PrefillPoint) -> float:
        return cost.prefill_seconds([(p.cached, p.new)] * p.batch) * 1e3

    def decode_ms(p: DecodePoint) -> float:
        return cost.decode_first_step(p.batch, p.kv_tokens) * 1e3

    errors = relative_errors(prefill_points(measured), prefill_ms, lambda p: p.ms)
    errors += relative_errors(decode_points(measured), decode_ms, lambda p: p.ms)
    assert len(errors) == 33
    assert max(abs(e) for e in errors) <= 0.10
    # the prefix hit: 8 × (1,920 cached + 128 new) against 8 × 2,048 fresh, measured 14.6×
    hit = cost.prefill_seconds([(1920, 128)] * 8)
    miss = cost.prefill_seconds([(0, 2048)] * 8)
    assert miss / hit == pytest.approx(measured["prefix_hit"]["speedup"], rel=0.10)


def test_other_profiles_take_the_attention_term_scaled_by_compute() -> None:
    h200 = PROFILES["h200-llama3-8b"].prefill_per_pair_ns
    assert PROFILES["h100-llama3-8b"].prefill_per_pair_ns == h200  # same compute
    assert PROFILES["a100-llama3-8b"].prefill_per_pair_ns == pytest.approx(h200 * 989 / 312)
    assert attention_ns_per_pair("a100") > attention_ns_per_pair("h100")
    # SGLang-like profiles have no launch floor or fixed batch cost
    assert (
        PROFILES["a100-llama3-8b"].prefill_floor_ms
        == 0
        == PROFILES["h100-llama3-8b"].prefill_fixed_ms
    )
