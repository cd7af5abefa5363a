"""The event log: the short lines dashboards show ("worker 1: healthy on ...", "... added").

One per launch (or per router without a launcher), made once and handed to whoever has
something to say: the launch cluster and its supervisor, the router server, its health checks
and KV view, the router state's worker add/remove, service discovery. `record(message)` writes
the line to the log (the router's logger, INFO unless told) and keeps it in a bounded buffer
(`size`, 200 lines by default, oldest dropped); `recent(n)` gives the newest `n` (50) for a
screen or `/debug/stats`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator

EVENTS_KEPT = 200  # lines in memory; the log file has them all
EVENTS_SHOWN = 50  # lines a dashboard frame carries

log = logging.getLogger("sglang_dp.router")


class EventLog:
    """A bounded buffer of event lines, each also written to the log."""

    def __init__(self, size: int = EVENTS_KEPT, logger: logging.Logger = log) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=size)
        self._log = logger

    def record(self, message: str, level: int = logging.INFO) -> None:
        self._log.log(level, "%s", message)
        self._lines.append(message)

    def recent(self, n: int = EVENTS_SHOWN) -> list[str]:
        """The newest `n` lines, oldest first."""
        return list(self._lines)[-n:] if n > 0 else []

    def __iter__(self) -> Iterator[str]:
        return iter(self._lines)

    def __len__(self) -> int:
        return len(self._lines)
