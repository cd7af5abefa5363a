"""Cost of one routing decision (match + policy + speculative insert) and the tree's memory.

Workload (seeded): 64 system prompts of 8,000 characters; each request is one of them plus a
random 512-character suffix; 20,000 requests; at most 64 in flight (released oldest first).
Runs the cache_aware engine with 8 and 64 workers in the same process and prints the median and
p99 microseconds per `route()`, the 64/8 ratio (cost must not grow with the number of workers)
and the tree's bytes per stored character (tracemalloc, a separate run).

    python benchmarks/bench_core.py [--json] [--requests N]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import string
import time
import tracemalloc

from sglang_dp.router.engine import EngineConfig, RoutingEngine

ALPHABET = string.ascii_letters + "      .,"


def workload(requests: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    systems = ["".join(rng.choices(ALPHABET, k=8000)) for _ in range(64)]
    return [rng.choice(systems) + "".join(rng.choices(ALPHABET, k=512)) for _ in range(requests)]


def run(keys: list[str], workers: int, timed: bool = True) -> tuple[list[float], RoutingEngine]:
    engine = RoutingEngine(EngineConfig())
    for i in range(workers):
        engine.add_worker(f"http://127.0.0.1:{31000 + i}")
    window: collections.deque = collections.deque()
    costs: list[float] = []
    clock = time.perf_counter_ns
    for now, key in enumerate(keys):
        start = clock()
        dispatch = engine.route(key, float(now))
        if timed:
            costs.append((clock() - start) / 1000)
        window.append(dispatch)
        if len(window) > 64:
            engine.release(window.popleft())
    return costs, engine


def bytes_per_char(keys: list[str]) -> float:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    _, engine = run(keys, 8, timed=False)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / engine.tree.total_size


def p(costs: list[float], q: int) -> float:
    return statistics.quantiles(costs, n=100)[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    keys = workload(args.requests)
    costs8, engine8 = run(keys, 8)
    costs64, _ = run(keys, 64)
    result = {
        "requests": args.requests,
        "route_us_p50_8w": round(statistics.median(costs8), 2),
        "route_us_p99_8w": round(p(costs8, 99), 2),
        "route_us_p50_64w": round(statistics.median(costs64), 2),
        "route_us_p99_64w": round(p(costs64, 99), 2),
        "route_64w_over_8w": round(statistics.median(costs64) / statistics.median(costs8), 3),
        "tree_chars_8w": engine8.tree.total_size,
        "tree_nodes_8w": engine8.tree.node_count,
        "tree_bytes_per_char": round(bytes_per_char(keys), 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>22}  {value}")


if __name__ == "__main__":
    main()
