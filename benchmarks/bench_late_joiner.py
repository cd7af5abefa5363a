"""A worker that joins late under steady load: does it get its share? (`make demo`'s case.)

Four simulated workers (`--time-scale 5`, as `make demo` runs them); the router starts with
three. `make demo`'s steady load (examples/steady_load.py: eight applications with long system
prompts, short chat questions, not streamed) runs until every application's prompt is placed;
`JOIN_AFTER_S` after the load began the fourth worker is added (`POST /workers`, as a worker
that became healthy late or came back from a restart) and the share of requests it is routed in
the next `WINDOW_S` seconds is measured, per policy, each on a fresh cluster. Fair share: 0.25.
Before least_ttft, cache_aware gave it 0 of 3,134 requests in 19 s: no count of requests in
flight reached its 64-request threshold.

Prints (with --json only) one JSON object:
`{"late_joiner_share": {policy: share}, "routed": {policy: [per worker]}, "settings": {...}}`
and writes benchmarks/results_late_joiner.json.

    python benchmarks/bench_late_joiner.py [--json] [--policies least_ttft,cache_aware]
        [--window 30] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from support import get_json, process, start_router, start_worker, wait_until

JOIN_AFTER_S = 2.0
WORKER_ARGS = ("--time-scale", "5")
EXAMPLES = Path(__file__).parent.parent / "examples"
RESULTS = Path(__file__).parent / "results_late_joiner.json"


def routed(url: str) -> dict[str, int]:
    return {w["url"]: w["routed"] for w in get_json(url + "/debug/stats")["workers"]}


def add_worker(router: str, worker: str) -> None:
    import urllib.request

    body = json.dumps({"url": worker}).encode()
    request = urllib.request.Request(
        router + "/workers", body, {"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        reply.read()


def one_policy(policy: str, window: float, concurrency: int) -> tuple[float, list[int]]:
    """The late worker's share of the requests routed in `window` s after it joined."""
    with ExitStack() as stack:
        workers = [start_worker(stack, *WORKER_ARGS) for _ in range(4)]
        router, proc = start_router(stack, workers[:3], "--policy", policy)
        load = [sys.executable, str(EXAMPLES / "steady_load.py"), "--url", router]
        stack.enter_context(process([*load, "--concurrency", str(concurrency)]))
        wait_until(lambda: sum(routed(router).values()) > 0, proc, "the load")
        time.sleep(JOIN_AFTER_S)  # the load runs on: the applications' prompts are placed
        add_worker(router, workers[3])
        wait_until(lambda: workers[3] in routed(router), proc, "the late worker")
        before = routed(router)
        time.sleep(window)
        after = routed(router)
    gained = [after[w] - before.get(w, 0) for w in workers]
    return gained[3] / max(sum(gained), 1), gained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--policies", default="least_ttft,cache_aware")
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured")
    parser.add_argument("--concurrency", type=int, default=16, help="steady_load's clients")
    args = parser.parse_args()
    shares: dict[str, float] = {}
    per_worker: dict[str, list[int]] = {}
    for policy in args.policies.split(","):
        share, gained = one_policy(policy, args.window, args.concurrency)
        shares[policy], per_worker[policy] = round(share, 3), gained
        if not args.json:
            print(f"{policy:12} late worker's share {share:.3f}  routed per worker {gained}")
    figures: dict[str, Any] = {
        "late_joiner_share": shares,
        "routed": per_worker,
        "settings": {
            "join_after_s": JOIN_AFTER_S,
            "window_s": args.window,
            "concurrency": args.concurrency,
            "worker_args": list(WORKER_ARGS),
        },
    }
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
