"""The installed `sglang-dp bench` against real processes: its figures agree with the servers'.

Behind a router, the hit rate and token counts must equal the router's per-worker counters
(`/debug/stats`, from the workers' own answers) and the per-worker request counts the router's.
Against one worker, they must equal the worker's own Prometheus counters. No timing assertions.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import SGLANG_DP, Worker, sim_worker
from tests.router.cluster import Cluster, cluster

pytestmark = pytest.mark.slow


def bench(url: str, out: Path, *args: str, status: int = 0) -> dict[str, Any]:
    proc = subprocess.run(
        [SGLANG_DP, "bench", "--url", url, "--output", str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert "Completed" in proc.stdout  # the table was printed, failures or not
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def worker_counters(stats: dict[str, Any]) -> dict[str, dict[str, int]]:
    keys = ("completed", "prompt_tokens", "cached_tokens", "completion_tokens")
    return {w["url"]: {k: w[k] for k in keys} for w in stats["workers"]}


def run_against_router(c: Cluster, out: Path, *args: str) -> dict[str, Any]:
    before = worker_counters(c.stats())
    result = bench(c.router.url, out, *args)
    after = worker_counters(c.stats())
    delta = {url: {k: after[url][k] - before[url][k] for k in after[url]} for url in after}
    # Counts add up.
    assert result["failed"] == 0 and result["cancelled"] == 0
    assert result["completed"] == result["sent"] == result["planned"]
    assert sum(result["per_worker"].values()) == result["completed"]
    # Per-worker requests, and every token figure, are the router's own counters.
    assert result["per_worker"] == {u: d["completed"] for u, d in delta.items() if d["completed"]}
    assert result["prompt_tokens"] == sum(d["prompt_tokens"] for d in delta.values())
    assert result["cached_tokens"] == sum(d["cached_tokens"] for d in delta.values())
    assert result["completion_tokens"] == sum(d["completion_tokens"] for d in delta.values())
    assert result["hit_rate"] == pytest.approx(result["cached_tokens"] / result["prompt_tokens"])
    assert 0 < result["oracle_hit_rate"] < 1
    assert result["oracle_share"] == pytest.approx(result["hit_rate"] / result["oracle_hit_rate"])
    return result


@pytest.fixture(scope="module")
def four_workers() -> Iterator[Cluster]:
    with cluster(4) as c:
        yield c


def test_shared_prefix_through_the_router(four_workers: Cluster, tmp_path: Path) -> None:
    result = run_against_router(
        four_workers,
        tmp_path / "out.json",
        *("--workload", "shared-prefix", "--num-groups", "4", "--prompts-per-group", "6"),
        *("--system-prompt-len", "300", "--question-len", "20", "--output-len", "8"),
        *("--concurrency", "6", "--flush-cache"),
    )
    assert result["planned"] == 24 and result["completion_tokens"] == 24 * 8
    # TTFT needs only the first event; inter-token latency needs events that arrive apart, which
    # at --time-scale 1000 (µs decode steps) the socket may deliver as one read: see test_report.
    assert result["ttft_ms"]["p50"] is not None
    assert result["config"]["num_groups"] == 4 and result["config"]["concurrency"] == 6
    # A cold cache: the routed hit rate cannot beat the oracle.
    assert result["hit_rate"] <= result["oracle_hit_rate"] + 1e-9


def test_multi_turn_chat_through_the_router(four_workers: Cluster, tmp_path: Path) -> None:
    result = run_against_router(
        four_workers,
        tmp_path / "out.json",
        *("--workload", "multi-turn", "--api", "chat", "--num-conversations", "5"),
        *("--turns", "3", "--system-prompt-len", "200", "--answer-len", "6"),
        *("--request-rate", "200", "--flush-cache", "--seed", "3"),
    )
    assert result["planned"] == 15 and result["completion_tokens"] == 15 * 6
    # Later turns resend earlier answers: the oracle sees them repeat.
    assert result["oracle_hit_rate"] > 0.5


def prometheus(worker: Worker, name: str) -> float:
    text = worker.get("/metrics").body.decode()
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_single_worker_without_router(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    system = " ".join(["rules"] * 120)
    lines = [
        {
            "timestamp": i * 0.01,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"question number {i}"},
            ],
            "max_tokens": 5,
        }
        for i in range(8)
    ]
    trace.write_text("\n".join(json.dumps(line) for line in lines))
    args = ("--enable-cache-report", "--enable-metrics", "--skip-server-warmup")
    with sim_worker("--time-scale", "1000", *args) as worker:
        result = bench(
            worker.url,
            tmp_path / "out.json",
            *("--workload", "trace", "--trace-path", str(trace), "--api", "chat"),
            *("--no-stream", "--client", "aiohttp"),
        )
        assert result["completed"] == 8 and result["per_worker"] == {}
        assert result["prompt_tokens"] == prometheus(worker, "sglang:prompt_tokens_total")
        assert result["cached_tokens"] == prometheus(worker, "sglang:cached_tokens_total")
    assert result["ttft_ms"] is None and result["itl_ms"] is None
    assert result["hit_rate"] > 0.8 and result["oracle_hit_rate"] > 0.8


def test_time_limit_cancels_and_keeps_counts(tmp_path: Path) -> None:
    # Real time (--time-scale 1): 2,000-token answers cannot finish within the limit.
    with sim_worker("--enable-cache-report") as worker:
        result = bench(
            worker.url,
            tmp_path / "out.json",
            *("--workload", "random", "--num-requests", "6", "--input-len", "50"),
            *("--output-len", "2000", "--max-duration", "0.5"),
            status=1,  # nothing completed
        )
        assert result["cancelled"] == result["sent"] == 6 and result["completed"] == 0
        assert worker.get("/health").status == 200


def test_unreachable_server_fails_clearly(tmp_path: Path) -> None:
    result = bench(
        "http://127.0.0.1:9",
        tmp_path / "out.json",
        *("--workload", "random", "--num-requests", "3", "--input-len", "5"),
        status=1,
    )
    assert result["failures"] == {"connect error": 3} and result["failed"] == 3
