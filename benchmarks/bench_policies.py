"""Policies compared on simulated 8-worker clusters: shared-prefix, multi-turn and random loads.

For each workload, every policy runs the same seeded load on a fresh `--simulate --dp 8` cluster
(`bench --compare`), round_robin last as the baseline. Shared-prefix sends all its requests at
once, as SGLang's bench_serving does by default; multi-turn sends its 128 conversations at once
(turns of one conversation in sequence); random sends 1,024 unrelated prompts at once.
The workers model an A100 running Llama-3-8B by default (`--profile`), the hardware of the
published figure the targets come from; sgl-router's cache_aware (`sglang-router:cache_aware`)
joins the comparison when the `sglang_router` package is importable.
Then cache_aware and round_robin run shared-prefix and multi-turn again on the measured profile
(`--measured-profile h200-llama3-8b`: the only one that is a measurement rather than a fit or an
estimate; unfused PyTorch kernels, so slower steps than SGLang's); `--measured-only` runs just
that part, `--measured-profile ''` skips it.
Prints one JSON object keyed by workload, then policy (the measured profile's results under its
own name, keyed the same way), and writes benchmarks/results_policies.json.

    python benchmarks/bench_policies.py [--json] [--time-scale 1] [--profile a100-llama3-8b]
        [--policies a,b,...] [--measured-profile h200-llama3-8b] [--measured-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from sglang_dp.bench.compare import comparison_table, headline, run_comparison
from sglang_dp.bench.config import BenchConfig, CompareConfig

POLICIES = "cache_aware,threshold,variance,power_of_two,shortest_queue,round_robin"
SGL_ROUTER = "sglang-router:cache_aware"
# "At least matches": two routers placing every request alike differ by up to 2 % between
# identical runs on this machine, so a ratio within that is a tie, not a loss.
NOISE = 0.98
WORKLOADS: dict[str, dict[str, Any]] = {
    "shared-prefix": {"workload": "shared-prefix"},
    "multi-turn": {"workload": "multi-turn", "api": "chat"},
    "random": {"workload": "random", "input_len": 1024, "output_len": 128},
}
MEASURED_POLICIES = "cache_aware,round_robin"
MEASURED_WORKLOADS = ("shared-prefix", "multi-turn")
RESULTS = Path(__file__).parent / "results_policies.json"


def targets(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, bool]:
    shared = results["shared-prefix"]
    base = shared["round_robin"]["throughput_tok_s"]
    aware = shared["cache_aware"]
    random_base = results["random"]["round_robin"]["throughput_tok_s"]
    checks = {
        "shared_prefix_cache_aware_1_9x_round_robin": aware["throughput_tok_s"] >= 1.9 * base,
        "shared_prefix_hit_rate_90pct_of_oracle": (aware["hit_rate"] or 0)
        >= 0.9 * aware["oracle_hit_rate"],
        "random_no_policy_loses_5pct": all(
            p["throughput_tok_s"] >= 0.95 * random_base for p in results["random"].values()
        ),
    }
    if all(SGL_ROUTER in by_policy for by_policy in results.values()):
        ratios = best_over_sglang_router(results)
        checks["best_policy_matches_sglang_router"] = all(r >= NOISE for r in ratios.values())
    return checks


def best_over_sglang_router(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """Per workload: sglang-dp's best throughput over sgl-router's cache_aware."""
    return {
        workload: round(
            max(r["throughput_tok_s"] for p, r in by_policy.items() if p != SGL_ROUTER)
            / by_policy[SGL_ROUTER]["throughput_tok_s"],
            3,
        )
        for workload, by_policy in results.items()
    }


async def compare(
    args: argparse.Namespace, console: Console, profile: str, policies: str, workloads: list[str]
) -> dict[str, Any]:
    """Every policy on every workload, on fresh clusters of `profile` workers."""
    config = CompareConfig(
        compare=policies, simulate=True, dp=args.dp,
        worker_args=("--time-scale", str(args.time_scale), "--profile", profile),
    )  # fmt: skip
    figures: dict[str, Any] = {}
    for name in workloads:
        bench = dataclasses.replace(BenchConfig(seed=args.seed), **WORKLOADS[name])
        results = await run_comparison(bench, config, console)
        if not args.json:
            console.print(f"[bold]{name}[/] ({profile})")
            console.print(comparison_table(results))
        figures[name] = {policy: headline(r.figures) for policy, r in results}
    return figures


def over_round_robin(by_workload: dict[str, Any]) -> dict[str, float]:
    """Per workload: cache_aware's throughput over round robin's."""
    return {
        workload: round(
            by_policy["cache_aware"]["throughput_tok_s"]
            / by_policy["round_robin"]["throughput_tok_s"],
            3,
        )
        for workload, by_policy in by_workload.items()
    }


async def main(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if not args.measured_only:
        by_workload = await compare(args, console, args.profile, args.policies, list(WORKLOADS))
        figures.update(by_workload)
        policies = args.policies.split(",")
        if "round_robin" in policies and "cache_aware" in policies:
            figures["targets"] = targets(by_workload)
        if SGL_ROUTER in policies:
            figures["best_over_sglang_router"] = best_over_sglang_router(by_workload)
    if args.measured_profile:
        measured = await compare(
            args, console, args.measured_profile, MEASURED_POLICIES, list(MEASURED_WORKLOADS)
        )
        figures[args.measured_profile] = measured
        figures[f"{args.measured_profile}_cache_aware_over_round_robin"] = over_round_robin(
            measured
        )
    figures["settings"] = {
        "dp": args.dp,
        "profile": None if args.measured_only else args.profile,
        "measured_profile": args.measured_profile or None,
        "time_scale": args.time_scale,
    }
    return figures


if __name__ == "__main__":
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--policies", default=POLICIES, help="comma-separated; baseline last")
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--profile", default="a100-llama3-8b", help="simulated GPU + model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--measured-profile", default="h200-llama3-8b", help="'' to skip the measured profile"
    )
    parser.add_argument("--measured-only", action="store_true", help="only the measured profile")
    args = parser.parse_args()
    if args.policies == POLICIES and importlib.util.find_spec("sglang_router") is not None:
        args.policies = f"{SGL_ROUTER},{POLICIES}"
    console = Console(stderr=args.json)
    figures = uvloop.run(main(args, console))
    if args.measured_only and RESULTS.exists():  # keep the main profile's figures
        kept = json.loads(RESULTS.read_text())
        settings = {**kept.get("settings", {}), "measured_profile": args.measured_profile}
        figures = {**kept, **figures, "settings": settings}
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
