"""`sglang-dp bench`: workloads (pure), the load runner, and the report.

    from sglang_dp.bench import BenchConfig, render_result, result_json, run_bench
    result = await run_bench(BenchConfig(workload="multi-turn"), "http://127.0.0.1:30000")
    console.print(render_result(result)); json.dumps(result_json(result))

`run_bench` is what `--compare` and benchmarks/ call once per policy; see runner.py.
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
