"""Is a worker's KV event stream alive? Silence and rate of one stream (pure; time is a parameter).

A stream can fail without a single bad message: a wrong topic or endpoint, a publisher that
stopped, a high-water mark dropping everything. The index then still looks whole — and stale.
`StreamWatch.tick(batches, uncached, now)` is called about once a second per subscribed worker
with two cumulative counters: event batches received, and prompt tokens the worker reported
answering without a cache hit (each one becomes a stored page, so each must be published).
Silent: at least `SILENT_TOKENS` new uncached tokens answered since the last batch arrived, the
first of them more than `SILENT_S` (2 s) ago, and still no batch. The rate (`events_per_s`) is the
batches of the last tick's interval, smoothed over `RATE_WINDOW_S`.
"""

from __future__ import annotations

SILENT_S = 2.0  # > SGLang's publishing delay (a batch per scheduler step) by far
SILENT_TOKENS = 64  # a few pages of new prompt: surely stored, so surely published
RATE_WINDOW_S = 5.0


class StreamWatch:
    """One worker's stream: silence and rate (see the module docstring)."""

    def __init__(self, now: float) -> None:
        self._batches = 0
        self._uncached: int | None = None  # uncached tokens answered when the last batch came
        self._fresh_since: float | None = None  # first unpublished answer seen since then
        self._last = now
        self.batches_per_s = 0.0

    def tick(self, batches: int, uncached: int, now: float) -> bool:
        """Update from the cumulative counters; True when the stream is silent."""
        elapsed = now - self._last
        if elapsed > 0:
            weight = min(1.0, elapsed / RATE_WINDOW_S)
            rate = max(0, batches - self._batches) / elapsed
            self.batches_per_s += weight * (rate - self.batches_per_s)
        self._last = now
        if batches != self._batches or self._uncached is None:
            self._batches, self._uncached, self._fresh_since = batches, uncached, None
            return False
        if uncached - self._uncached < SILENT_TOKENS:
            return False
        if self._fresh_since is None:
            self._fresh_since = now
        return now - self._fresh_since >= SILENT_S

    def reset(self, batches: int, uncached: int) -> None:
        """Start over (after the silence was acted upon): the next silence is a new one."""
        self._batches, self._uncached, self._fresh_since = batches, uncached, None
