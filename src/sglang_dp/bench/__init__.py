"""`sglang-dp bench`: a workload sent to a server, and what it measured.

    from sglang_dp.bench import BenchConfig, render_result, result_json, run_bench
    result = await run_bench(BenchConfig(workload="multi-turn"), "http://127.0.0.1:30000")
    console.print(render_result(result)); json.dumps(result_json(result))

`run_bench` is what `--compare` and benchmarks/ call once per policy.

    config.py      BenchConfig, CompareConfig: the options, declared once
    workloads.py   pure: the seeded scripts of each workload, the oracle hit rate
    protocol.py    pure: request bodies, reply parsing (SSE or whole)
    report.py      pure: figures from the records, the table, the JSON
    clients.py     shell: the HTTP clients (lean on the router's UpstreamPool, or aiohttp)
    codec.py       shell: a local Hugging Face tokenizer for token counts and the oracle
    load.py        shell: the dispatcher (arrivals, concurrency, budgets, conversations)
    cpu.py         shell: machine and client CPU over the run (psutil)
    runner.py      shell: one run (`run_bench`) and the `sglang-dp bench` command (`run`)
    compare.py     shell: `bench --compare`, the same load against a fresh cluster per policy
"""

from __future__ import annotations

from sglang_dp.bench.config import BenchConfig
from sglang_dp.bench.report import BenchResult, Figures, Latency, render_result, result_json
from sglang_dp.bench.runner import run_bench

__all__ = [
    "BenchConfig",
    "BenchResult",
    "Figures",
    "Latency",
    "render_result",
    "result_json",
    "run_bench",
]
