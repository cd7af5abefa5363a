"""What a request would cost on a worker, in seconds: what `least_ttft` routes by, and the fits
of its prices (pure).

Two linear models per worker, each `base + per_element × elements + per_request × requests`:

    ttft ≈ base + per_element × (queued + uncached) + per_request × running
    step ≈ base + per_element × (context + key) + per_request × (in flight + 1)

- `queued`: key elements of prefill waiting on that worker when the request is routed: the
  requests routed there whose first token has not come yet, each net of what it was predicted
  to hold (SGLang runs waiting prefills before decode steps, so this is the work ahead);
- `uncached`: the request's own key elements the worker does not hold;
- `running`: its requests past their first token (decoding: they hold KV and steps);
- `step`: one decode step of that worker with this request in its batch; `context`: the key
  elements of its requests in flight (each decode step reads their KV: SGLang's decode time
  grows with it, 45 ns a token measured on an H200), `key` the request's own.

`estimate(load, uncached)` is the ttft (`queue_wait(load)` its part from the work already
there); `decode_time(load, in_flight, key, outputs)` the time to generate `outputs` tokens there
(`outputs` steps), what a request adds by joining a crowded batch (`least_ttft` counts it with
`--decode-weight`; `/debug/route` always shows it).

`PriceFit` learns one model's prices from answered requests (`add(y, elements, requests)`; ttft:
work = queued ahead + the request's real uncached elements, from its `cached_tokens`; step:
the mean step of a streamed answer after its first token): a ridge regression of y on
(elements, requests), centred (so the pull on a slope does not bend the base), over
exponentially weighted sums (each sample's weight decays by `DECAY` per new sample: a
half-life of ~69 samples), pulled toward a prior (`Prices`: the defaults below, or the fleet's
prices for a worker that joins late) with the weight of `PRIOR_SAMPLES` samples. Nonsense never
reaches it: a y that is not finite, ≤ 0 or above `MAX_SECONDS`, or negative work, is refused;
after `WARMUP` samples a y more than `OUTLIER`× off the prediction (at least
`OUTLIER_FLOOR_S`) is ignored (unless `OUTLIER_RUN` in a row are: then the worker has really
changed); fitted prices are clamped (per element: within `PRICE_RANGE`× of the prior; base and
per request: ≥ 0 and ≤ `MAX_BASE_S`, `MAX_PER_REQUEST_S`).

Default priors (Llama-3-8B on one H100-class GPU with SGLang, per token): ttft 20 ms + 50 µs a
prefill token (20k tokens/s) + 0.2 ms a running request; a decode step 6 ms + 45 ns a token of
context + 13 µs a request (the H200 measurement's fit, sim/cost_model.py).
"""

from __future__ import annotations

import math

DECAY = 0.99
PRIOR_SAMPLES = 1.0
WARMUP = 8
OUTLIER = 10.0
OUTLIER_RUN = 5
OUTLIER_FLOOR_S = 0.01  # predictions below this count as this (a biased fit's tiny ones)
PRICE_RANGE = 100.0
MAX_SECONDS = 600.0
MAX_BASE_S = 10.0
MAX_PER_REQUEST_S = 1.0
TTFT_BASE_S = 0.02
PREFILL_S_PER_TOKEN = 50e-6
TTFT_S_PER_RUNNING = 0.2e-3
STEP_BASE_S = 6e-3
STEP_S_PER_CONTEXT_TOKEN = 45e-9
STEP_S_PER_REQUEST = 13e-6


class Prices:
    """One model's prices (see the module docstring); a plain record."""

    __slots__ = ("base", "per_element", "per_request")

    def __init__(self, base: float, per_element: float, per_request: float) -> None:
        self.base = base  # s
        self.per_element = per_element  # s per key element
        self.per_request = per_request  # s per request

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.base, self.per_element, self.per_request)


def default_ttft_prices(elements_per_token: float) -> Prices:
    """The default ttft prior, per key element (characters: about 4 to a token)."""
    return Prices(TTFT_BASE_S, PREFILL_S_PER_TOKEN / elements_per_token, TTFT_S_PER_RUNNING)


def default_step_prices(elements_per_token: float) -> Prices:
    """The default decode-step prior, per key element of context."""
    per_element = STEP_S_PER_CONTEXT_TOKEN / elements_per_token
    return Prices(STEP_BASE_S, per_element, STEP_S_PER_REQUEST)


class WorkerLoad:
    """What `least_ttft` reads of one worker: its queue, its batch, its prices.
    The engine keeps one per worker current; the policy only reads it."""

    __slots__ = ("context", "idle_since", "queued", "running", "step", "ttft")

    def __init__(self, ttft: Prices, step: Prices) -> None:
        self.queued = 0  # key elements of prefill waiting (first token not come)
        self.running = 0  # requests in flight past their first token
        self.context = 0  # key elements of the requests in flight
        self.idle_since = -math.inf  # when its last request in flight ended
        self.ttft = ttft
        self.step = step


