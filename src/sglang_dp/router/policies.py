"""Load-balancing policies: given per-worker prefix matches and loads, pick a worker and say why.

Every policy's `choose(loads, matched, key_length, pending)` sees the same inputs (the routable
workers' loads = requests in flight from this router, in a stable worker order; how long a prefix
of the request's key each probably holds; and each worker's pending prefill = key elements of its
in-flight prompts it was not predicted to hold) and returns a `Choice`: the worker and a
machine-readable reason. Policies are pure; randomness comes from a
seeded `random.Random`, and ties are broken at random so that, at low load, misses do not all go
to the first worker (an sgl-router bug).

Policies and settings (defaults):
- `least_ttft` (the default): the worker where this request's first token would come soonest,
  by `prices.estimate`: the prefill queued ahead of it there (uncached key elements routed there
  whose first token has not come), its own key elements the worker does not hold, and the
  worker's running requests, priced in seconds by the worker's fitted prices. Recomputing a
  prefix that another worker holds is charged `recompute_penalty` (1.0) times its prefill
  again, for the requests it delays behind it (in a saturated burst every recomputation
  lengthens the whole run). With `decode_weight` > 0 (default 0) the answer's estimated decode
  time in each worker's batch counts too (decode steps slow down with the context in flight, as
  NVIDIA Dynamo counts active decode blocks); it spreads bursts more than they gain, so it is
  off. (The figures behind these choices: benchmarks/README.md, bench_policies and
  bench_late_joiner.) Near-ties (within 2 ms of the cheapest) go to the longest
  match if it is above `cache_threshold`, then the less loaded; else as cache_aware's misses go
  (least pending prefill, then least loaded, then at random: new prefixes spread over idle
  workers). A request still goes where its prefix is, unless waiting there costs more than
  recomputing the prefix elsewhere (twice over, by default) [cache_hit: the longest match;
  recompute: the longest match was dearer; least_wait: no worker holds any of it].
  No GPU idles while others work [idle]: a worker with nothing in flight for `IDLE_S` (0.1 s)
  takes the request when the cheapest has `BUSY` (2) or more in flight, however dear its
  recomputation looks to this one request: the copy of the prefix serves the next ones (the
  estimate sees only this request, so it never pays to seed an idle worker: without the rule, a
  worker that joins late under a steady load gets nothing). Once it holds the prefix, the
  estimates share the prefix's traffic between the copies. A worker idle only between two of its
  requests does not count: taking any idle worker steals conversations' next turns.
- `cache_aware` (sgl-router's semantics and flag names): if max_load - min_load >
  `balance_abs_threshold` (64) and max_load > min_load * `balance_rel_threshold` (1.5), the loads
  are imbalanced: take the best-matching worker among those not overloaded (load within half of
  `balance_abs_threshold` of the least loaded) if its match rate > `cache_threshold`
  [imbalanced_hit], else the least loaded worker [imbalanced]; else if the best match rate >
  `cache_threshold` (0.3), take the best-matching worker [cache_hit]; else the worker with the
  least pending prefill, then the least loaded [below_threshold].
  Two deviations from sgl-router, both measured on bursts (benchmarks/README.md):
  misses go by pending prefill, not by in-flight count, because when a burst arrives in-flight
  counts say nothing about the prefixes about to be shared (they spread a burst's prefix groups
  unevenly, and the busiest worker sets the finishing time), while
  pending prefill counts the misses a worker already has to compute, which spreads new prefixes
  evenly (and weighs prompts by length); and a hot prefix pushed off its overloaded worker goes
  to a worker that already took some of it, instead of being recomputed wherever the load is
  least (sgl-router scatters it, and so did pending prefill alone, which lost throughput on a
  burst with one very hot prefix). Never "the smallest tree", which sent every miss to one worker.
- `threshold` (the proposal's "cache threshold + shortest queue"): best match rate >
  `cache_threshold` → best-matching worker [cache_hit]; else shortest queue [below_threshold].
- `variance` (the proposal's variance-based strategy): with μ and σ the mean and standard deviation
  of the loads, drop workers whose load > μ + `variance_k`·σ (1.0); among the rest take the highest
  match [cache_hit], or the least loaded if none matches [no_match].
- baselines: `round_robin`, `random`, `power_of_two` (two random workers, the less loaded),
  `shortest_queue`.
Best-match ties go to the less loaded worker, then at random.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from sglang_dp.options import option
from sglang_dp.router.prices import (
    Fleet,
    WorkerLoad,
    decode_time,
    default_step_prices,
    default_ttft_prices,
    estimate,
)

POLICY_NAMES = (
    "least_ttft",
    "cache_aware",
    "threshold",
    "variance",
    "round_robin",
    "random",
    "power_of_two",
    "shortest_queue",
)


Choice = tuple[str, str]  # (worker, reason); a plain tuple: this is the hot path
NO_PENDING: Mapping[str, int] = {}
TIE_S = 0.002  # least_ttft: within 2 ms of the cheapest is a tie (a few dozen prefill tokens)
BUSY = 2  # least_ttft: a worker idle for IDLE_S takes a request bound for one this busy
IDLE_S = 0.1  # (not a gap between two requests: a conversation's next turn stays home)


class Policy(Protocol):
    """`loads`: the routable workers' requests in flight, in a stable worker order (never empty).
    `matched`: how long a prefix of the key each worker probably holds (zeros and unroutable
    workers may be missing or present). `key_length`: the key's length. `pending`: each worker's
    uncached key elements in flight (missing: 0)."""

    name: str

    def choose(
        self,
        loads: Mapping[str, int],
        matched: Mapping[str, int],
        key_length: int,
        pending: Mapping[str, int] = ...,
    ) -> Choice: ...


@dataclass(frozen=True)
class PolicyConfig:
    """The routing policy and its settings; flag names shared with sgl-router mean the same."""

    policy: str = option("least_ttft", "Routing policy.", choices=POLICY_NAMES)
    cache_threshold: float = option(
        0.3, "Match rate above which the best-matching worker is taken."
    )
    balance_abs_threshold: int = option(
        64, "cache_aware: load gap (requests) beyond which load balancing wins."
    )
    balance_rel_threshold: float = option(
        1.5, "cache_aware: ... and the max load must exceed the min load times this."
    )
    recompute_penalty: float = option(
        1.0,
        "least_ttft: recomputing a prefix another worker holds counts this many times more "
        "than its own wait (the recomputation delays every request queued behind it too).",
    )
    decode_weight: float = option(
        0.0,
        "least_ttft: weight of the answer's estimated decode time in each worker's batch "
        "(0: time to first token only).",
    )
    variance_k: float = option(
        1.0, "variance: drop workers whose load exceeds mean + K standard deviations."
    )
    seed: int | None = option(
        None, "Seed for random tie-breaking and the random policies.", type=int
    )

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(
                f"unknown policy {self.policy!r}; choose from {', '.join(POLICY_NAMES)}"
            )
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError("cache_threshold must be between 0 and 1")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1.0:
            raise ValueError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        if self.decode_weight < 0:
            raise ValueError("decode_weight must be >= 0")
        if self.recompute_penalty < 0:
            raise ValueError("recompute_penalty must be >= 0")
        if self.variance_k < 0:
            raise ValueError("variance_k must be >= 0")


# -- shared pieces ----------------------------------------------------------------------------


def least_loaded(loads: Mapping[str, int], rng: random.Random) -> str:
    """The worker with the fewest requests in flight; ties at random."""
    lowest = min(loads.values())
    tied = [w for w, load in loads.items() if load == lowest]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def least_pending(loads: Mapping[str, int], pending: Mapping[str, int], rng: random.Random) -> str:
    """The worker with the least pending prefill; ties: less loaded, then at random."""
    best: list[str] = []
    best_pending, best_load = 0, 0
    for worker, load in loads.items():
        queued = pending.get(worker, 0)
        if not best or queued < best_pending or (queued == best_pending and load < best_load):
            best, best_pending, best_load = [worker], queued, load
        elif queued == best_pending and load == best_load:
            best.append(worker)
    return best[0] if len(best) == 1 else rng.choice(best)


def best_match(loads: Mapping[str, int], matched: Mapping[str, int], rng: random.Random) -> str:
    """The worker in `loads` holding the longest prefix (ties: less loaded, then at random).

    Returns '' when none of them holds any of the key.
    """
    best: list[str] = []
    best_length, best_load = 0, 0
    for worker, length in matched.items():
        if length < best_length:
            continue
        load = loads.get(worker)
        if load is None:
            continue
        if length > best_length or load < best_load:
            best, best_length, best_load = [worker], length, load
        elif load == best_load:
            best.append(worker)
    if not best:
        return ""
    return best[0] if len(best) == 1 else rng.choice(best)


# -- the policies -----------------------------------------------------------------------------


class LeastTtft:
    name = "least_ttft"

    def __init__(self, config: PolicyConfig, rng: random.Random, fleet: Fleet) -> None:
        self._threshold = config.cache_threshold
        self._penalty = config.recompute_penalty
        self._decode_weight = config.decode_weight
        self._rng = rng
        self._fleet = fleet  # the engine's, kept current by it
        # for a worker missing from the fleet (the policy used alone)
        self._idle = WorkerLoad(default_ttft_prices(1.0), default_step_prices(1.0))

    def choose(
        self,
        loads: Mapping[str, int],
        matched: Mapping[str, int],
        key_length: int,
        pending: Mapping[str, int] = NO_PENDING,
    ) -> Choice:
        longest = 0
        for worker in loads:
            longest = max(longest, matched.get(worker, 0))
        estimates: list[tuple[float, str, int]] = []
        cheapest = math.inf
        fleet = self._fleet
        for worker in loads:
            held = matched.get(worker, 0)
            load = fleet.loads.get(worker, self._idle)
            cost = estimate(load, key_length - held)
            if self._decode_weight:
                answer = decode_time(load, loads[worker], key_length, fleet.outputs)
                cost += self._decode_weight * answer
            cost += self._penalty * load.ttft.per_element * (longest - held)
            estimates.append((cost, worker, held))
            cheapest = min(cheapest, cost)
        limit = cheapest + TIE_S
        tied = {w: held for cost, w, held in estimates if cost <= limit}
        worker = self._break_tie(tied, loads, pending, key_length)
        if loads[worker] >= BUSY:
            since = fleet.now - IDLE_S
            idle = {
                cost: w
                for cost, w, _ in estimates
                if loads[w] == 0 and fleet.loads.get(w, self._idle).idle_since <= since
            }
            if idle:
                return idle[min(idle)], "idle"
        if longest == 0:
            return worker, "least_wait"
        return worker, "cache_hit" if matched.get(worker, 0) == longest else "recompute"

    def _break_tie(
        self,
        tied: dict[str, int],
        loads: Mapping[str, int],
        pending: Mapping[str, int],
        key_length: int,
    ) -> str:
        """The longer match when it is worth following, else cache_aware's miss rule."""
        if len(tied) == 1:
            return next(iter(tied))
        best = max(tied.values())
        if best > self._threshold * key_length:
            near = {w: loads[w] for w, held in tied.items() if held == best}
            return least_loaded(near, self._rng)
        return least_pending({w: loads[w] for w in tied}, pending, self._rng)


