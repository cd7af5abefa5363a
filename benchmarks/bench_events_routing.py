"""Routing on KV events against routing on the approximate tree, end to end, and what it costs.

Four `sglang-dp sim-worker` processes publish SGLang's KV events (`--page-size 16`, 32,768 tokens
of KV each, 4× real time, the default A100 Llama-3-8B profile) behind a `sglang-dp router` keyed on
their word tokens (`--routing-key words`, the default policy), once with `--cache-view events`
and once with `--cache-view approx` (fresh workers each time); `sglang-dp bench` drives a
shared-prefix load (2,048-token system prompts, 128-token questions, 64-token answers, 32 in
flight, streamed):

- `fits`: 24 system prompts (49 k tokens: 1.5× one worker's KV, 0.37× the fleet's), 16 questions
  each; the running requests (8 per worker, 2.2 k tokens each) force evictions.
  `events_hit_over_oracle` = hit rate with events ÷ the oracle's (target ≥ 0.99), and
  `tree_hit_over_oracle` beside it. The oracle: the same load on ONE simulated worker with an
  unbounded KV cache and the same page size (an infinite cache, measured under the same
  concurrency, so same-batch misses count against it too).
- `oversubscribed`: 96 system prompts (197 k tokens: 1.5× the fleet's KV), 4 questions each: no
  routing can reach the oracle. `events_vs_tree_hit` and `events_vs_tree_ttft_p90` (events ÷
  tree; ≥ 1.0 hit wanted), whichever way they fall.
- `events_route_us_p50_8w` (≤ 20) and `tree_route_us_p50_8w` in this process: the engine's
  `route` for 2,176-token keys over 8 workers, 64 system prompts stored in the events index
  (8 per worker); `events_route_over_tree` is their ratio.

    python benchmarks/bench_events_routing.py [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sglang_dp.kv_wire import AllBlocksCleared, BlockStored, chain_ids
from sglang_dp.launcher.ports import free_port_band
from sglang_dp.router.engine import EngineConfig, Outcome, RoutingEngine
from sglang_dp.router.kv_events import Batch
from sglang_dp.router.kv_index import KvIndex
from support import get_json, publish, start_router, start_worker

SGLANG_DP = str(Path(sys.executable).parent / "sglang-dp")
RESULTS = Path(__file__).with_name("results_events_routing.json")
PAGE, KV_TOKENS, WORKERS = 16, 32_768, 4
SYSTEM, QUESTION, ANSWER, CONCURRENCY = 2048, 128, 64, 32
LOADS = {"fits": (24, 16), "oversubscribed": (96, 4)}  # groups, questions per group


def worker_args(kv_tokens: int) -> tuple[str, ...]:
    base = free_port_band(2)
    config = {
        "publisher": "zmq",
        "endpoint": f"tcp://*:{base}",
        "replay_endpoint": f"tcp://*:{base + 1}",
        "topic": "kv",
    }
    return (
        "--kv-events-config", json.dumps(config), "--page-size", str(PAGE),
        "--max-total-tokens", str(kv_tokens), "--time-scale", "4", "--enable-cache-report",
    )  # fmt: skip


def bench(url: str, groups: int, questions: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = [
            SGLANG_DP, "bench", "--url", url, "--workload", "shared-prefix",
            "--num-groups", str(groups), "--prompts-per-group", str(questions),
            "--system-prompt-len", str(SYSTEM), "--question-len", str(QUESTION),
            "--output-len", str(ANSWER), "--concurrency", str(CONCURRENCY),
            "--seed", "1", "--output", out.name,
        ]  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, timeout=1800)
        result: dict[str, Any] = json.loads(Path(out.name).read_text())
    return {
        "hit_rate": result["hit_rate"],
        "ttft_p90_ms": result["ttft_ms"]["p90"] if result["ttft_ms"] else None,
        "throughput_tok_s": round(result["total_throughput"]),
        "completed": result["completed"],
        "failed": result["failed"],
    }


def routed(view: str, groups: int, questions: int) -> dict[str, Any]:
    with ExitStack() as stack:
        urls = [start_worker(stack, *worker_args(KV_TOKENS)) for _ in range(WORKERS)]
        router, _ = start_router(stack, urls, "--routing-key", "words", "--cache-view", view)
        figures = bench(router, groups, questions)
        stats = get_json(router + "/debug/stats")
        figures["workers_on_events"] = sum(w["cache_view"] == "events" for w in stats["workers"])
    return figures


def oracle(groups: int, questions: int) -> dict[str, Any]:
    with ExitStack() as stack:
        url = start_worker(stack, *worker_args(1 << 30))
        return bench(url, groups, questions)


def route_costs(rng: random.Random) -> dict[str, float]:
    """The engine's route p50 (µs) with and without the events index, same keys."""
    systems = [[rng.randrange(1 << 30) for _ in range(SYSTEM)] for _ in range(64)]
    keys = [
        array("I", systems[rng.randrange(64)] + [rng.randrange(1 << 30) for _ in range(QUESTION)])
        for _ in range(4000)
    ]
    out = {}
    for view in ("tree", "events"):
        engine = RoutingEngine(EngineConfig(token_keys=True))
        for w in range(8):
            engine.add_worker(f"w{w}")
        if view == "events":
            index = KvIndex(PAGE)
            engine.use_events(index)
            for w in range(8):
                index.apply(f"w{w}", Batch(0, 0.0, [AllBlocksCleared()]), 0.0)
            for g, system in enumerate(systems):
                stored = BlockStored(chain_ids(system, PAGE), None, system, PAGE)
                index.apply(f"w{g % 8}", Batch(1 + g // 8, 0.0, [stored]), 0.0)
        times = []
        for i, key in enumerate(keys):
            now = 1.0 + i / 1000
            start = time.perf_counter_ns()
            dispatch = engine.route(key, now)
            times.append(time.perf_counter_ns() - start)
            engine.observe(dispatch, Outcome(len(key), dispatch.decision.matched), now)
        out[view] = statistics.median(times[500:]) / 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args()
    runs: dict[str, dict[str, Any]] = {}
    for load, (groups, questions) in LOADS.items():
        runs[load] = {
            "oracle": oracle(groups, questions),
            "events": routed("events", groups, questions),
            "tree": routed("approx", groups, questions),
        }
    fits, over = runs["fits"], runs["oversubscribed"]
    costs = route_costs(random.Random(0))
    figures = {
        "events_hit_over_oracle": round(fits["events"]["hit_rate"] / fits["oracle"]["hit_rate"], 4),
        "tree_hit_over_oracle": round(fits["tree"]["hit_rate"] / fits["oracle"]["hit_rate"], 4),
        "events_vs_tree_hit": round(over["events"]["hit_rate"] / over["tree"]["hit_rate"], 4),
        "events_vs_tree_ttft_p90": round(
            over["events"]["ttft_p90_ms"] / over["tree"]["ttft_p90_ms"], 4
        ),
        "events_route_us_p50_8w": round(costs["events"], 2),
        "tree_route_us_p50_8w": round(costs["tree"], 2),
        "events_route_over_tree": round(costs["events"] / costs["tree"], 3),
        "runs": runs,
    }
    publish(figures, RESULTS, args.json)


if __name__ == "__main__":
    main()
