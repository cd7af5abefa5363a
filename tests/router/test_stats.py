"""router.stats: the stats payload is a pure read, and imbalance events come from the watch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from sglang_dp.eventlog import EventLog
from sglang_dp.router.engine import EngineConfig, RoutingEngine
from sglang_dp.router.health import WorkerMonitor
from sglang_dp.router.policies import PolicyConfig
from sglang_dp.router.stats import ImbalanceWatch, stats_payload, watch_imbalance
from tests.processes import until


@dataclass
class Source:
    engine: RoutingEngine
    monitor: WorkerMonitor
    clock: Callable[[], float] = lambda: 10.0
    started_at: float = 4.0
    events: EventLog = field(default_factory=lambda: EventLog(size=9))


def imbalanced_engine() -> RoutingEngine:
    """cache_aware with thresholds so low that any load gap overrides the cache."""
    policy = PolicyConfig("cache_aware", balance_abs_threshold=0, balance_rel_threshold=1.0)
    engine = RoutingEngine(EngineConfig(policy))
    engine.add_worker("http://a")
    engine.add_worker("http://b")
    return engine


def test_the_imbalance_watch_reports_each_change_of_mode_once() -> None:
    watch = ImbalanceWatch()
    assert watch.update(0) is None
    assert "imbalance mode" in (watch.update(3) or "")
    assert watch.update(5) is None  # still imbalanced: no new event
    assert watch.update(5) == "balanced again: routing by cache match"
    assert watch.update(5) is None


def test_stats_payload_is_a_pure_read() -> None:
    engine = imbalanced_engine()
    for i in range(4):
        engine.route(f"prompt {i}", now=1.0)
    source = Source(engine, WorkerMonitor(engine, interval=5, timeout=5))
    source.events.record("something happened")
    first, second = stats_payload(source), stats_payload(source)
    assert first == second
    assert first["events"] == ["something happened"]
    assert first["uptime_s"] == 6.0 and first["routed"] == 4
    assert [w["state"] for w in first["workers"]] == ["unknown", "unknown"]


def test_watch_imbalance_records_events_without_any_reader() -> None:
    engine = imbalanced_engine()
    events: list[str] = []

    async def scenario() -> None:
        watching = asyncio.ensure_future(watch_imbalance(engine, events.append, 0.01))
        try:
            sent = iter(range(10**6))

            def route_one() -> list[str]:  # all on one prompt's worker: the loads drift apart
                engine.route("the same long shared prefix " * 4 + str(next(sent)), now=1.0)
                return events

            await until(route_one, what="the imbalance event")
            assert events[0].startswith("imbalance mode")
            await until(lambda: len(events) == 2, what="balanced again")
            assert events[1] == "balanced again: routing by cache match"
        finally:
            watching.cancel()

    asyncio.run(scenario())
