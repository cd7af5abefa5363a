"""Router metrics: plain counts on the request path, Prometheus families at scrape time.

The exposition is parsed back with prometheus-client's own parser, so the checks are on what a
Prometheus server would read (names, labels, cumulative buckets), not on the text layout.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sglang_dp.router.engine import RoutingEngine
from sglang_dp.router.metrics import LATENCY_BUCKETS, ROUTING_BUCKETS, Buckets, RouterMetrics


def scrape(metrics: RouterMetrics) -> dict[str, list[Sample]]:
    """Samples by family name, as a Prometheus server would parse `/metrics`."""
    text = metrics.render().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def metrics_with(*workers: str) -> RouterMetrics:
    engine = RoutingEngine()
    for url in workers:
        engine.add_worker(url)
    return RouterMetrics(engine, clock=lambda: 0.0)


def histogram(samples: list[Sample]) -> tuple[dict[str, float], float, float]:
    """(cumulative count per `le`, _count, _sum) of one histogram family."""
    buckets = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    count = next(s.value for s in samples if s.name.endswith("_count"))
    total = next(s.value for s in samples if s.name.endswith("_sum"))
    return buckets, count, total


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    buckets = Buckets((0.1, 1.0, 10.0))
    for value in (0.1, 0.5, 1.0, 10.0, 11.0):
        buckets.observe(value)
    assert buckets.counts == [1, 2, 1, 1]  # le 0.1, le 1, le 10, above them all
    assert buckets.count == 5
    assert buckets.total == 22.6


def test_bounds_are_sorted_floats() -> None:
    assert Buckets((5, 0.5, 1)).bounds == (0.5, 1.0, 5.0)


@given(st.lists(st.floats(min_value=0, max_value=400, allow_nan=False), max_size=50))
def test_buckets_match_a_brute_force_count(values: list[float]) -> None:
    buckets = Buckets(LATENCY_BUCKETS)
    for value in values:
        buckets.observe(value)
    bounds = sorted(float(b) for b in LATENCY_BUCKETS)
    for i, bound in enumerate(bounds):
        assert sum(buckets.counts[: i + 1]) == sum(v <= bound for v in values)
    assert buckets.count == len(values)


def test_latency_histograms_are_exported_cumulative_with_count_and_sum() -> None:
    metrics = metrics_with("http://w0:1")
    for seconds in (3e-6, 1.5e-5, 1.5e-5, 0.01):
        metrics.routing_latency.observe(seconds)
    metrics.upstream_latency.observe(0.002)
    families = scrape(metrics)
    buckets, count, total = histogram(families["sglang_dp_routing_latency_seconds"])
    assert list(buckets) == [*(str(float(b)) for b in ROUTING_BUCKETS), "+Inf"]
    assert buckets["5e-06"] == 1
    assert buckets["1e-05"] == 1
    assert buckets["2e-05"] == 3
    assert buckets["0.005"] == 3
    assert buckets["+Inf"] == count == 4
    assert abs(total - (3e-6 + 3e-5 + 0.01)) < 1e-12
    buckets, count, total = histogram(families["sglang_dp_upstream_latency_seconds"])
    assert buckets["0.001"] == 0 and buckets["0.005"] == 1 and buckets["+Inf"] == 1
    assert (count, total) == (1, 0.002)


def test_histograms_exist_before_the_first_request() -> None:
    families = scrape(metrics_with())
    for name in ("sglang_dp_routing_latency_seconds", "sglang_dp_upstream_latency_seconds"):
        buckets, count, total = histogram(families[name])
        assert set(buckets.values()) == {0.0} and (count, total) == (0, 0)


def test_requests_are_counted_by_worker_and_status() -> None:
    metrics = metrics_with("http://w0:1", "http://w1:1")
    for worker, status in [("http://w0:1", 200)] * 3 + [("http://w1:1", 503), ("", 400)]:
        metrics.count(worker, status)
    counted = {
        (s.labels["worker"], s.labels["status"]): s.value
        for s in scrape(metrics)["sglang_dp_requests"]
        if s.name == "sglang_dp_requests_total"
    }
    assert counted == {("http://w0:1", "200"): 3, ("http://w1:1", "503"): 1, ("", "400"): 1}


def test_engine_figures_are_read_at_scrape_time() -> None:
    metrics = metrics_with("http://w0:1", "http://w1:1")
    families = scrape(metrics)
    in_flight = {s.labels["worker"]: s.value for s in families["sglang_dp_in_flight"]}
    assert in_flight == {"http://w0:1": 0, "http://w1:1": 0}
    healthy = {s.labels["worker"]: s.value for s in families["sglang_dp_worker_healthy"]}
    assert healthy == {"http://w0:1": 1, "http://w1:1": 1}
    assert "sglang_dp_decisions" in families and "sglang_dp_tree_total_size" in families
    assert "sglang_dp_tree_memory_bytes" in families