class CacheAware:
    name = "cache_aware"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng

    def choose(
        self,
        loads: Mapping[str, int],
        matched: Mapping[str, int],
        key_length: int,
        pending: Mapping[str, int] = NO_PENDING,
    ) -> Choice:
        high, low = max(loads.values()), min(loads.values())
        cfg = self._config
        if high - low > cfg.balance_abs_threshold and high > low * cfg.balance_rel_threshold:
            return self._rebalance(loads, matched, key_length, low)
        worker = best_match(loads, matched, self._rng)
        if worker and matched[worker] > cfg.cache_threshold * key_length:
            return worker, "cache_hit"
        return least_pending(loads, pending, self._rng), "below_threshold"

    def _rebalance(
        self, loads: Mapping[str, int], matched: Mapping[str, int], key_length: int, low: int
    ) -> Choice:
        """Imbalanced: a worker not overloaded that holds the prefix, else the least loaded."""
        cfg = self._config
        limit = low + cfg.balance_abs_threshold // 2
        near = {w: load for w, load in loads.items() if load <= limit}
        worker = best_match(near, matched, self._rng)
        if worker and matched[worker] > cfg.cache_threshold * key_length:
            return worker, "imbalanced_hit"
        return least_loaded(loads, self._rng), "imbalanced"


