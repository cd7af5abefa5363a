"""Prometheus metrics of the router (`/metrics`), names `sglang_dp_…`.

The request path pays next to nothing: answers are counted in a plain dict (`count`), latencies
in plain histogram buckets (`Buckets.observe`: a bisect and two additions), and everything the
engine already counts (in flight, decisions by reason, predicted vs cached tokens, tree sizes,
health) is read from `engine.snapshot()`. Collectors turn all of it into metric families at
scrape time, so prometheus-client is never called per request. One registry per router: no
global state. Everything runs on the router's event loop, so nothing needs a lock.

    sglang_dp_requests_total{worker, status}        answers ('' worker: none was reached)
    sglang_dp_routing_latency_seconds               histogram: choosing a worker
    sglang_dp_upstream_latency_seconds              histogram: forward to end of answer
    sglang_dp_{in_flight, worker_healthy, tree_size, predicted_tokens, cached_tokens,
               prompt_tokens, corrections, kv_events_speculated_routes}{worker},
    sglang_dp_decisions_total{reason},
    sglang_dp_tree_total_size                       from the engine's snapshot
    sglang_dp_tree_memory_bytes                     from the engine's snapshot
    sglang_dp_{admitted_in_flight, queue_length}, sglang_dp_queued_total,
    sglang_dp_shed_total{reason}, sglang_dp_circuit_breaker_state{worker, state},
    sglang_dp_circuit_breaker_opens_total{worker}   admission control (`watch_admission`)
    sglang_dp_kv_events_{trusted, last_seq, blocks, gaps_filled_total, gaps_lost_total,
               rejected_total}{worker}, sglang_dp_kv_event_batches_total,
    sglang_dp_kv_event_batches_per_second, sglang_dp_kv_events_total{worker},
    sglang_dp_kv_index_blocks                       KV events (`watch_kv_events`)
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sglang_dp.router.admission import Admission
from sglang_dp.router.breaker import Breakers
from sglang_dp.router.engine import RoutingEngine

Clock = Callable[[], float]

LATENCY_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
ROUTING_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3)


class Buckets:
    """A histogram as plain counts: one per upper bound (`le`), plus one above them all."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(float(bound) for bound in bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # not cumulative; the last one is +Inf's
        self.total = 0.0

    def observe(self, value: float) -> None:
        # the first bound >= value: Prometheus buckets are `le` (less than or equal)
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative = list(itertools.accumulate(self.counts))
        # `le` as prometheus-client writes it for bounds like these (repr of the float)
        buckets = [(repr(bound), float(n)) for bound, n in zip(self.bounds, cumulative)]
        buckets.append(("+Inf", float(cumulative[-1])))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


class _RequestCollector(Collector):
    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        requests = CounterMetricFamily(
            "sglang_dp_requests",
            "Requests answered, by worker ('' when none was reached) and HTTP status.",
            labels=["worker", "status"],
        )
        for (worker, status), count in metrics.requests.items():
            requests.add_metric([worker, str(status)], count)
        yield requests
        yield metrics.routing_latency.family(
            "sglang_dp_routing_latency_seconds",
            "Time to choose a worker (match + policy + speculation).",
        )
        yield metrics.upstream_latency.family(
            "sglang_dp_upstream_latency_seconds",
            "Time from forwarding a request to the end of the worker's answer.",
        )


class _EngineCollector(Collector):
    def __init__(self, engine: RoutingEngine, clock: Callable[[], float]) -> None:
        self._engine = engine
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        snap = self._engine.snapshot(self._clock())
        per_worker: list[tuple[str, str, type, Callable[..., float]]] = [
            (
                "in_flight",
                "Requests in flight from this router.",
                GaugeMetricFamily,
                lambda w: w.in_flight,
            ),
            (
                "worker_healthy",
                "1 when the worker takes requests.",
                GaugeMetricFamily,
                lambda w: float(w.healthy),
            ),
            (
                "tree_size",
                "Key elements the router believes the worker caches.",
                GaugeMetricFamily,
                lambda w: w.tree_size,
            ),
            (
                "predicted_tokens",
                "Cached tokens the tree predicted.",
                CounterMetricFamily,
                lambda w: w.predicted_tokens,
            ),
            (
                "cached_tokens",
                "Cached tokens the worker reported.",
                CounterMetricFamily,
                lambda w: w.cached_tokens,
            ),
            (
                "prompt_tokens",
                "Prompt tokens the worker reported.",
                CounterMetricFamily,
                lambda w: w.prompt_tokens,
            ),
            (
                "corrections",
                "Evictions detected from cached_tokens and applied to the tree.",
                CounterMetricFamily,
                lambda w: w.corrections,
            ),
            (
                "kv_events_speculated_routes",
                "Routed on pages its KV events had not confirmed yet.",
                CounterMetricFamily,
                lambda w: w.speculated,
            ),
        ]
        for name, doc, kind, value in per_worker:
            family = kind(f"sglang_dp_{name}", doc, labels=["worker"])
            for worker in snap.workers:
                family.add_metric([worker.url], value(worker))
            yield family
        decisions = CounterMetricFamily(
            "sglang_dp_decisions", "Routing decisions by reason.", labels=["reason"]
        )
        for reason, count in snap.reasons:
            decisions.add_metric([reason], count)
        yield decisions
        yield GaugeMetricFamily(
            "sglang_dp_tree_total_size", "Key elements stored in the tree.", value=snap.tree_size
        )
        yield GaugeMetricFamily(
            "sglang_dp_tree_memory_bytes",
            "Estimated memory of the tree (held to --max-tree-memory-mb).",
            value=snap.tree_memory,
        )


