"""`sglang-dp bench`: send a workload to a server and report throughput, latency and cache hits."""

from __future__ import annotations

from typing import Any

import click

from sglang_dp.bench.config import BenchConfig
from sglang_dp.options import build, click_options


@click.command(
    "bench",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click_options(BenchConfig)
def command(**values: Any) -> None:
    """Load a router, a single SGLang worker or any SGLang-compatible server, then report.

    Workloads: shared-prefix (SGLang's generated-shared-prefix), multi-turn (long-prompt
    multi-turn chat), random (nothing shared), trace (JSONL replay). Without --concurrency or
    --request-rate every request is sent at once, as SGLang's bench_serving does.
    """
    try:
        config = build(BenchConfig, values)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    from sglang_dp.bench.runner import run

    raise SystemExit(run(config))
