"""Figures from hand-made records, JSON output and the rendered table (pure)."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from sglang_dp.bench.config import BenchConfig
from sglang_dp.bench.protocol import ReplyParser
from sglang_dp.bench.report import (
    BenchResult,
    CpuUsage,
    RequestRecord,
    compute_figures,
    percentile,
    render_result,
    result_json,
)


def record(
    sent: float,
    times: list[float],
    done: float,
    *,
    prompt: int = 100,
    cached: int | None = 50,
    worker: str | None = "http://w1",
    error: str | None = None,
    cancelled: bool = False,
) -> RequestRecord:
    reply = ReplyParser("generate")
    reply.texts = ["x"] * len(times)
    reply.text_times = times
    reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens = prompt, cached, 10
    reply.done = error is None
    if error:
        reply.fail(error, "said so")
    return RequestRecord(0, 0, sent, "p", reply, done, worker, cancelled, prompt_len=99)


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def figures_of_a_small_run() -> BenchResult:
    records = [
        record(0.0, [0.1, 0.2, 0.4], 0.5),
        record(0.0, [0.3, 0.4], 1.0, prompt=300, cached=250, worker="http://w2"),
        record(0.5, [], 0.6, error="http 503"),
        record(0.6, [], 0.7, error="http 503"),
        record(0.7, [], 0.8, error="timeout"),
        record(0.8, [0.9], 2.0, cancelled=True),
        record(0.9, [1.0], 1.5, cached=None),  # a server that reports no cached tokens
    ]
    figures = compute_figures(
        records,
        planned=10,
        duration_s=2.0,
        oracle_hits=320,
        oracle_tokens=500,
        cpu=CpuUsage(95.0, 99.0, 0.7),
    )
    return BenchResult(BenchConfig(), "http://router", figures, tuple(records))


def test_counts_rates_and_latencies() -> None:
    f = figures_of_a_small_run().figures
    assert (f.sent, f.completed, f.failed, f.cancelled, f.not_sent) == (7, 3, 3, 1, 3)
    assert f.failures == {"http 503": 2, "timeout": 1}
    assert f.failure_examples == {"http 503": "said so", "timeout": "said so"}
    assert f.prompt_tokens == 500 and f.completion_tokens == 30
    assert f.request_throughput == 1.5 and f.input_throughput == 250
    assert f.output_throughput == 15 and f.total_throughput == 265
    # Hit rate only over requests that reported cached tokens: (50 + 250) / (100 + 300).
    assert f.cached_tokens == 300 and f.hit_rate == 0.75
    assert f.oracle_hit_rate == 0.64 and f.oracle_share == pytest.approx(0.75 / 0.64)
    assert f.ttft_ms is not None and f.ttft_ms.p50 == pytest.approx(100)
    assert f.ttft_ms.mean == pytest.approx(500 / 3)  # 0.1, 0.3, 0.1 s
    assert f.e2e_ms is not None and f.e2e_ms.p99 == pytest.approx(992)  # 0.5, 0.6, 1.0 s
    # Gaps pooled over streams: 0.1, 0.2 (first), 0.1 (second).
    assert f.itl_ms is not None and f.itl_ms.p50 == pytest.approx(100)
    assert f.per_worker == {"http://w1": 2, "http://w2": 1}
    assert f.cpu_saturated and f.cpu_mean_percent == 95.0
    assert f.client_cpu_ms_per_request == pytest.approx(100)


def test_nothing_done() -> None:
    f = compute_figures([], planned=5, duration_s=0.0, oracle_hits=0, oracle_tokens=0)
    assert f.completed == 0 and f.not_sent == 5 and f.hit_rate is None
    assert f.ttft_ms is None and f.request_throughput == 0 and not f.cpu_saturated
    assert f.oracle_share is None and f.client_cpu_ms_per_request is None


def test_json_has_every_figure_and_the_configuration() -> None:
    result = figures_of_a_small_run()
    data = json.loads(json.dumps(result_json(result), allow_nan=False))
    assert data["url"] == "http://router" and data["completed"] == 3
    assert data["ttft_ms"]["p50"] == pytest.approx(100)
    assert data["config"]["num_groups"] == 64 and data["config"]["workload"] == "shared-prefix"
    assert data["per_worker"] == {"http://w1": 2, "http://w2": 1}


def test_table_shows_the_figures_and_warns_when_saturated() -> None:
    console = Console(width=140, record=True)
    console.print(render_result(figures_of_a_small_run()))
    text = console.export_text()
    for expected in (
        "3 of 10 planned",
        "http 503: 2",
        "75.0 %",
        "64.0 %",
        "Requests per worker",
        "http://w2",
        "figures measure the machine, not the router",
    ):
        assert expected in text


def test_table_without_router_or_streaming() -> None:
    records = [record(0.0, [], 1.0, worker=None, cached=90)]
    figures = compute_figures(records, planned=1, duration_s=1.0, oracle_hits=10, oracle_tokens=100)
    console = Console(width=140, record=True)
    console.print(render_result(BenchResult(BenchConfig(stream=False), "http://w", figures)))
    text = console.export_text()
    assert "Requests per worker" not in text and "streaming off" in text
    assert "held some of these prompts" in text  # 90 % hits against a 10 % oracle: warm cache
