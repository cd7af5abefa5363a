"""What work costs on a worker, in seconds: the estimate `least_ttft` routes by, and its fit (pure).

A worker's time to first token for a request is modelled as

    ttft ≈ base + prefill × (queued + uncached) + decode × running

- `queued`: key elements of prefill waiting on that worker when the request is routed: the
  requests routed there whose first token has not come yet, each net of what it was predicted
  to hold (SGLang runs waiting prefills before decode steps, so this is the work ahead);
- `uncached`: the request's own key elements the worker does not hold;
- `running`: its requests past their first token (decoding: they hold KV and steps);
- `base`, `prefill` (s per key element), `decode` (s per running request): the worker's prices.

`PriceFit` learns the prices of one worker from answered requests (`add(ttft, work, running)`,
work = queued ahead + the request's real uncached elements, from its `cached_tokens`): a ridge
regression of ttft on (1, work, running) over exponentially weighted sufficient statistics
(each sample's weight decays by `DECAY` per new sample: a half-life of ~69 samples), pulled
toward a prior (`Prices`: the defaults below, a simulated worker's profile, or the fleet's
prices for a worker that joins late) with the weight of `PRIOR_SAMPLES` samples. Nonsense never
reaches it: a ttft that is not finite, ≤ 0 or above `MAX_TTFT_S`, or negative work, is refused;
after `WARMUP` samples a ttft more than `OUTLIER`× off the prediction is ignored (unless
`OUTLIER_RUN` in a row are: then the worker has really changed); fitted prices are clamped to
[prior / `PRICE_RANGE`, prior × `PRICE_RANGE`] (base, decode: ≥ 0 and ≤ `MAX_BASE_S`,
`MAX_DECODE_S`).

Default prior (Llama-3-8B on one H100-class GPU with SGLang, per token): prefill 50 µs
(20k tokens/s), decode 0.2 ms per running request, base 20 ms.
"""

from __future__ import annotations

import math

DECAY = 0.99
PRIOR_SAMPLES = 2.0
WARMUP = 8
OUTLIER = 10.0
OUTLIER_RUN = 5
PRICE_RANGE = 100.0
MAX_TTFT_S = 600.0
MAX_BASE_S = 10.0
MAX_DECODE_S = 1.0
PREFILL_S_PER_TOKEN = 50e-6
DECODE_S_PER_RUNNING = 0.2e-3
BASE_S = 0.02


class Prices:
    """A worker's prices (see the module docstring); a plain record."""

    __slots__ = ("base", "decode", "prefill")

    def __init__(self, base: float, prefill: float, decode: float) -> None:
        self.base = base
        self.prefill = prefill  # s per key element
        self.decode = decode  # s per running request

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.base, self.prefill, self.decode)


def default_prices(elements_per_token: float) -> Prices:
    """The default prior, per key element (characters: about 4 to a token)."""
    return Prices(BASE_S, PREFILL_S_PER_TOKEN / elements_per_token, DECODE_S_PER_RUNNING)


class WorkerLoad:
    """What `least_ttft` reads of one worker: its queue, its running requests, its prices.
    The engine keeps one per worker current; the policy only reads it."""

    __slots__ = ("prices", "queued", "running")

    def __init__(self, prices: Prices) -> None:
        self.queued = 0  # key elements of prefill waiting (first token not come)
        self.running = 0  # requests in flight past their first token
        self.prices = prices


def estimate(load: WorkerLoad, uncached: int) -> float:
    """Estimated seconds to the first token of a request with `uncached` key elements."""
    p = load.prices
    return p.base + p.prefill * (load.queued + uncached) + p.decode * load.running


def estimate_parts(load: WorkerLoad, uncached: int) -> tuple[float, float, float, float]:
    """(base, queue wait, own prefill, decode load) in seconds: `estimate`'s sum, explained."""
    p = load.prices
    return (p.base, p.prefill * load.queued, p.prefill * uncached, p.decode * load.running)


class PriceFit:
    """One worker's fitted prices (see the module docstring)."""

    __slots__ = ("_rejected", "_sxx", "_sxy", "_weight", "prices", "prior", "refused", "samples")

    def __init__(self, prior: Prices) -> None:
        self.prior = prior
        self.prices = Prices(*prior.as_tuple())
        self.samples = 0  # accepted
        self.refused = 0  # nonsense or outliers
        self._weight = 0.0  # decayed count of samples
        self._sxx = [0.0] * 9  # Σ w x xᵀ, row-major 3×3, x = (1, work, running)
        self._sxy = [0.0] * 3  # Σ w x y
        self._rejected = 0  # outliers in a row

    def reset_prior(self, prior: Prices) -> None:
        """A new prior (the fleet's prices, a profile); the samples are kept."""
        self.prior = prior
        self._solve()

    def add(self, ttft: float, work: float, running: float) -> bool:
        """Learn from one answered request; False when the sample was refused."""
        if not (0.0 < ttft <= MAX_TTFT_S) or not (work >= 0.0 and running >= 0.0):
            self.refused += 1  # also NaN: every comparison with it is false
            return False
        if not math.isfinite(work) or not math.isfinite(running):
            self.refused += 1
            return False
        if self.samples >= WARMUP and self._outlier(ttft, work, running):
            self.refused += 1
            return False
        x = (1.0, work, running)
        sxx, sxy = self._sxx, self._sxy
        for i in range(3):
            sxy[i] = DECAY * sxy[i] + x[i] * ttft
            for j in range(3):
                sxx[3 * i + j] = DECAY * sxx[3 * i + j] + x[i] * x[j]
        self._weight = DECAY * self._weight + 1.0
        self.samples += 1
        self._solve()
        return True

    def _outlier(self, ttft: float, work: float, running: float) -> bool:
        p = self.prices
        predicted = max(p.base + p.prefill * work + p.decode * running, 1e-3)
        if ttft > OUTLIER * predicted or ttft * OUTLIER < predicted:
            self._rejected += 1
            if self._rejected < OUTLIER_RUN:
                return True
        self._rejected = 0
        return False

    def _solve(self) -> None:
        """Ridge regression toward the prior, then clamped to sane prices."""
        prior = self.prior.as_tuple()
        if self._weight <= 0.0:
            self.prices = Prices(*prior)
            return
        a = list(self._sxx)
        b = list(self._sxy)
        for i in range(3):
            # the prior weighs like PRIOR_SAMPLES samples of this feature's typical size
            scale = a[4 * i] / self._weight if i else 1.0
            strength = PRIOR_SAMPLES * max(scale, 1e-12)
            a[4 * i] += strength
            b[i] += strength * prior[i]
        solved = solve3(a, b)
        if solved is None:
            return  # keep the last prices
        base, prefill, decode = solved
        self.prices = Prices(
            min(max(base, 0.0), MAX_BASE_S),
            min(max(prefill, prior[1] / PRICE_RANGE), prior[1] * PRICE_RANGE),
            min(max(decode, 0.0), MAX_DECODE_S),
        )


def solve3(a: list[float], b: list[float]) -> tuple[float, float, float] | None:
    """x with A x = b for a 3×3 row-major A (Gaussian elimination with partial pivoting);
    None when A is singular."""
    m = [[a[3 * i], a[3 * i + 1], a[3 * i + 2], b[i]] for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, 3):
            f = m[r][col] / m[col][col]
            for c in range(col, 4):
                m[r][c] -= f * m[col][c]
    x = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        x[r] = (m[r][3] - sum(m[r][c] * x[c] for c in range(r + 1, 3))) / m[r][r]
    if not all(math.isfinite(v) for v in x):
        return None
    return (x[0], x[1], x[2])
