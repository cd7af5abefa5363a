"""Prometheus metrics of the router (`/metrics`), names `sglang_dp_…`.

Counters updated on the request path are plain prometheus-client objects; everything the engine
already counts (in flight, decisions by reason, predicted vs cached tokens, tree sizes, health) is
read from `engine.snapshot()` at scrape time by a collector, so the request path pays nothing
for it. One registry per router: no global state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sglang_dp.router.engine import RoutingEngine

LATENCY_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
ROUTING_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3)


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


class RouterMetrics:
    """The router's registry and the metrics updated on the request path."""

    def __init__(self, engine: RoutingEngine, clock: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sglang_dp_requests",
            "Requests answered, by worker ('' when none was reached) and HTTP status.",
            ["worker", "status"],
            registry=self.registry,
        )
        self.routing_latency = Histogram(
            "sglang_dp_routing_latency_seconds",
            "Time to choose a worker (match + policy + speculation).",
            buckets=ROUTING_BUCKETS,
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "sglang_dp_upstream_latency_seconds",
            "Time from forwarding a request to the end of the worker's answer.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine, clock))

    def render(self) -> bytes:
        return generate_latest(self.registry)
