"""Fitting cost-model profiles to measured GPU step times (pure: numbers in, numbers out).

A measurement (benchmarks/h200-llama3-8b-measured.json: one H200, a Llama-3-8B-shaped model,
plain PyTorch kernels) times prefill/extend batches and decode steps. Two fits turn it into a
profile:

- **prefill/extend**: a batch of requests, request r computing `new_r` tokens over `cached_r`
  tokens already in KV, takes

      max(floor, fixed + per_token × Σ new_r + per_pair × Σ pairs_r),
      pairs_r = new_r × cached_r + new_r (new_r + 1) / 2       (causal attention pairs)

  `fixed + per_token·n + per_pair·p` is what the GPU computes; `floor` is the time below which
  a batch never goes because the host launches the kernels one by one (eager PyTorch: ~1,300
  kernel launches a forward pass); a batch whose GPU work is shorter is launch bound.
  `fit_prefill` minimises the summed squared *relative* error. For k = 0, 1, ... it assumes the
  k fastest points are launch bound (k = 0: no floor), fits the floor to those k alone (the
  relative-least-squares constant) and the three linear terms to the rest (a 3×3 normal
  system), and keeps the k whose full model (with the max) has the least error.
- **decode**: `step = fixed + per_seq × batch + per_kv_token × KV tokens`, the same relative
  least squares (`fit_decode`); it reproduces the fit the measurement file states.

`relative_errors` replays points through any step-time function, so a profile can be checked
against the measurement it came from (tests/sim/test_calibration.py, benchmarks/bench_sim.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PrefillPoint:
    """A timed prefill/extend batch: `batch` requests of `cached` + `new` tokens each."""

    batch: int
    cached: int
    new: int
    ms: float

    @property
    def new_tokens(self) -> int:
        """Tokens computed by the whole batch."""
        return self.batch * self.new

    @property
    def pairs(self) -> float:
        """Attention (query, key) pairs of the whole batch."""
        return self.batch * attention_pairs(self.cached, self.new)


@dataclass(frozen=True)
class DecodePoint:
    """A timed decode step: `batch` requests holding `kv_tokens` of context in total."""

    batch: int
    kv_tokens: int
    ms: float


@dataclass(frozen=True)
class PrefillFit:
    """max(floor_ms, fixed_ms + per_token_ms × tokens + per_pair_ms × pairs)."""

    floor_ms: float
    fixed_ms: float
    per_token_ms: float
    per_pair_ms: float

    def ms(self, new_tokens: float, pairs: float) -> float:
        """Modelled time of a batch computing `new_tokens` over `pairs` attention pairs."""
        linear = self.fixed_ms + self.per_token_ms * new_tokens + self.per_pair_ms * pairs
        return max(self.floor_ms, linear)


@dataclass(frozen=True)
class DecodeFit:
    """fixed_ms + per_seq_ms × batch + per_kv_token_ms × KV tokens."""

    fixed_ms: float
    per_seq_ms: float
    per_kv_token_ms: float

    def ms(self, batch: int, kv_tokens: int) -> float:
        """Modelled time of one decode step."""
        return self.fixed_ms + self.per_seq_ms * batch + self.per_kv_token_ms * kv_tokens


def attention_pairs(cached: int, new: int) -> float:
    """Causal attention pairs of one request computing `new` tokens after `cached` ones."""
    return new * cached + new * (new + 1) / 2


def prefill_points(measurement: Mapping[str, Any]) -> list[PrefillPoint]:
    """Every timed prefill, extend and chunk of a measurement file, in file order."""
    rows = [*measurement["prefill"], *measurement["extend"], *measurement["chunked"]["chunks"]]
    return [PrefillPoint(r["batch"], r["cached"], r["new"], r["ms"]) for r in rows]


def decode_points(measurement: Mapping[str, Any]) -> list[DecodePoint]:
    """Every timed decode step of a measurement file, in file order."""
    return [DecodePoint(r["batch"], r["kv_tokens"], r["ms"]) for r in measurement["decode"]]


def relative_least_squares(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """x minimising Σ ((rows_i · x − y_i) / y_i)²: normal equations, Gaussian elimination."""
    if len(rows) != len(ys) or not rows:
        raise ValueError("need as many targets as rows, and at least one")
    if any(y <= 0 for y in ys):
        raise ValueError("relative errors need positive targets")
    n = len(rows[0])
    if len(rows) < n:
        raise ValueError(f"{n} unknowns need at least {n} points, got {len(rows)}")
    scaled = [[v / y for v in row] for row, y in zip(rows, ys, strict=True)]
    # columns differ by up to 1e8 in scale (pairs vs 1): normalise them first
    norms = [max(abs(r[j]) for r in scaled) or 1.0 for j in range(n)]
    a = [[r[j] / norms[j] for j in range(n)] for r in scaled]
    m = [[sum(a[k][i] * a[k][j] for k in range(len(a))) for j in range(n)] for i in range(n)]
    v = [sum(a[k][i] for k in range(len(a))) for i in range(n)]  # targets are all 1
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            raise ValueError("the points do not determine every term (singular system)")
        m[col], m[pivot] = m[pivot], m[col]
        v[col], v[pivot] = v[pivot], v[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
                v[r] -= f * v[col]
    return [v[i] / m[i][i] / norms[i] for i in range(n)]


def relative_errors(
    points: Sequence[Any], model: Callable[[Any], float], measured: Callable[[Any], float]
) -> list[float]:
    """(model − measured) / measured for every point."""
    return [model(p) / measured(p) - 1 for p in points]


def _prefill_sse(fit: PrefillFit, points: Sequence[PrefillPoint]) -> float:
    return sum((fit.ms(p.new_tokens, p.pairs) / p.ms - 1) ** 2 for p in points)


def fit_prefill(points: Sequence[PrefillPoint]) -> PrefillFit:
    """The launch floor and the three linear terms (see the module docstring)."""
    if len(points) < 3:
        raise ValueError(f"a prefill fit needs at least 3 points, got {len(points)}")
    by_time = sorted(points, key=lambda p: p.ms)
    best: tuple[float, PrefillFit] | None = None
    for k in range(len(points) - 2):
        floored, linear = by_time[:k], by_time[k:]
        try:
            fixed, per_token, per_pair = relative_least_squares(
                [(1.0, p.new_tokens, p.pairs) for p in linear], [p.ms for p in linear]
            )
        except ValueError:
            continue  # the remaining points no longer determine the three terms
        floor = sum(1 / p.ms for p in floored) / sum(1 / p.ms**2 for p in floored) if floored else 0
        fit = PrefillFit(floor, fixed, per_token, per_pair)
        sse = _prefill_sse(fit, points)
        if best is None or sse < best[0] - 1e-12:
            best = (sse, fit)
    if best is None:
        raise ValueError("the points do not determine the prefill terms")
    return best[1]


def fit_decode(points: Sequence[DecodePoint]) -> DecodeFit:
    """fixed + per_seq × batch + per_kv_token × KV tokens, by relative least squares."""
    fixed, per_seq, per_kv = relative_least_squares(
        [(1.0, p.batch, p.kv_tokens) for p in points], [p.ms for p in points]
    )
    return DecodeFit(fixed, per_seq, per_kv)