class Threshold:
    name = "threshold"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._threshold = config.cache_threshold
        self._rng = rng

    def choose(
        self,
        loads: Mapping[str, int],
        matched: Mapping[str, int],
        key_length: int,
        pending: Mapping[str, int] = NO_PENDING,
    ) -> Choice:
        worker = best_match(loads, matched, self._rng)
        if worker and matched[worker] > self._threshold * key_length:
            return worker, "cache_hit"
        return least_loaded(loads, self._rng), "below_threshold"


class Variance:
    name = "variance"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._k = config.variance_k
        self._rng = rng

    def choose(
        self,
        loads: Mapping[str, int],
        matched: Mapping[str, int],
        key_length: int,
        pending: Mapping[str, int] = NO_PENDING,
    ) -> Choice:
        values = list(loads.values())
        limit = statistics.fmean(values) + self._k * statistics.pstdev(values)
        band = {w: load for w, load in loads.items() if load <= limit}
        worker = best_match(band, matched, self._rng)
        if worker:
            return worker, "cache_hit"
        return least_loaded(band, self._rng), "no_match"


class RoundRobin:
    name = "round_robin"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._next = 0

    def choose(
        self,
        loads: Mapping[str, int],
        matched: Mapping[str, int],
        key_length: int,
        pending: Mapping[str, int] = NO_PENDING,
    ) -> Choice:
        workers = list(loads)
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker, "round_robin"


