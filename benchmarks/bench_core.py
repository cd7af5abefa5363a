"""Cost of one routing decision (match + policy + speculative insert) and the tree's memory.

Workload (seeded): 64 system prompts of 8,000 characters; each request is one of them plus a
random 512-character suffix; 20,000 requests; at most 64 in flight (released oldest first).
Runs the default engine (least_ttft) with 8 and 64 workers in the same process and prints the
median and p99 microseconds per `route()`, the 64/8 ratio (cost must not grow with the number
of workers) and the tree's bytes per stored character (tracemalloc, a separate run).

Eviction and memory, each in a fresh process:
- `evict_pause_ms_max`: the default budgets, 64 prompts of 2,000 characters each followed by a
  unique 256-character suffix, routed until the tree has been over budget for 20,000 requests:
  the longest `route()` that evicted, in CPU time (`_wall_ms_max`: wall time, which includes
  being preempted on a shared machine); calls during which the garbage collector ran are left
  out and its longest full collection reported apart (`gc_full_ms_max`); then one worker's
  share cut to 85 % as a detected eviction does, in the engine's steps
  (`evict_one_worker_step_ms_max`, CPU time, and the number of steps: one per request);
- `gc_full_ms_at_{25,50,75,100}pct`: in the same run, one full collection (`gc.collect()`)
  timed (CPU time; `gc_full_wall_ms_max` the longest in wall time) as the tree reaches each
  quarter of its budget (the cost any full collection would have at that size);
  `gc_full_ms_max` is the longest of those and of the collections CPython ran by itself, and
  `gc_tracked_objects_at_budget` the objects the collector tracks, tree at budget;
- `tree_rss_mb_at_budget_{chars,tokens}`: `--max-tree-memory-mb 256`, character keys (as above)
  or token keys (500-token prompts + 64 unique tokens): the process's resident memory growth
  once the tree is held at its budget, and its ratio to the budget. The estimate's constants
  (tree.py's NODE_BYTES, TENANT_BYTES) were fitted on these two, so they are regression guards;
  `tree_rss_mb_at_budget_conversations` validates them on a workload they never saw:
  multi-turn chat (256 conversations under 16 system prompts, each request a whole history
  plus a new turn of 100–400 characters, 8 turns a conversation);
- with `--leak-requests N` (not by default: minutes): `--max-tree-memory-mb 256`, character
  keys, N requests routed once the tree is at its budget; `leak_rss_mb`: the resident memory
  growth between the first tenth of them and the end (flat: nothing leaks).

    python benchmarks/bench_core.py [--json] [--requests N] [--quick] [--leak-requests N]

A full run (not `--quick`) writes benchmarks/results_core.json.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import random
import statistics
import string
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from sglang_dp.router.engine import EVICT_STEP_WORK, EngineConfig, RoutingEngine
from sglang_dp.router.tree import KeyLike

ALPHABET = string.ascii_letters + "      .,"
RESULTS = Path(__file__).with_name("results_core.json")


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


def unique_keys(seed: int, prompt_chars: int = 2000, suffix: int = 256) -> Iterator[str]:
    """64 shared prompts, each request one of them and a fresh random suffix (endless)."""
    rng = random.Random(seed)
    table = bytes(ord(ALPHABET[i % len(ALPHABET)]) for i in range(256))
    prompts = ["".join(rng.choices(ALPHABET, k=prompt_chars)) for _ in range(64)]
    while True:
        block = rng.randbytes(suffix * 4096).translate(table).decode()
        for i in range(4096):
            yield rng.choice(prompts) + block[i * suffix : (i + 1) * suffix]


def unique_token_keys(seed: int) -> Iterator[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 150_000) for _ in range(500)] for _ in range(64)]
    while True:
        yield rng.choice(prompts) + [rng.randrange(1000, 150_000) for _ in range(64)]


def conversation_keys(seed: int, active: int = 256, turns: int = 8) -> Iterator[str]:
    """Multi-turn chat, the validation workload of the memory estimate (its constants were
    fitted on the two above): `active` conversations under 16 shared 1,500-character system
    prompts, each request one conversation's whole history plus its next turn (100–400
    characters), a conversation replaced by a new one after `turns` turns (endless)."""
    rng = random.Random(seed)
    systems = ["".join(rng.choices(ALPHABET, k=1500)) for _ in range(16)]

    def fresh() -> list[str]:
        return [rng.choice(systems)]

    chats = [fresh() for _ in range(active)]
    while True:
        i = rng.randrange(active)
        chats[i].append("".join(rng.choices(ALPHABET, k=rng.randint(100, 400))))
        yield "".join(chats[i])
        if len(chats[i]) > turns:
            chats[i] = fresh()


def fill(
    engine: RoutingEngine, keys: Iterator[KeyLike], after_full: int, on_route: Callable[..., None]
) -> None:
    """Route keys until `after_full` requests have been routed since the tree first evicted;
    `on_route(evicted, ms)` is told of every request."""
    tree = engine.tree
    window: collections.deque = collections.deque()
    over = 0
    now = 0.0
    while over < after_full:
        now += 1
        evicted = tree.evicted_leaves
        key = next(keys)
        start, cpu = time.perf_counter_ns(), time.thread_time_ns()
        window.append(engine.route(key, now))
        ms, cpu_ms = (time.perf_counter_ns() - start) / 1e6, (time.thread_time_ns() - cpu) / 1e6
        on_route(tree.evicted_leaves > evicted, ms, cpu_ms)
        over += tree.evicted_leaves > 0
        if len(window) > 64:
            engine.release(window.popleft())


def evict_pause(after_full: int) -> dict[str, float]:
    engine = RoutingEngine(EngineConfig())
    for i in range(8):
        engine.add_worker(f"http://127.0.0.1:{31000 + i}")
    pauses: list[float] = []
    cpu_pauses: list[float] = []
    collections_ms: list[float] = []
    collected = [False]
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:  # CPU time, as the pauses above
        if phase == "start":
            started[0] = time.thread_time()
        else:
            collected[0] = True
            if info["generation"] == 2:
                collections_ms.append((time.thread_time() - started[0]) * 1000)

    config = engine.config
    at_sizes: dict[str, float] = {}  # CPU time (a shared machine preempts; wall apart)
    walls: list[float] = []
    marks = [25, 50, 75, 100]

    def on_route(full: bool, ms: float, cpu_ms: float) -> None:
        if full and not collected[0]:
            pauses.append(ms)
            cpu_pauses.append(cpu_ms)
        collected[0] = False
        tree = engine.tree
        share = max(
            tree.total_size / config.max_tree_size, tree.memory / (config.max_tree_memory_mb << 20)
        )
        if marks and (share * 100 >= marks[0] or full):
            started, cpu = time.perf_counter(), time.thread_time()
            gc.collect()
            mark = marks.pop(0)
            at_sizes[f"gc_full_ms_at_{mark}pct"] = (time.thread_time() - cpu) * 1000
            walls.append((time.perf_counter() - started) * 1000)
            collected[0] = True

    gc.callbacks.append(on_gc)
    try:
        fill(engine, unique_keys(1), after_full, on_route)
    finally:
        gc.callbacks.remove(on_gc)
    tracked = len(gc.get_objects())
    tree, worker = engine.tree, engine.workers[0]
    budget = int(0.85 * tree.size(worker))  # what a detected eviction asks (SHRINK)
    gc.disable()
    steps: list[float] = []
    while not steps or tree.evicting(worker):
        started = time.thread_time()
        tree.evict_step(worker, budget, EVICT_STEP_WORK)
        steps.append((time.thread_time() - started) * 1000)
    gc.enable()
    return {
        "evict_one_worker_step_ms_max": round(max(steps), 3),
        "evict_one_worker_steps": len(steps),
        "evict_pause_ms_max": round(max(cpu_pauses), 3),
        "evict_pause_wall_ms_max": round(max(pauses), 3),
        "evict_route_ms_p99": round(p(pauses, 99), 3),
        "gc_full_ms_max": round(max([*collections_ms, *at_sizes.values()], default=0.0), 1),
        "gc_full_collections_while_filling": len(collections_ms),
        **{name: round(ms, 2) for name, ms in at_sizes.items()},
        "gc_full_wall_ms_max": round(max(walls, default=0.0), 2),
        "gc_tracked_objects_at_budget": tracked,
        "evict_tree_nodes": engine.tree.node_count,
        "evict_tree_memory_mb": round(engine.tree.memory / 2**20, 1),
    }


def rss_at_budget(kind: str, budget_mb: int, after_full: int) -> dict[str, float]:
    keys: Iterator[KeyLike] = {
        "chars": unique_keys,
        "tokens": unique_token_keys,
        "conversations": conversation_keys,
    }[kind](2)
    next(keys)  # the prompts exist before measuring
    config = EngineConfig(max_tree_size=2**40, max_tree_memory_mb=budget_mb)
    engine = RoutingEngine(config)
    for i in range(8):
        engine.add_worker(f"http://127.0.0.1:{31000 + i}")
    gc.collect()
    before = psutil.Process().memory_info().rss
    fill(engine, keys, after_full, lambda full, ms, cpu_ms: None)
    gc.collect()
    grown = (psutil.Process().memory_info().rss - before) / 2**20
    return {
        f"tree_rss_mb_at_budget_{kind}": round(grown, 1),
        f"tree_rss_over_budget_{kind}": round(grown / budget_mb, 3),
        f"tree_estimate_mb_{kind}": round(engine.tree.memory / 2**20, 1),
    }


def leak(requests: int, budget_mb: int = 256) -> dict[str, float]:
    """Resident memory growth over `requests` requests routed with the tree at its budget."""
    keys = unique_keys(3)
    engine = RoutingEngine(EngineConfig(max_tree_size=2**40, max_tree_memory_mb=budget_mb))
    for i in range(8):
        engine.add_worker(f"http://127.0.0.1:{31000 + i}")
    tree = engine.tree
    routed = [0]
    before = [0]

    def on_route(full: bool, ms: float, cpu_ms: float) -> None:
        routed[0] += tree.evicted_leaves > 0
        if routed[0] == requests // 10 and not before[0]:
            before[0] = psutil.Process().memory_info().rss

    fill(engine, keys, requests, on_route)
    grown = (psutil.Process().memory_info().rss - before[0]) / 2**20
    return {"leak_requests": requests, "leak_rss_mb": round(grown, 1)}


def in_child(*args: str) -> dict[str, float]:
    """One measurement in a fresh process (its memory and its garbage collector are its own)."""
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def p(costs: list[float], q: int) -> float:
    return statistics.quantiles(costs, n=100)[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="skip the eviction and memory runs")
    parser.add_argument("--leak-requests", type=int, default=0, help="also run the leak check")
    parser.add_argument("--leak", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--evict-pause", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rss", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.evict_pause:
        print(json.dumps(evict_pause(args.evict_pause)))
        return
    if args.leak:
        print(json.dumps(leak(args.leak)))
        return
    if args.rss:
        kind, budget, after = args.rss
        print(json.dumps(rss_at_budget(kind, int(budget), int(after))))
        return
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
    if not args.quick:
        result["max_tree_memory_mb"] = 256
        result |= in_child("--evict-pause", "20000")
        for kind in ("chars", "tokens", "conversations"):
            result |= in_child("--rss", kind, "256", "20000")
        result["fits"] = {
            "tree_rss_over_budget_chars": "NODE_BYTES and TENANT_BYTES were fitted on this "
            "workload (and the tokens one): a regression guard",
            "tree_rss_over_budget_tokens": "the same",
        }
        result["validation"] = {
            "tree_rss_over_budget_conversations": "multi-turn chat, a workload the constants "
            "were not fitted on (target <= 1.5)",
        }
    if args.leak_requests:
        result |= in_child("--leak", str(args.leak_requests))
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>22}  {value}")


if __name__ == "__main__":
    main()
