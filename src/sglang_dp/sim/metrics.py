"""Prometheus metrics of the simulated worker under SGLang's `sglang:` names.

Gauges and counters are read from the scheduler when scraped (a custom collector: nothing is
updated on the request path); the two latency histograms are observed when a request finishes.
Latencies are in simulated seconds. Everything lives in a registry owned by the worker (no
global registry).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sglang_dp.sim.scheduler import Scheduler, SimRequest

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300)


class _SchedulerCollector(Collector):
    def __init__(self, scheduler: Scheduler, model: str) -> None:
        self._s = scheduler
        self._model = model

    def collect(self) -> Iterator[Metric]:
        s, labels = self._s, ["model_name"]
        stats = s.stats
        values = [self._model]
        gauges = [
            ("sglang:num_running_reqs", "Running requests.", len(s.running)),
            ("sglang:num_queue_reqs", "Waiting requests.", len(s.waiting)),
            ("sglang:token_usage", "Fraction of KV tokens in use.", s.used_tokens / s.capacity),
            (
                "sglang:cache_hit_rate",
                "Prefix cache hit rate of the last prefill batch.",
                stats.last_batch_cache_hit_rate,
            ),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            yield g
        counters = [
            ("sglang:prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens),
            (
                "sglang:cached_tokens",
                "Prompt tokens served from the prefix cache.",
                stats.cached_tokens,
            ),
            ("sglang:generation_tokens", "Tokens generated.", stats.generation_tokens),
            ("sglang:num_requests", "Requests finished.", stats.finished_requests),
        ]
        for name, doc, value in counters:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            yield c


class SimMetrics:
    """The worker's registry: scheduler gauges/counters plus latency histograms."""

    def __init__(self, scheduler: Scheduler, model: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SchedulerCollector(scheduler, model))
        self._ttft = Histogram(
            "sglang:time_to_first_token_seconds",
            "Time to first token.",
            ["model_name"],
            buckets=_BUCKETS,
            registry=self.registry,
        ).labels(model)
        self._e2e = Histogram(
            "sglang:e2e_request_latency_seconds",
            "End-to-end latency.",
            ["model_name"],
            buckets=_BUCKETS,
            registry=self.registry,
        ).labels(model)

    def observe(self, req: SimRequest) -> None:
        """A request finished normally."""
        if req.first_token_time is not None:
            self._ttft.observe(req.first_token_time - req.arrival)
        if req.finish_time is not None:
            self._e2e.observe(req.finish_time - req.arrival)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
