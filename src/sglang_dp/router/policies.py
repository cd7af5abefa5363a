"""Load-balancing policies: given per-worker prefix matches and loads, pick a worker and say why.

Every policy sees the same `Candidates` (routable workers in a stable order, their loads = requests
in flight from this router, and how long a prefix of the request's key each probably holds) and
returns a `Choice` with a machine-readable reason. Policies are pure; randomness comes from a
seeded `random.Random`, and ties are broken at random so that, at low load, misses do not all go
to the first worker (an sgl-router bug).

Policies and settings (defaults):
- `cache_aware` (sgl-router's semantics and flag names): if max_load - min_load >
  `balance_abs_threshold` (64) and max_load > min_load * `balance_rel_threshold` (1.5), take the
  least loaded worker [imbalanced]; else if the best match rate > `cache_threshold` (0.3), take the
  best-matching worker [cache_hit]; else the least loaded worker [below_threshold] (never "the
  smallest tree", which sent every miss to one worker).
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

import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

POLICY_NAMES = (
    "cache_aware",
    "threshold",
    "variance",
    "round_robin",
    "random",
    "power_of_two",
    "shortest_queue",
)


@dataclass(frozen=True, slots=True)
class Candidates:
    """What a policy decides on. `workers` and `loads` are parallel; `matched` may omit zeros."""

    workers: Sequence[str]
    loads: Sequence[int]
    matched: Mapping[str, int]
    key_length: int


@dataclass(frozen=True, slots=True)
class Choice:
    worker: str
    reason: str


class Policy(Protocol):
    name: str

    def choose(self, candidates: Candidates) -> Choice: ...


@dataclass(frozen=True)
class PolicyConfig:
    """The routing policy and its settings; flag names shared with sgl-router mean the same."""

    policy: str = field(
        default="cache_aware", metadata={"help": "Routing policy.", "choices": POLICY_NAMES}
    )
    cache_threshold: float = field(
        default=0.3,
        metadata={"help": "Match rate above which the best-matching worker is taken."},
    )
    balance_abs_threshold: int = field(
        default=64,
        metadata={"help": "cache_aware: load gap (requests) beyond which load balancing wins."},
    )
    balance_rel_threshold: float = field(
        default=1.5,
        metadata={"help": "cache_aware: and max load must exceed min load times this."},
    )
    variance_k: float = field(
        default=1.0,
        metadata={
            "help": "variance: drop workers whose load exceeds mean + K standard deviations."
        },
    )
    seed: int | None = field(
        default=None, metadata={"help": "Seed for random tie-breaking and random policies."}
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
        if self.variance_k < 0:
            raise ValueError("variance_k must be >= 0")


# -- shared pieces ----------------------------------------------------------------------------


def least_loaded(candidates: Candidates, rng: random.Random) -> str:
    """The worker with the fewest requests in flight; ties at random."""
    loads = candidates.loads
    lowest = min(loads)
    tied = [w for w, load in zip(candidates.workers, loads) if load == lowest]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def best_match(candidates: Candidates, rng: random.Random, allowed: set[str] | None = None) -> str:
    """The worker holding the longest prefix (ties: less loaded, then at random); '' if none."""
    load_of = dict(zip(candidates.workers, candidates.loads))
    best: list[str] = []
    best_rank = (0, 0)
    for worker, length in candidates.matched.items():
        if worker not in load_of or (allowed is not None and worker not in allowed):
            continue
        rank = (length, -load_of[worker])
        if rank > best_rank:
            best, best_rank = [worker], rank
        elif rank == best_rank:
            best.append(worker)
    if not best:
        return ""
    return best[0] if len(best) == 1 else rng.choice(best)


def best_rate(candidates: Candidates) -> float:
    if candidates.key_length == 0:
        return 0.0
    routable = set(candidates.workers)
    best = max((n for w, n in candidates.matched.items() if w in routable), default=0)
    return best / candidates.key_length


# -- the policies -----------------------------------------------------------------------------


class CacheAware:
    name = "cache_aware"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng

    def choose(self, candidates: Candidates) -> Choice:
        high, low = max(candidates.loads), min(candidates.loads)
        cfg = self._config
        if high - low > cfg.balance_abs_threshold and high > low * cfg.balance_rel_threshold:
            return Choice(least_loaded(candidates, self._rng), "imbalanced")
        if best_rate(candidates) > cfg.cache_threshold:
            return Choice(best_match(candidates, self._rng), "cache_hit")
        return Choice(least_loaded(candidates, self._rng), "below_threshold")


class Threshold:
    name = "threshold"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._threshold = config.cache_threshold
        self._rng = rng

    def choose(self, candidates: Candidates) -> Choice:
        if best_rate(candidates) > self._threshold:
            return Choice(best_match(candidates, self._rng), "cache_hit")
        return Choice(least_loaded(candidates, self._rng), "below_threshold")


class Variance:
    name = "variance"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._k = config.variance_k
        self._rng = rng

    def choose(self, candidates: Candidates) -> Choice:
        loads = candidates.loads
        limit = statistics.fmean(loads) + self._k * statistics.pstdev(loads)
        band = {w for w, load in zip(candidates.workers, loads) if load <= limit}
        worker = best_match(candidates, self._rng, allowed=band)
        if worker:
            return Choice(worker, "cache_hit")
        in_band = [(w, n) for w, n in zip(candidates.workers, loads) if w in band]
        narrowed = Candidates([w for w, _ in in_band], [n for _, n in in_band], {}, 0)
        return Choice(least_loaded(narrowed, self._rng), "no_match")


class RoundRobin:
    name = "round_robin"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._next = 0

    def choose(self, candidates: Candidates) -> Choice:
        worker = candidates.workers[self._next % len(candidates.workers)]
        self._next += 1
        return Choice(worker, "round_robin")


class Random:
    name = "random"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Candidates) -> Choice:
        return Choice(self._rng.choice(candidates.workers), "random")


class PowerOfTwo:
    name = "power_of_two"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Candidates) -> Choice:
        if len(candidates.workers) == 1:
            return Choice(candidates.workers[0], "power_of_two")
        i, j = self._rng.sample(range(len(candidates.workers)), 2)
        pair = Candidates(
            [candidates.workers[i], candidates.workers[j]],
            [candidates.loads[i], candidates.loads[j]],
            {},
            0,
        )
        return Choice(least_loaded(pair, self._rng), "power_of_two")


class ShortestQueue:
    name = "shortest_queue"

    def __init__(self, config: PolicyConfig, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Candidates) -> Choice:
        return Choice(least_loaded(candidates, self._rng), "shortest_queue")


_POLICIES: dict[str, Callable[[PolicyConfig, random.Random], Policy]] = {
    "cache_aware": CacheAware,
    "threshold": Threshold,
    "variance": Variance,
    "round_robin": RoundRobin,
    "random": Random,
    "power_of_two": PowerOfTwo,
    "shortest_queue": ShortestQueue,
}


def make_policy(config: PolicyConfig) -> Policy:
    """The policy named in `config`, with its own seeded random generator."""
    return _POLICIES[config.policy](config, random.Random(config.seed))
