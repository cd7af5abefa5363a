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
regression of ttft on (work, running), centred (so the pull on a slope does not bend the base),
over exponentially weighted sums (each sample's weight decays by `DECAY` per new sample: a
half-life of ~69 samples), pulled toward a prior (`Prices`: the defaults below, a simulated
worker's profile, or the fleet's prices for a worker that joins late) with the weight of
`PRIOR_SAMPLES` samples. Nonsense never
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
PRIOR_SAMPLES = 1.0
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

    __slots__ = (
        "_rejected", "_sw", "_sx", "_sxx", "_sxy", "_sy", "prices", "prior", "refused", "samples"
    )  # fmt: skip

    def __init__(self, prior: Prices) -> None:
        self.prior = prior
        self.prices = Prices(*prior.as_tuple())
        self.samples = 0  # accepted
        self.refused = 0  # nonsense or outliers
        # decayed sums over samples of x = (work, running) and y = ttft: Σw, Σx, Σy, Σxxᵀ, Σxy
        self._sw = 0.0
        self._sx = [0.0, 0.0]
        self._sy = 0.0
        self._sxx = [0.0, 0.0, 0.0]  # work², work·running, running²
        self._sxy = [0.0, 0.0]
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
        self._sw = DECAY * self._sw + 1.0
        self._sx[0] = DECAY * self._sx[0] + work
        self._sx[1] = DECAY * self._sx[1] + running
        self._sy = DECAY * self._sy + ttft
        self._sxx[0] = DECAY * self._sxx[0] + work * work
        self._sxx[1] = DECAY * self._sxx[1] + work * running
        self._sxx[2] = DECAY * self._sxx[2] + running * running
        self._sxy[0] = DECAY * self._sxy[0] + work * ttft
        self._sxy[1] = DECAY * self._sxy[1] + running * ttft
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
        """Ridge regression of the two slopes on centred features, pulled toward the prior's
        as much as `PRIOR_SAMPLES` samples would; the base is what the mean leaves, pulled
        likewise; then clamped to sane prices."""
        prior = self.prior
        w = self._sw
        if w <= 0.0:
            self.prices = Prices(*prior.as_tuple())
            return
        mw, mr, my = self._sx[0] / w, self._sx[1] / w, self._sy / w
        cww = max(self._sxx[0] / w - mw * mw, 0.0)
        cwr = self._sxx[1] / w - mw * mr
        crr = max(self._sxx[2] / w - mr * mr, 0.0)
        cwy = self._sxy[0] / w - mw * my
        cry = self._sxy[1] / w - mr * my
        pull = PRIOR_SAMPLES / w
        # a feature that never varied keeps the prior's slope: its pull cannot vanish
        lw = pull * max(cww, 1e-12 * (1.0 + mw * mw))
        lr = pull * max(crr, 1e-12 * (1.0 + mr * mr))
        a00, a01, a11 = cww + lw, cwr, crr + lr
        b0, b1 = cwy + lw * prior.prefill, cry + lr * prior.decode
        det = a00 * a11 - a01 * a01
        if not det > 0.0 or not math.isfinite(det):
            return  # keep the last prices
        prefill = (b0 * a11 - a01 * b1) / det
        decode = (a00 * b1 - a01 * b0) / det
        base = my - prefill * mw - decode * mr
        base = (w * base + PRIOR_SAMPLES * prior.base) / (w + PRIOR_SAMPLES)
        if not all(math.isfinite(v) for v in (base, prefill, decode)):
            return
        self.prices = Prices(
            min(max(base, 0.0), MAX_BASE_S),
            min(max(prefill, prior.prefill / PRICE_RANGE), prior.prefill * PRICE_RANGE),
            min(max(decode, 0.0), MAX_DECODE_S),
        )
