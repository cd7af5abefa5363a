"""`sglang-dp bench --compare A,B,C --simulate --dp N`: the same load against each policy.

For every policy in turn: a fresh simulated cluster (`launcher.cluster.Cluster`: N
`python -m sglang_dp.sim` workers with the same cost-model flags, given after `--`, and the
embedded router with that policy), the same workload (same seed), then everything is stopped
before the next policy starts. A fresh cluster each time: no policy inherits another's caches.

`sglang-router:POLICY` puts sgl-router (the `sglang_router` package, when importable) in front of
the same kind of cluster instead of ours: started as `python -m sglang_router.launch_router` on
127.0.0.1 with `HF_HUB_OFFLINE=1` (it would otherwise try to download a tokenizer).

The table shows every policy side by side with ratios against the LAST one listed (the
baseline); `--plot FILE.png` draws throughput, TTFT p50/p99 and hit rate (needs matplotlib).
Workers stream one event every 8 tokens unless `--stream-interval` is given after `--`: a token
per event would make eight workers and the client saturate two cores, and the figures would
measure the machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from sglang_dp.bench.config import SGLANG_ROUTER, BenchConfig, CompareConfig
from sglang_dp.bench.report import BenchResult, Figures, result_json
from sglang_dp.bench.runner import run_bench
from sglang_dp.launcher.cluster import Cluster, make_plan
from sglang_dp.launcher.config import LaunchConfig
from sglang_dp.launcher.process import free_port, free_port_band
from sglang_dp.router.config import RouterConfig
from sglang_dp.router.engine import EngineConfig
from sglang_dp.router.policies import PolicyConfig

DEFAULT_WORKER_ARGS = ("--stream-interval", "8")


def _worker_args(config: CompareConfig) -> tuple[str, ...]:
    given = config.worker_args
    return given if "--stream-interval" in given else (*DEFAULT_WORKER_ARGS, *given)


def launch_config(
    config: CompareConfig, policy: str, seed: int, log_dir: str, router_port: int
) -> LaunchConfig:
    engine = EngineConfig(policy=PolicyConfig(policy=policy, seed=seed))
    return LaunchConfig(
        dp=config.dp,
        simulate=True,
        log_dir=log_dir,
        worker_base_port=free_port_band(config.dp * 10),
        dashboard=False,
        router=RouterConfig(port=router_port, engine=engine, log_level="warning"),
        worker_args=_worker_args(config),
    )


async def run_one(
    bench: BenchConfig, config: CompareConfig, entry: str, console: Console
) -> BenchResult:
    """One entry of the comparison on its own fresh cluster."""
    policy = entry.removeprefix(SGLANG_ROUTER)
    external = entry.startswith(SGLANG_ROUTER)
    with tempfile.TemporaryDirectory(prefix="sglang-dp-compare-") as log_dir:
        port = free_port()
        launch = launch_config(config, policy if not external else "round_robin", bench.seed,
                               log_dir, port)  # fmt: skip
        cluster = Cluster(launch, make_plan(launch))
        sgl_router: subprocess.Popen[bytes] | None = None
        try:
            await cluster.start_workers()
            await cluster.start_router()
            await cluster.wait_ready(allow_partial=False)
            url = cluster.router.url
            if external:
                urls = [w.url for w in cluster.supervisor.snapshot()]
                sgl_router, url = await _start_sglang_router(policy, urls, log_dir)
            console.print(f"[bold]{entry}[/]: {config.dp} simulated workers behind {url}")
            return await run_bench(dataclasses.replace(bench, url=url), url, console=console)
        finally:
            if sgl_router is not None:
                sgl_router.terminate()
                sgl_router.wait(timeout=10)
            await cluster.stop(1.0)


async def _start_sglang_router(
    policy: str, urls: Sequence[str], log_dir: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
            "--port", str(port), "--policy", policy, "--worker-urls", *urls]  # fmt: skip
    log = open(os.path.join(log_dir, "sglang-router.log"), "wb")  # noqa: SIM115 (owned by the child)
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sglang-router exited with {proc.returncode} (log in {log_dir})")
        if await _answers(port):
            return proc, url
        await asyncio.sleep(0.1)
    proc.kill()
    raise RuntimeError("sglang-router did not answer /health within 60 s")


async def _answers(port: int) -> bool:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=2)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"http://127.0.0.1:{port}/health") as reply,
        ):
            return reply.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def run_comparison(
    bench: BenchConfig, config: CompareConfig, console: Console
) -> list[tuple[str, BenchResult]]:
    return [(entry, await run_one(bench, config, entry, console)) for entry in config.entries()]


# -- the report --------------------------------------------------------------------------------


def headline(f: Figures) -> dict[str, float | None]:
    """The figures compared, by name (what bench_policies.py prints per policy)."""
    return {
        "throughput_tok_s": round(f.total_throughput, 1),
        "output_tok_s": round(f.output_throughput, 1),
        "ttft_p50_ms": None if f.ttft_ms is None else round(f.ttft_ms.p50, 2),
        "ttft_p99_ms": None if f.ttft_ms is None else round(f.ttft_ms.p99, 2),
        "e2e_p50_ms": None if f.e2e_ms is None else round(f.e2e_ms.p50, 2),
        "hit_rate": None if f.hit_rate is None else round(f.hit_rate, 4),
        "oracle_hit_rate": round(f.oracle_hit_rate, 4),
        "completed": f.completed,
        "failed": f.failed,
        "duration_s": round(f.duration_s, 3),
    }


ROWS = (
    ("throughput_tok_s", "throughput (tok/s)", True),
    ("output_tok_s", "output (tok/s)", True),
    ("ttft_p50_ms", "TTFT p50 (ms)", False),
    ("ttft_p99_ms", "TTFT p99 (ms)", False),
    ("e2e_p50_ms", "end-to-end p50 (ms)", False),
    ("hit_rate", "cache hit rate", True),
    ("oracle_hit_rate", "oracle hit rate", True),
    ("completed", "completed", True),
    ("failed", "failed", False),
    ("duration_s", "duration (s)", False),
)


def _cell(value: float | None, base: float | None, name: str) -> str:
    if value is None:
        return "-"
    if name.endswith("hit_rate"):
        text = f"{value * 100:.1f} %"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = f"{value:,.1f}"
    if base and name not in ("completed", "failed", "oracle_hit_rate"):
        text += f"  ({value / base:.2f}×)"
    return text


def comparison_table(results: Sequence[tuple[str, BenchResult]]) -> Table:
    """Side by side, with ratios against the last entry."""
    heads = [(name, headline(r.figures)) for name, r in results]
    base = heads[-1][1]
    table = Table(title=f"ratios against {heads[-1][0]}", title_justify="left")
    table.add_column("")
    for name, _ in heads:
        table.add_column(name, justify="right")
    for key, label, _ in ROWS:
        table.add_row(label, *(_cell(h[key], base[key], key) for _, h in heads))
    return table


def comparison_json(
    results: Sequence[tuple[str, BenchResult]], config: CompareConfig
) -> dict[str, Any]:
    return {
        "compare": dataclasses.asdict(config),
        "baseline": results[-1][0],
        "policies": {name: headline(r.figures) for name, r in results},
        "runs": {name: result_json(r) for name, r in results},
    }


def plot(results: Sequence[tuple[str, BenchResult]], path: str) -> None:
    """Throughput, TTFT p50/p99 and hit rate per policy, as four bar charts."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'sglang-dp[plot]'") from None
    names = [name for name, _ in results]
    heads = [headline(r.figures) for _, r in results]
    panels = (("throughput_tok_s", "tokens/s"), ("ttft_p50_ms", "TTFT p50 ms"),
              ("ttft_p99_ms", "TTFT p99 ms"), ("hit_rate", "cache hit rate"))  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for axis, (key, title) in zip(axes, panels):
        axis.bar(names, [h[key] or 0 for h in heads], color="tab:blue")
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_compare(bench: BenchConfig, config: CompareConfig) -> int:
    """`bench --compare`: run every entry, print the table, write --output and --plot."""
    import json
    from pathlib import Path

    import uvloop

    console = Console()
    results = uvloop.run(run_comparison(bench, config, console))
    console.print(comparison_table(results))
    if bench.output:
        text = json.dumps(comparison_json(results, config), indent=2)
        Path(bench.output).write_text(text + "\n", encoding="utf-8")
        console.print(f"figures written to {bench.output}")
    if config.plot:
        plot(results, config.plot)
        console.print(f"plot written to {config.plot}")
    return 0 if all(r.figures.completed for _, r in results) else 1