class Fleet:
    """What `least_ttft` reads: every routable worker's `WorkerLoad`, how many tokens an
    answer has (its decode steps), learned from answers, and the time of the decision. The
    engine keeps it current."""

    __slots__ = ("loads", "now", "outputs")

    def __init__(self, outputs: float) -> None:
        self.loads: dict[str, WorkerLoad] = {}
        self.outputs = outputs
        self.now = 0.0


def estimate(load: WorkerLoad, uncached: int) -> float:
    """Estimated seconds to the first token of a request with `uncached` key elements."""
    p = load.ttft
    return p.base + p.per_element * (load.queued + uncached) + p.per_request * load.running


def queue_wait(load: WorkerLoad) -> float:
    """Seconds the queued prefill and the running requests add to a new first token there."""
    p = load.ttft
    return p.per_element * load.queued + p.per_request * load.running


def decode_time(load: WorkerLoad, in_flight: int, key_length: int, outputs: float) -> float:
    """Estimated seconds to generate `outputs` tokens there, in a batch with its `in_flight`
    requests."""
    p = load.step
    context = load.context + key_length
    return outputs * (p.base + p.per_element * context + p.per_request * (in_flight + 1))


def estimate_parts(
    load: WorkerLoad, uncached: int, in_flight: int, key_length: int, outputs: float
) -> tuple[float, float, float, float, float]:
    """(base, queue wait, own prefill, running, decode time) in seconds: the first four are
    `estimate`'s sum, the last `decode_time`."""
    p = load.ttft
    return (
        p.base,
        p.per_element * load.queued,
        p.per_element * uncached,
        p.per_request * load.running,
        decode_time(load, in_flight, key_length, outputs),
    )


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
        # decayed sums over samples of x = (elements, requests) and y: Σw, Σx, Σy, Σxxᵀ, Σxy
        self._sw = 0.0
        self._sx = [0.0, 0.0]
        self._sy = 0.0
        self._sxx = [0.0, 0.0, 0.0]  # elements², elements·requests, requests²
        self._sxy = [0.0, 0.0]
        self._rejected = 0  # outliers in a row

    def reset_prior(self, prior: Prices) -> None:
        """A new prior (the fleet's prices, a profile); the samples are kept."""
        self.prior = prior
        self._solve()

    def add(self, y: float, elements: float, requests: float) -> bool:
        """Learn from one answered request (y: its time to first token, or its mean decode step,
        in seconds); False when the sample was refused."""
        # NaN fails every comparison, so it is refused too
        sane = 0.0 < y <= MAX_SECONDS and 0.0 <= elements < math.inf and 0.0 <= requests < math.inf
        if not sane:
            self.refused += 1
            return False
        if self.samples >= WARMUP and self._outlier(y, elements, requests):
            self.refused += 1
            return False
        self._sw = DECAY * self._sw + 1.0
        self._sx[0] = DECAY * self._sx[0] + elements
        self._sx[1] = DECAY * self._sx[1] + requests
        self._sy = DECAY * self._sy + y
        self._sxx[0] = DECAY * self._sxx[0] + elements * elements
        self._sxx[1] = DECAY * self._sxx[1] + elements * requests
        self._sxx[2] = DECAY * self._sxx[2] + requests * requests
        self._sxy[0] = DECAY * self._sxy[0] + elements * y
        self._sxy[1] = DECAY * self._sxy[1] + requests * y
        self.samples += 1
        self._solve()
        return True

    def _outlier(self, y: float, elements: float, requests: float) -> bool:
        p = self.prices
        predicted = max(
            p.base + p.per_element * elements + p.per_request * requests, OUTLIER_FLOOR_S
        )
        if y > OUTLIER * predicted or y * OUTLIER < predicted:
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
        b0, b1 = cwy + lw * prior.per_element, cry + lr * prior.per_request
        det = a00 * a11 - a01 * a01
        if not det > 0.0 or not math.isfinite(det):
            return  # keep the last prices
        per_element = (b0 * a11 - a01 * b1) / det
        per_request = (a00 * b1 - a01 * b0) / det
        base = my - per_element * mw - per_request * mr
        base = (w * base + PRIOR_SAMPLES * prior.base) / (w + PRIOR_SAMPLES)
        if not all(math.isfinite(v) for v in (base, per_element, per_request)):
            return
        self.prices = Prices(
            min(max(base, 0.0), MAX_BASE_S),
            min(max(per_element, prior.per_element / PRICE_RANGE), prior.per_element * PRICE_RANGE),
            min(max(per_request, 0.0), MAX_PER_REQUEST_S),
        )
