"""What a router shows of itself to dashboards and `/debug/stats`, and its imbalance watch.

No web framework here: the launcher's dashboard imports this module, not the application.

- `stats_payload(source)`: the engine snapshot with every worker's health and the recent events.
  A pure read: two pollers (the dashboard and `sglang-dp top`) see the same thing.
- `ImbalanceWatch.update(count)`: turns the count of imbalanced decisions (reasons "imbalanced"
  and "imbalanced_hit") into events, when cache_aware starts overriding the cache to balance load
  and when it stops. `watch_imbalance(engine, record, interval)` feeds it from the engine every
  `interval` s (1 s, as the router runs it), whoever reads the stats and however often.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

from sglang_dp.eventlog import EventLog
from sglang_dp.router.engine import RoutingEngine, WorkerStats
from sglang_dp.router.health import WorkerMonitor

IMBALANCE_INTERVAL_S = 1.0
IMBALANCED = ("imbalanced", "imbalanced_hit")


class StatsSource(Protocol):
    """What stats_payload reads (the router's RouterState)."""

    @property
    def engine(self) -> RoutingEngine: ...
    @property
    def monitor(self) -> WorkerMonitor: ...
    @property
    def clock(self) -> Callable[[], float]: ...
    @property
    def started_at(self) -> float: ...
    @property
    def events(self) -> EventLog: ...


def stats_payload(source: StatsSource) -> dict[str, Any]:
    """The engine snapshot with worker health: `/debug/stats`, and what dashboards draw."""
    snap = source.engine.snapshot(source.clock())
    return {
        "policy": snap.policy,
        "now": snap.now,
        "uptime_s": round(snap.now - source.started_at, 3),
        "routed": snap.routed,
        "hit_rate": round(snap.hit_rate, 4),
        "tree_size": snap.tree_size,
        "tree_nodes": snap.tree_nodes,
        "max_tree_size": snap.max_tree_size,
        "elements_per_token": round(snap.elements_per_token, 4),
        "reasons": dict(snap.reasons),
        "workers": [
            worker_stats_dict(w) | {"state": health_state(source.monitor, w.url)}
            for w in snap.workers
        ],
        "events": source.events.recent(),
    }


def worker_stats_dict(stats: WorkerStats) -> dict[str, Any]:
    """One worker's statistics as JSON-ready values."""
    record = dataclasses.asdict(stats)
    record["budget"] = None if math.isinf(stats.budget) else int(stats.budget)
    record["hit_rate"] = round(stats.hit_rate, 4)
    record["predicted_rate"] = round(stats.predicted_rate, 4)
    return record


def health_state(monitor: WorkerMonitor, url: str) -> str:
    health = monitor.health_of(url)
    return health.state if health else "unknown"


class ImbalanceWatch:
    """Events on a change between balancing and routing by cache (see the module docstring)."""

    def __init__(self) -> None:
        self.seen = 0
        self.active = False

    def update(self, count: int) -> str | None:
        grew, self.seen = count - self.seen, count
        if grew > 0 and not self.active:
            self.active = True
            return (
                f"imbalance mode: loads drifted apart, {grew} request(s) sent away from the "
                "overloaded worker holding their prefix"
            )
        if grew <= 0 and self.active:
            self.active = False
            return "balanced again: routing by cache match"
        return None


def imbalanced_count(engine: RoutingEngine) -> int:
    return sum(engine.decisions(reason) for reason in IMBALANCED)


async def watch_imbalance(
    engine: RoutingEngine,
    record: Callable[[str], None],
    interval: float = IMBALANCE_INTERVAL_S,
) -> None:
    """Every `interval` s, an event when the router enters or leaves imbalance mode."""
    watch = ImbalanceWatch()
    watch.seen = imbalanced_count(engine)  # what came before is not news
    while True:
        await asyncio.sleep(interval)
        message = watch.update(imbalanced_count(engine))
        if message:
            record(message)
