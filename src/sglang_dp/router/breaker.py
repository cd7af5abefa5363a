"""Per-worker circuit breakers: a worker that keeps failing leaves routing for a cool-down, even
while its `/health` answers (a worker whose health route is fine but whose generation fails).

    closed ──(failure_threshold failures in a row)──▶ open ──(timeout_secs later)──▶ half-open
      ▲                                                 ▲                               │
      └──────(success_threshold successes in a row)─────┼───────────(any failure)───────┘

- closed: the worker routes normally; a success resets the count of failures in a row;
- open: the worker is excluded from routing (`blocked(now)`, passed to `engine.route`'s
  `exclude`) until `timeout_secs` have passed since it opened;
- half-open: real requests are routed to it again (the probes: no synthetic traffic), at most
  `success_threshold` of them without an answer at a time (`routed` counts them; a worker with
  that many out is excluded like an open one, for a cool-down at most if none ever answers);
  the first failure opens it again for another cool-down, `success_threshold` successes in a
  row close it.

Settings (SMG's names and defaults): `--cb-failure-threshold` 10, `--cb-success-threshold` 3,
`--cb-timeout-duration-secs` 60, `--disable-circuit-breaker`.

Pure: time is a parameter, no I/O. One loop owns it; `blocked` is O(1) while every breaker is
closed (the request path asks it on every routing decision).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sglang_dp.options import option

_NONE: frozenset[str] = frozenset()


class State(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    cb_failure_threshold: int = option(
        10, "Consecutive failed requests that open a worker's circuit breaker."
    )
    cb_success_threshold: int = option(
        3, "Consecutive successes of a half-open worker that close its breaker again."
    )
    cb_timeout_duration_secs: float = option(
        60.0, "Seconds an open breaker keeps its worker out of routing before probing it."
    )
    disable_circuit_breaker: bool = option(False, "Never take a failing worker out of routing.")

    def __post_init__(self) -> None:
        if self.cb_failure_threshold < 1 or self.cb_success_threshold < 1:
            raise ValueError("--cb-failure-threshold and --cb-success-threshold must be >= 1")
        if self.cb_timeout_duration_secs <= 0:
            raise ValueError("--cb-timeout-duration-secs must be positive")


class _Breaker:
    __slots__ = ("failures", "opened_at", "opens", "probes", "state", "successes")

    def __init__(self) -> None:
        self.state = State.CLOSED
        self.failures = 0  # in a row
        self.successes = 0  # in a row, while half-open
        self.opened_at = 0.0
        self.opens = 0  # times it opened (for statistics)
        self.probes = 0  # requests routed while half-open and not answered yet


class Breakers:
    """The circuit breakers of all workers; see the module docstring."""

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self._breakers: dict[str, _Breaker] = {}
        self._open: dict[str, float] = {}  # open breakers: worker -> when it may be probed
        # half-open ones with every probe out: worker -> when to stop waiting for their answers
        self._probing: dict[str, float] = {}

    def failure(self, worker: str, now: float) -> None:
        """A request to `worker` failed (the worker's fault: refused, reset, timed out, 5xx)."""
        if self.config.disable_circuit_breaker:
            return
        breaker = self._get(worker)
        self._advance(worker, breaker, now)
        breaker.successes = 0
        breaker.failures += 1
        if breaker.state is State.HALF_OPEN or (
            breaker.state is State.CLOSED and breaker.failures >= self.config.cb_failure_threshold
        ):
            self._probing.pop(worker, None)
            breaker.state = State.OPEN
            breaker.opened_at = now
            breaker.opens += 1
            self._open[worker] = now + self.config.cb_timeout_duration_secs

    def success(self, worker: str, now: float) -> None:
        """`worker` answered a request."""
        breaker = self._breakers.get(worker)
        if breaker is None:  # never failed: nothing to count (the common case)
            return
        self._advance(worker, breaker, now)
        breaker.failures = 0
        if breaker.state is State.HALF_OPEN:
            breaker.successes += 1
            breaker.probes = max(0, breaker.probes - 1)
            self._probing.pop(worker, None)  # a probe answered: room for another
            if breaker.successes >= self.config.cb_success_threshold:
                breaker.state = State.CLOSED
                breaker.successes = 0
        if breaker.state is State.CLOSED and not breaker.opens:
            del self._breakers[worker]  # back to the common case

    def routed(self, worker: str, now: float) -> None:
        """A request was routed to `worker`: while half-open, one of its limited probes."""
        breaker = self._breakers.get(worker)
        if breaker is None or breaker.state is not State.HALF_OPEN:
            return
        breaker.probes += 1
        if breaker.probes >= self.config.cb_success_threshold:
            self._probing[worker] = now + self.config.cb_timeout_duration_secs

    def blocked(self, now: float) -> frozenset[str]:
        """Workers whose breaker is open at `now`, or half-open with every probe out (to
        exclude from routing)."""
        if not self._open and not self._probing:
            return _NONE
        for worker, until in list(self._open.items()):
            if now >= until:
                self._advance(worker, self._breakers[worker], now)
        for worker, until in list(self._probing.items()):
            if now >= until:  # its probes never answered (clients gone): probe afresh
                self._breakers[worker].probes = 0
                del self._probing[worker]
        if not self._probing:
            return frozenset(self._open)
        return frozenset(self._open).union(self._probing)

    def state(self, worker: str, now: float) -> State:
        breaker = self._breakers.get(worker)
        if breaker is None:
            return State.CLOSED
        self._advance(worker, breaker, now)
        return breaker.state

    def opens(self, worker: str) -> int:
        """How many times `worker`'s breaker has opened."""
        breaker = self._breakers.get(worker)
        return breaker.opens if breaker is not None else 0

    def forget(self, worker: str) -> None:
        """The worker left the router (or was replaced by a fresh process)."""
        self._breakers.pop(worker, None)
        self._open.pop(worker, None)
        self._probing.pop(worker, None)

    def _get(self, worker: str) -> _Breaker:
        breaker = self._breakers.get(worker)
        if breaker is None:
            breaker = self._breakers[worker] = _Breaker()
        return breaker

    def _advance(self, worker: str, breaker: _Breaker, now: float) -> None:
        """An open breaker whose cool-down is over becomes half-open."""
        if breaker.state is State.OPEN and now >= self._open[worker]:
            breaker.state = State.HALF_OPEN
            breaker.successes = 0
            breaker.failures = 0
            breaker.probes = 0
            del self._open[worker]