class Random:
    name = "random"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._rng = rng

    def choose(
        self,
        loads: Mapping[str, int],
        matched: Mapping[str, int],
        key_length: int,
        pending: Mapping[str, int] = NO_PENDING,
    ) -> Choice:
        return self._rng.choice(list(loads)), "random"


class PowerOfTwo:
    name = "power_of_two"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._rng = rng

    def choose(
        self,
        loads: Mapping[str, int],
        matched: Mapping[str, int],
        key_length: int,
        pending: Mapping[str, int] = NO_PENDING,
    ) -> Choice:
        workers = list(loads)
        if len(workers) == 1:
            return workers[0], "power_of_two"
        pair = {w: loads[w] for w in self._rng.sample(workers, 2)}
        return least_loaded(pair, self._rng), "power_of_two"


class ShortestQueue:
    name = "shortest_queue"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._rng = rng

    def choose(
        self,
        loads: Mapping[str, int],
        matched: Mapping[str, int],
        key_length: int,
        pending: Mapping[str, int] = NO_PENDING,
    ) -> Choice:
        return least_loaded(loads, self._rng), "shortest_queue"


_POLICIES: dict[str, Callable[[PolicyConfig, random.Random], Policy]] = {
    "cache_aware": CacheAware,
    "threshold": Threshold,
    "variance": Variance,
    "round_robin": RoundRobin,
    "random": Random,
    "power_of_two": PowerOfTwo,
    "shortest_queue": ShortestQueue,
}


def make_policy(config: PolicyConfig, fleet: Fleet | None = None) -> Policy:
    """The policy named in `config`, with its own seeded random generator; `least_ttft` reads
    the workers' queues and prices from `fleet` (the engine's, kept current by it)."""
    rng = random.Random(config.seed)
    if config.policy == "least_ttft":
        return LeastTtft(config, rng, fleet or Fleet(0.0))
    return _POLICIES[config.policy](config, rng)
