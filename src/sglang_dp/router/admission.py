"""Admission control: a cap on requests in flight, a bounded FIFO queue with a timeout, and
refusal at once when waiting would not help.

    enter(ticket, now, saturated) ─▶ ADMIT        in flight < cap and nobody waiting
                                  ─▶ OVERLOADED   at the cap, `saturated()` and the wait
                                                  estimated over the timeout: 429 at once
                                  ─▶ QUEUE_FULL   at the cap, the queue full: 429 at once
                                  ─▶ QUEUED       waits (FIFO) for a slot
    leave(now)   a request in flight ended: its slot goes to the oldest waiting ticket, if any
    expire(now)  tickets that waited `queue_timeout_secs`: 408
    cancel(t)    a waiting client went away

A refusal carries `Retry-After` (the shell writes it). Waiting is pointless when it would end in
a 408 anyway: at the cap, when every healthy worker is saturated (`saturated`, asked only then:
it costs the shell a look at every worker) and the queue ahead would not drain within the
timeout at the rate requests have been ending (measured over windows of `RATE_WINDOW_S`), a
request is refused at once rather than queued. A worker is saturated when it has its share of
the cap in flight from this router, or when its own load report (SGLang's `/get_load`, kept in
`LoadReports`) says requests wait in its queue (other clients load it too).

Settings (SMG's names and meaning): `--max-concurrent-requests` 2048 (0: no cap),
`--queue-size` 256 (0: refuse at once at the cap), `--queue-timeout-secs` 30; and ours,
`--load-report-interval-secs` 1. Why these, for one 8-GPU node: see the README ("Overload").

Pure: time is a parameter; tickets are whatever the shell needs to resume a request.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from sglang_dp.options import option

T = TypeVar("T")
RATE_WINDOW_S = 1.0  # requests ended per second, measured over windows this long


class Verdict(Enum):
    ADMIT = "admit"
    QUEUED = "queued"
    QUEUE_FULL = "queue_full"  # 429
    OVERLOADED = "overloaded"  # 429: every healthy worker is saturated


@dataclass(frozen=True)
class AdmissionConfig:
    max_concurrent_requests: int = option(
        2048, "Requests in flight through the router at most (0: no cap); more wait in a queue."
    )
    queue_size: int = option(
        256, "Requests that may wait for a slot (429 beyond; 0: refuse at once at the cap)."
    )
    queue_timeout_secs: float = option(30.0, "Longest wait in the queue (408 after it).")
    load_report_interval_secs: float = option(
        1.0,
        "Seconds between reads of each healthy worker's own load report (SGLang's /get_load: "
        "a worker with requests waiting in its queue counts as saturated); 0: never.",
    )

    def __post_init__(self) -> None:
        if self.max_concurrent_requests < 0 or self.queue_size < 0:
            raise ValueError("--max-concurrent-requests and --queue-size must be >= 0")
        if self.queue_timeout_secs <= 0:
            raise ValueError("--queue-timeout-secs must be positive")
        if self.load_report_interval_secs < 0:
            raise ValueError("--load-report-interval-secs must be >= 0")


class Admission(Generic[T]):
    """The cap and the queue; see the module docstring."""

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        self._cap = self.config.max_concurrent_requests or -1
        self._queue: collections.deque[tuple[float, T]] = collections.deque()
        self.in_flight = 0
        self._rate: float | None = None  # requests ended per second, last window
        self._window_start: float | None = None
        self._window_ended = 0
        # counters, for /metrics and the dashboard
        self.admitted = 0
        self.queued = 0  # requests that had to wait (whether admitted later or not)
        self.refused_full = 0
        self.refused_overloaded = 0
        self.timed_out = 0

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def cap(self) -> int:
        """The cap on requests in flight (0: none)."""
        return max(self._cap, 0)

    def enter(self, ticket: T, now: float, saturated: Callable[[], bool]) -> Verdict:
        """A request arrives; ADMIT means it holds a slot until `leave()`."""
        if self._cap < 0 or (self.in_flight < self._cap and not self._queue):
            self.in_flight += 1
            self.admitted += 1
            return Verdict.ADMIT
        if self._wait_too_long(now) and saturated():
            self.refused_overloaded += 1
            return Verdict.OVERLOADED
        if len(self._queue) >= self.config.queue_size:
            self.refused_full += 1
            return Verdict.QUEUE_FULL
        self._queue.append((now + self.config.queue_timeout_secs, ticket))
        self.queued += 1
        return Verdict.QUEUED

    def leave(self, now: float) -> T | None:
        """A request that held a slot ended; returns the waiting ticket that now holds it."""
        self.in_flight -= 1
        self._measure(now, 1)
        if self._queue and (self._cap < 0 or self.in_flight < self._cap):
            _, ticket = self._queue.popleft()
            self.in_flight += 1
            self.admitted += 1
            return ticket
        return None

    def expire(self, now: float) -> list[T]:
        """The tickets that have waited their whole timeout (they leave the queue)."""
        expired = []
        queue = self._queue
        while queue and queue[0][0] <= now:  # one timeout for all: deadlines in FIFO order
            expired.append(queue.popleft()[1])
        self.timed_out += len(expired)
        return expired

    def cancel(self, ticket: T) -> bool:
        """A waiting ticket leaves the queue (its client went away); False if not waiting."""
        for i, (_, waiting) in enumerate(self._queue):
            if waiting == ticket:
                del self._queue[i]
                return True
        return False

    def estimated_wait(self, now: float) -> float | None:
        """Seconds a request queued now would wait, at the rate requests end (None: unknown)."""
        self._measure(now, 0)
        if self._rate is None:
            return None
        return (len(self._queue) + 1) / self._rate if self._rate > 0 else float("inf")

    def _wait_too_long(self, now: float) -> bool:
        wait = self.estimated_wait(now)
        return wait is not None and wait > self.config.queue_timeout_secs

    def _measure(self, now: float, ended: int) -> None:
        if self._window_start is None:
            self._window_start = now
        self._window_ended += ended
        elapsed = now - self._window_start
        if elapsed >= RATE_WINDOW_S:
            self._rate = self._window_ended / elapsed
            self._window_start, self._window_ended = now, 0

    def next_deadline(self) -> float | None:
        return self._queue[0][0] if self._queue else None


class LoadReports:
    """What each worker last said of its own load (`/get_load`: requests waiting in its queue,
    all its data-parallel ranks together), trusted for `max_age_s` (default: 3 s, three polls)."""

    def __init__(self, max_age_s: float = 3.0) -> None:
        self.max_age_s = max_age_s
        self._waiting: dict[str, tuple[int, float]] = {}

    def record(self, worker: str, waiting: int, now: float) -> None:
        self._waiting[worker] = (waiting, now)

    def forget(self, worker: str) -> None:
        self._waiting.pop(worker, None)

    def waiting(self, worker: str, now: float) -> int | None:
        """Requests waiting in `worker`'s own queue, or None without a recent report."""
        report = self._waiting.get(worker)
        if report is None or now - report[1] > self.max_age_s:
            return None
        return report[0]

    def queueing(self, worker: str, now: float) -> bool:
        """The worker's own report says requests wait in its queue."""
        return bool(self.waiting(worker, now))
