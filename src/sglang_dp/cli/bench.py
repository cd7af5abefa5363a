"""`sglang-dp bench`: send a workload to a server and report throughput, latency and cache hits."""

from __future__ import annotations

from typing import Any

import click

from sglang_dp.bench.config import BenchConfig, CompareConfig
from sglang_dp.clickopts import click_options
from sglang_dp.options import build


@click.command(
    "bench",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click_options(BenchConfig)
@click_options(CompareConfig)
@click.argument("worker_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- WORKER FLAGS]")
def command(worker_args: tuple[str, ...], **values: Any) -> None:
    """Load a router, a single SGLang worker or any SGLang-compatible server, then report.

    Workloads: shared-prefix (SGLang's generated-shared-prefix), multi-turn (long-prompt
    multi-turn chat), random (nothing shared), trace (JSONL replay). Without --concurrency or
    --request-rate every request is sent at once, as SGLang's bench_serving does.

    --compare POLICIES --simulate --dp N runs the same load against each policy on a fresh
    simulated cluster (flags after `--` go to every simulated worker, e.g. --time-scale 2).
    """
    values["worker_args"] = worker_args
    try:
        config = build(BenchConfig, values)
        comparison = build(CompareConfig, values)
        if comparison.compare is not None:
            comparison.entries()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if comparison.compare is not None:
        from sglang_dp.bench.compare import run_compare

        raise SystemExit(run_compare(config, comparison))
    if worker_args:
        raise click.UsageError("flags after `--` are for the workers of --compare --simulate")
    from sglang_dp.bench.runner import run

    raise SystemExit(run(config))
