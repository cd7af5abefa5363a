"""Policies compared on simulated 8-worker clusters: shared-prefix, multi-turn and random loads.

For each workload, every policy runs the same seeded load on a fresh `--simulate --dp 8` cluster
(`bench --compare`), round_robin last as the baseline. Shared-prefix sends all its requests at
once, as SGLang's bench_serving does by default; shared-prefix-zipf the same with groups drawn
from a Zipf law (a few hot system prompts); multi-turn sends its 128 conversations at once
(turns of one conversation in sequence); random sends 1,024 unrelated prompts at once.
The default policy (least_ttft) is compared with cache_aware and with sgl-router's cache_aware
by name (`default_over`: throughput and TTFT p99 ratios, hit-rate difference in points), the
policies declared in advance, never a best-of-N.
The workers model an A100 running Llama-3-8B by default (`--profile`), the hardware of the
published figure the targets come from; sgl-router's cache_aware (`sglang-router:cache_aware`)
joins the comparison when the `sglang_router` package is importable.
Then least_ttft, cache_aware and round_robin (and sgl-router) run shared-prefix, its Zipf form and
multi-turn again on the measured profile
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
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from sglang_dp.bench.compare import comparison_table, headline, run_comparison
from sglang_dp.bench.config import BenchConfig, CompareConfig

DEFAULT = "least_ttft"
POLICIES = "least_ttft,cache_aware,threshold,variance,power_of_two,shortest_queue,round_robin"
SGL_ROUTER = "sglang-router:cache_aware"
# "At least matches": two routers placing every request alike differ by up to 2 % between
# identical runs on this machine, so a ratio within that is a tie, not a loss.
NOISE = 0.98
WORKLOADS: dict[str, dict[str, Any]] = {
    "shared-prefix": {"workload": "shared-prefix"},
    "shared-prefix-zipf": {"workload": "shared-prefix", "group_distribution": "zipf"},
    "multi-turn": {"workload": "multi-turn", "api": "chat"},
    "random": {"workload": "random", "input_len": 1024, "output_len": 128},
}
MEASURED_POLICIES = "least_ttft,cache_aware,round_robin"
MEASURED_WORKLOADS = ("shared-prefix", "shared-prefix-zipf", "multi-turn")
RESULTS = Path(__file__).parent / "results_policies.json"


def targets(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, bool]:
    """The checks that are validations. (cache_aware ≥ 1.9× round robin on shared-prefix is
    not one: the A100 profile was fitted to reproduce that pair; it is `calibration` below.)"""
    over = default_over(results, "cache_aware")
    random_by_policy = results["random"]
    best_baseline = max(
        r["throughput_tok_s"] for p, r in random_by_policy.items() if p not in (DEFAULT, SGL_ROUTER)
    )
    checks = {
        "default_throughput_at_least_cache_aware": all(
            o["throughput"] >= NOISE for w, o in over.items() if w != "random"
        ),
        "default_ttft_p99_0_8x_cache_aware": all(
            o["ttft_p99"] <= 0.8 for w, o in over.items() if w != "random"
        ),
        "default_hit_rate_within_1_point": all(
            o["hit_rate_points"] >= -1.0 for w, o in over.items() if w != "random"
        ),
        "random_default_within_2pct_of_best_baseline": random_by_policy[DEFAULT]["throughput_tok_s"]
        >= 0.98 * best_baseline,
    }
    if all(SGL_ROUTER in by_policy for by_policy in results.values()):
        versus = default_over(results, SGL_ROUTER)
        checks["default_throughput_at_least_sglang_router"] = all(
            o["throughput"] >= NOISE for o in versus.values()
        )
    return checks


def calibration(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """A regression guard, not a validation: the A100 profile was fitted so that cache_aware
    and round_robin reproduce SGLang's published pair (1.92×) on this very workload."""
    shared = results["shared-prefix"]
    return {
        "shared_prefix_cache_aware_over_round_robin": round(
            shared["cache_aware"]["throughput_tok_s"] / shared["round_robin"]["throughput_tok_s"],
            3,
        )
    }


def default_over(
    results: dict[str, dict[str, dict[str, Any]]], other: str
) -> dict[str, dict[str, float]]:
    """Per workload: the default policy against `other`, both named in advance: throughput and
    TTFT p99 ratios, and the hit-rate difference in points."""
    over: dict[str, dict[str, float]] = {}
    for workload, by_policy in results.items():
        if DEFAULT not in by_policy or other not in by_policy:
            continue
        ours, theirs = by_policy[DEFAULT], by_policy[other]
        hit_gap = (ours["hit_rate"] or 0) - (theirs["hit_rate"] or 0)
        over[workload] = {
            "throughput": round(ours["throughput_tok_s"] / theirs["throughput_tok_s"], 3),
            "ttft_p99": round(ours["ttft_p99_ms"] / theirs["ttft_p99_ms"], 3),
            "hit_rate_points": round(100 * hit_gap, 2),
        }
    return over


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
    """Per workload: the default policy's throughput over round robin's."""
    return {
        workload: round(
            by_policy[DEFAULT]["throughput_tok_s"] / by_policy["round_robin"]["throughput_tok_s"],
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
        if {"round_robin", "cache_aware", DEFAULT} <= set(policies):
            figures["targets"] = targets(by_workload)
            figures["calibration"] = calibration(by_workload)
        figures["default_over_cache_aware"] = default_over(by_workload, "cache_aware")
        if SGL_ROUTER in policies:
            figures["default_over_sglang_router"] = default_over(by_workload, SGL_ROUTER)
    if args.measured_profile:
        measured_policies = MEASURED_POLICIES
        if SGL_ROUTER in args.policies:
            measured_policies = f"{SGL_ROUTER},{MEASURED_POLICIES}"
        measured = await compare(
            args, console, args.measured_profile, measured_policies, list(MEASURED_WORKLOADS)
        )
        profile = args.measured_profile
        figures[profile] = measured
        figures[f"{profile}_default_over_round_robin"] = over_round_robin(measured)
        figures[f"{profile}_default_over_cache_aware"] = default_over(measured, "cache_aware")
        if SGL_ROUTER in measured_policies:
            figures[f"{profile}_default_over_sglang_router"] = default_over(measured, SGL_ROUTER)
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
    if args.policies == POLICIES:
        if importlib.util.find_spec("sglang_router") is not None:
            args.policies = f"{SGL_ROUTER},{POLICIES}"
        else:
            print(
                "baseline missing: sglang-router is not installed (pip install -e '.[bench]'); "
                "the comparison with sgl-router is left out",
                file=sys.stderr,
            )
    console = Console(stderr=args.json)
    figures = uvloop.run(main(args, console))
    if args.measured_only and RESULTS.exists():  # keep the main profile's figures
        kept = json.loads(RESULTS.read_text())
        settings = {**kept.get("settings", {}), "measured_profile": args.measured_profile}
        figures = {**kept, **figures, "settings": settings}
    results = RESULTS
    if SGL_ROUTER not in args.policies and RESULTS.exists() and SGL_ROUTER in RESULTS.read_text():
        results = RESULTS.with_name("results_policies_no_baseline.json")
        print(f"baseline missing: {RESULTS.name} (which has it) kept; wrote {results.name}",
              file=sys.stderr)  # fmt: skip
    results.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