class _AdmissionCollector(Collector):
    def __init__(
        self, admission: Admission[Any], breakers: Breakers, engine: RoutingEngine, clock: Clock
    ) -> None:
        self._admission = admission
        self._breakers = breakers
        self._engine = engine
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        gate = self._admission
        yield GaugeMetricFamily(
            "sglang_dp_admitted_in_flight",
            "Requests holding an admission slot (--max-concurrent-requests).",
            value=gate.in_flight,
        )
        yield GaugeMetricFamily(
            "sglang_dp_queue_length",
            "Requests waiting for a slot (--queue-size).",
            value=gate.waiting,
        )
        yield CounterMetricFamily(
            "sglang_dp_queued", "Requests that had to wait for a slot.", value=gate.queued
        )
        shed = CounterMetricFamily(
            "sglang_dp_shed",
            "Requests refused: queue_full and overloaded (429), queue_timeout (408).",
            labels=["reason"],
        )
        shed.add_metric(["queue_full"], gate.refused_full)
        shed.add_metric(["overloaded"], gate.refused_overloaded)
        shed.add_metric(["queue_timeout"], gate.timed_out)
        yield shed
        now = self._clock()
        state = GaugeMetricFamily(
            "sglang_dp_circuit_breaker_state",
            "1 for the worker's circuit breaker state (closed, open, half_open).",
            labels=["worker", "state"],
        )
        opens = CounterMetricFamily(
            "sglang_dp_circuit_breaker_opens", "Times the breaker opened.", labels=["worker"]
        )
        for worker in self._engine.workers:
            state.add_metric([worker, self._breakers.state(worker, now).value], 1)
            opens.add_metric([worker], self._breakers.opens(worker))
        yield state
        yield opens


# KV events stream health (`kv_view.KvView.status()`): field -> (metric, kind, help)
_KV_FIELDS = (
    ("trusted", "sglang_dp_kv_events_trusted", "gauge", "1 while the worker's events are whole."),
    ("last_seq", "sglang_dp_kv_events_last_seq", "gauge", "Last event batch seq applied."),
    ("events_per_s", "sglang_dp_kv_event_batches_per_second", "gauge", "Batches received."),
    ("blocks", "sglang_dp_kv_events_blocks", "gauge", "Blocks the worker's events say it holds."),
    ("batches", "sglang_dp_kv_event_batches", "counter", "Event batches applied."),
    ("events", "sglang_dp_kv_events", "counter", "Events applied."),
    ("gaps_filled", "sglang_dp_kv_events_gaps_filled", "counter", "Seq gaps repaired by replay."),
    ("gaps_lost", "sglang_dp_kv_events_gaps_lost", "counter", "Seq gaps replay could not fill."),
    ("rejected", "sglang_dp_kv_events_rejected", "counter", "Messages that could not be used."),
)


class _KvEventsCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        workers: dict[str, dict[str, Any]] = status["workers"]
        for field, name, kind, doc in _KV_FIELDS:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, doc, labels=["worker"]
            )
            for worker, record in workers.items():
                value = record.get(field)
                if value is not None:
                    family.add_metric([worker], float(value))
            yield family
        yield GaugeMetricFamily(
            "sglang_dp_kv_index_blocks", "Blocks in the KV events index.", status["index_blocks"]
        )


class RouterMetrics:
    """The router's registry and the plain counts the request path updates."""

    def __init__(self, engine: RoutingEngine, clock: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests: dict[tuple[str, int], int] = {}  # (worker, HTTP status) -> answers
        self.routing_latency = Buckets(ROUTING_BUCKETS)
        self.upstream_latency = Buckets(LATENCY_BUCKETS)
        self.registry.register(_RequestCollector(self))
        self.registry.register(_EngineCollector(engine, clock))
        self._engine = engine

    def watch_admission(self, admission: Admission[Any], breakers: Breakers, clock: Clock) -> None:
        """Also export the queue, the shed counts and the circuit breakers."""
        self.registry.register(_AdmissionCollector(admission, breakers, self._engine, clock))

    def watch_kv_events(self, status: Callable[[], dict[str, Any]]) -> None:
        """Also export the KV event streams' health (`KvView.status`)."""
        self.registry.register(_KvEventsCollector(status))

    def count(self, worker: str, status: int) -> None:
        """One answer to a client: from `worker` ('' when none was reached), with `status`."""
        key = (worker, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)
