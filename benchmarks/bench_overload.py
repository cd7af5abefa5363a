"""The router offered more than its workers can do: admission control on vs off, one run.

Two `sglang-dp sim-worker` processes (`--max-running-requests 8`, 64-token answers to short
prompts, each unique) behind `sglang-dp router`. For each router setting, on fresh workers:
1. unloaded: one client after another for `UNLOADED_S`: the latency p99 of a request alone;
2. capacity: `CAPACITY_CLIENTS` closed-loop clients for `CAPACITY_S`: requests answered per
   second;
3. overload: open-loop arrivals (Poisson) at `--load` × capacity for `--seconds`; every client
   gives up after `CLIENT_TIMEOUT_S`. Figures:
   - `goodput_over_capacity`: requests answered per second (from the first arrival to the last
     answer: a backlog answered late counts, over the longer time) over the capacity (target
     >= 0.95);
   - `answered_p99_over_unloaded_p99`: latency p99 of the answered ones over the unloaded p99
     (target <= 2 with admission control on);
   - `refused_p99_ms`: latency p99 of the refusals (429/408) (target <= 10), each carrying
     `Retry-After` (`refused_without_retry_after`: target 0); `gave_up_share`: clients that
     timed out;
   - `router_rss_growth_mb`: the router's resident memory growth over the phase (target <= 16).

Admission on: `--max-concurrent-requests 18` (the workers' batches, 2 × 8, and one more each:
a worker always has the next request at hand when one of its batch ends), `--queue-size 4` (a
short queue: enough to hand a freed slot a request at once), `--queue-timeout-secs 1`; off:
`--max-concurrent-requests 0`. sglang-router (Rust) is
measured too when its package is importable (it has no admission control: the same as off).

    python benchmarks/bench_overload.py [--json] [--seconds 20] [--load 3]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from sglang_dp.launcher.ports import free_port
from support import get_json, process, wait_until

SGLANG_DP = str(Path(sys.executable).parent / "sglang-dp")
RESULTS = Path(__file__).with_name("results_overload.json")
WORKER_ARGS = ("--max-running-requests", "8")
ADMISSION_ON = ("--max-concurrent-requests", "18", "--queue-size", "4", "--queue-timeout-secs", "1")
ADMISSION_OFF = ("--max-concurrent-requests", "0")
UNLOADED_S = 4.0
CAPACITY_S = 6.0
CAPACITY_CLIENTS = 24  # the workers' batches and a few more (no refusal with admission on)
CLIENT_TIMEOUT_S = 20.0
STORY = "Tell me a story about a router. " * 4


@contextmanager
def workers(stack: ExitStack) -> Iterator[list[str]]:
    urls = []
    for _ in range(2):
        port = free_port()
        proc = stack.enter_context(
            process([SGLANG_DP, "sim-worker", "--port", str(port), *WORKER_ARGS])
        )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda url=url: get_json(url + "/v1/models")["data"], proc, "sim-worker")
        urls.append(url)
    yield urls


def start_router(stack: ExitStack, urls: list[str], args: tuple[str, ...]) -> tuple[str, int]:
    port = free_port()
    argv = [SGLANG_DP, "router", "--port", str(port), "--log-level", "warning"]
    proc = stack.enter_context(process([*argv, "--worker-urls", *urls, *args]))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: get_json(url + "/readiness")["healthy_workers"] == len(urls), proc, "router")
    return url, proc.pid


def start_sglang_router(stack: ExitStack, urls: list[str]) -> tuple[str, int] | None:
    if importlib.util.find_spec("sglang_router") is None:
        return None
    port = free_port()
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *urls]
    proc = stack.enter_context(process([*argv, "--port", str(port)]))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: get_json(url + "/v1/models")["data"], proc, "sglang-router", 120)
    return url, proc.pid


class Result:
    def __init__(self) -> None:
        self.answered: list[float] = []
        self.refused: list[float] = []
        self.refused_without_retry_after = 0
        self.gave_up = 0
        self.other = 0
        self.last = 0.0  # when the last answer came
        self.start = 0.0


def body() -> dict[str, Any]:
    """A prompt no other request shares (so cache_aware balances them by load)."""
    text = f"{random.getrandbits(64):016x} {STORY}"
    return {"text": text, "sampling_params": {"max_new_tokens": 64}}


async def one(session: aiohttp.ClientSession, url: str, result: Result) -> None:
    started = time.perf_counter()
    try:
        async with session.post(url + "/generate", json=body()) as reply:
            await reply.read()
            took = time.perf_counter() - started
            if reply.status == 200:
                result.answered.append(took)
                result.last = max(result.last, time.perf_counter())
            elif reply.status in (429, 408):
                result.refused.append(took)
                result.refused_without_retry_after += "Retry-After" not in reply.headers
            else:
                result.other += 1
    except (asyncio.TimeoutError, aiohttp.ClientError):
        result.gave_up += 1


def session() -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))


async def closed_loop(url: str, clients: int, seconds: float) -> Result:
    result = Result()
    deadline = time.perf_counter() + seconds
    async with session() as s:

        async def client() -> None:
            while time.perf_counter() < deadline:
                await one(s, url, result)

        await asyncio.gather(*(client() for _ in range(clients)))
    return result


async def open_loop(url: str, rate: float, seconds: float, seed: int = 0) -> Result:
    result = Result()
    rng = random.Random(seed)
    tasks = []
    async with session() as s:
        start = result.start = time.perf_counter()
        due = start
        while due < start + seconds:
            due += rng.expovariate(rate)
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(s, url, result)))
        await asyncio.gather(*tasks)
    return result


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else 0.0


def measure(url: str, pid: int, load: float, seconds: float) -> dict[str, Any]:
    unloaded = asyncio.run(closed_loop(url, 1, UNLOADED_S))
    full = asyncio.run(closed_loop(url, CAPACITY_CLIENTS, CAPACITY_S))
    capacity = len(full.answered) / CAPACITY_S
    router = psutil.Process(pid)
    before = router.memory_info().rss
    over = asyncio.run(open_loop(url, load * capacity, seconds))
    grown = (router.memory_info().rss - before) / 2**20
    offered = len(over.answered) + len(over.refused) + over.gave_up + over.other
    # answered per second from the first arrival to the last answer (a backlog drains late)
    goodput = len(over.answered) / max(over.last - over.start, seconds)
    unloaded_p99 = p(unloaded.answered, 99)
    return {
        "unloaded_p99_ms": round(unloaded_p99 * 1000, 1),
        "capacity_rps": round(capacity, 1),
        "offered_rps": round(offered / seconds, 1),
        "goodput_over_capacity": round(goodput / capacity, 3),
        "answered_p50_ms": round(statistics.median(over.answered) * 1000, 1),
        "answered_p99_ms": round(p(over.answered, 99) * 1000, 1),
        "answered_p99_over_unloaded_p99": round(p(over.answered, 99) / unloaded_p99, 2),
        "refused": len(over.refused),
        "refused_p99_ms": round(p(over.refused, 99) * 1000, 2),
        "refused_without_retry_after": over.refused_without_retry_after,
        "gave_up_share": round(over.gave_up / offered, 3),
        "other_errors": over.other,
        "router_rss_growth_mb": round(grown, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the overload")
    parser.add_argument("--load", type=float, default=3.0, help="offered load over capacity")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # clients that pile up when off
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results: dict[str, Any] = {"load": args.load, "seconds": args.seconds}
    runs: list[tuple[str, tuple[str, ...] | None]] = [
        ("admission_on", ADMISSION_ON),
        ("admission_off", ADMISSION_OFF),
        ("sglang_router", None),
    ]
    for name, router_args in runs:
        with ExitStack() as stack, workers(stack) as urls:
            if router_args is None:
                target = start_sglang_router(stack, urls)
                if target is None:
                    results[name] = "not installed"
                    continue
            else:
                target = start_router(stack, urls, router_args)
            results[name] = measure(*target, args.load, args.seconds)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(results))
    else:
        for name, value in results.items():
            print(f"{name:>14}  {value}")


if __name__ == "__main__":
    main()
