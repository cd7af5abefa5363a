"""Router overhead: the same load sent to four instant workers directly and through the router.

Starts four `sglang-dp sim-worker --instant` processes (they answer at once: no cost model), a
`sglang-dp router` in front of them and, if the `sglang_router` package is importable, an
sglang-router (Rust) in front of the same workers as a baseline. Every process runs in its own
session and is stopped by its process group at the end (also on Ctrl-C or an error).

The load: 2 KB prompts in 32 shared-prefix groups (1.5 KB shared, 0.5 KB own), 16 output
tokens, `/generate` and `/v1/chat/completions` alternating. "Direct" means the client
round-robins over the workers itself; the client is `sglang_dp.router.upstream.UpstreamPool`
on uvloop (the router's own lean client: the load generator must be cheap, as it shares two
cores with four workers and the router). Phases, in this order:

1. stream TTFT at idle: sequential streamed `/generate` requests on a reused keep-alive
   connection; the time to the first `data:` event, median. A proxy that holds streamed bytes
   back (sglang-router 0.3.2: ~40 ms on reused connections) shows here.
2. paced: an open loop at 1,000 req/s in alternating one-second blocks (direct, router,
   baseline, direct, ...), so a drift in the machine's load hits every target alike. Latency
   percentiles, and the router process's CPU time (psutil, its process tree) per request.
3. closed loop: 64 concurrent clients, in alternating blocks as well; requests/s.

Reported (router minus direct, measured in this run): `added_p50_ms`, `added_p99_ms`,
`router_cpu_us_per_req`, `closed_loop_rps`, `added_ttft_ms_stream`, each with its target, and
the CPU that other programs used meanwhile (two cores: anything else running skews the figures).
Full run about 45 s, `--quick` about 10 s. The JSON also goes to benchmarks/results_overhead.json.

    python benchmarks/bench_overhead.py [--json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import uvloop

from sglang_dp.launcher.ports import free_port
from sglang_dp.router.upstream import UpstreamPool
from support import process

SGLANG_DP = str(Path(sys.executable).parent / "sglang-dp")
RESULTS = Path(__file__).with_name("results_overhead.json")
HEADERS = [(b"content-type", b"application/json")]
WORKERS = 4
GROUPS = 32
PROMPT_CHARS = 2048
SHARED_CHARS = 1536
OUTPUT_TOKENS = 16
RATE = 1000.0
CONCURRENCY = 64
TIMEOUT_S = 30.0
# Targets from the issue (sglang-router 0.3.2 measured here: +0.4-0.6 ms p50, 424-456 µs CPU
# per request paced, 2,100-2,700 req/s closed loop, ~40 ms stream hold-back).
TARGETS = {
    "added_p50_ms": ("<=", 0.5),
    "router_cpu_us_per_req": ("<=", 300.0),
    "closed_loop_rps": (">=", 2800.0),
    "added_ttft_ms_stream": ("<=", 1.0),
}


@dataclass(frozen=True)
class Plan:
    """How long each phase runs (full run well under 2 minutes, --quick under 30 s)."""

    blocks: int  # alternating blocks per target, paced and closed loop each
    paced_block_s: float
    closed_block_s: float
    streams: int  # sequential streamed requests per target for the TTFT
    warmup: int  # requests per target before measuring


FULL = Plan(blocks=8, paced_block_s=1.0, closed_block_s=1.0, streams=100, warmup=400)
QUICK = Plan(blocks=3, paced_block_s=0.5, closed_block_s=0.5, streams=30, warmup=200)


@dataclass
class Tally:
    """What one target's blocks of one phase added up to."""

    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    router_cpu_s: float = 0.0  # the router process (tree), 0 for direct
    client_cpu_s: float = 0.0  # this process: the load generator
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests

    def per_request_us(self, seconds: float) -> float:
        return seconds / max(self.requests, 1) * 1e6


@dataclass
class Target:
    """Where the load goes: one URL (a router) or several (direct, round-robin)."""

    name: str
    urls: list[str]
    proc: subprocess.Popen[bytes] | None = None  # the router process, for its CPU time
    turn: int = 0
    paced: Tally = field(default_factory=Tally)
    closed: Tally = field(default_factory=Tally)
    result: dict[str, float] = field(default_factory=dict)

    def next_url(self) -> str:
        self.turn += 1
        return self.urls[self.turn % len(self.urls)]


# --- processes


def answers(url: str) -> bool:
    """One tiny /generate through `url` succeeds (works for workers and both routers)."""
    body = json.dumps({"text": "hello", "sampling_params": {"max_new_tokens": 1}}).encode()
    request = urllib.request.Request(url + "/generate", body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.HTTPError):
        return False


def wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not answers(url):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {timeout:.0f} s")
        time.sleep(0.05)


def start_workers(stack: ExitStack) -> list[str]:
    """Four instant sim workers, started together, ready when this returns."""
    started = []
    for _ in range(WORKERS):
        port = free_port()
        argv = [SGLANG_DP, "sim-worker", "--instant", "--port", str(port)]
        proc = stack.enter_context(process([*argv, "--log-level", "warning"]))
        started.append((f"http://127.0.0.1:{port}", proc))
    for url, proc in started:
        wait_ready(url, proc, f"sim worker {url}")
    return [url for url, _ in started]


def start_router(stack: ExitStack, workers: list[str]) -> Target:
    port = free_port()
    argv = [SGLANG_DP, "router", "--worker-urls", *workers, "--port", str(port)]
    proc = stack.enter_context(process([*argv, "--log-level", "warning"]))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "sglang-dp router")
    return Target("router", [url], proc)


def start_sglang_router(stack: ExitStack, workers: list[str]) -> Target | None:
    """The Rust sglang-router as a baseline, if installed (never downloads: HF offline)."""
    if importlib.util.find_spec("sglang_router") is None:
        return None
    port = free_port()
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = stack.enter_context(
        process([*argv, "--host", "127.0.0.1", "--port", str(port)], env=env)
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "sglang-router", timeout=120)
    return Target("sglang_router", [url], proc)


def cpu_seconds(proc: subprocess.Popen[bytes] | None) -> float:
    """User + system CPU time of a process and its children (a launcher may fork)."""
    if proc is None:
        return 0.0
    try:
        root = psutil.Process(proc.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            times = p.cpu_times()
            total += times.user + times.system
        return total
    except psutil.NoSuchProcess:
        return 0.0


# --- load


def payloads(seed: int = 0) -> list[tuple[str, bytes]]:
    """(path, body): 2 KB prompts, 32 groups sharing 1.5 KB prefixes, generate and chat."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(500)
    ]

    def text(chars: int) -> str:
        out = ""
        while len(out) < chars:
            out += rng.choice(words) + " "
        return out[:chars]

    prefixes = [text(SHARED_CHARS) for _ in range(GROUPS)]
    out = []
    for i in range(GROUPS * 8):
        prompt = prefixes[rng.randrange(GROUPS)] + text(PROMPT_CHARS - SHARED_CHARS)
        if i % 2:
            chat = {
                "model": "default",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": OUTPUT_TOKENS,
            }
            out.append(("/v1/chat/completions", json.dumps(chat).encode()))
        else:
            gen = {"text": prompt, "sampling_params": {"max_new_tokens": OUTPUT_TOKENS}}
            out.append(("/generate", json.dumps(gen).encode()))
    return out


class Load:
    """Sends requests with one UpstreamPool; round-robins over a target's URLs."""

    def __init__(self, bodies: list[tuple[str, bytes]]) -> None:
        self.pool = UpstreamPool()
        self.bodies = bodies
        self.sent = 0

    async def one(self, target: Target) -> float | None:
        """One request, read to its end: its latency in seconds, or None if it failed."""
        path, body = self.bodies[self.sent % len(self.bodies)]
        self.sent += 1
        started = time.perf_counter()
        try:
            resp = await self.pool.request(
                target.next_url(), "POST", path, HEADERS, body, timeout=TIMEOUT_S
            )
            await resp.read()
        except Exception:
            return None
        return time.perf_counter() - started if resp.status == 200 else None

    async def warm(self, target: Target, count: int) -> None:
        """Connections, caches, code paths: `count` requests, CONCURRENCY at a time."""
        await self.closed_loop(target, Tally(), count=count)

    async def paced(self, target: Target, seconds: float) -> None:
        """An open loop at RATE for `seconds` (requests start on schedule, whatever is late)."""
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[float | None]] = []
        with measuring(target, target.paced):
            start = loop.time()
            for i in range(round(RATE * seconds)):
                due = start + i / RATE
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                tasks.append(loop.create_task(self.one(target)))
            done = await asyncio.gather(*tasks)
        target.paced.requests += len(done)
        target.paced.latencies += [t for t in done if t is not None]
        target.paced.errors += sum(t is None for t in done)

    async def closed_loop(
        self, target: Target, tally: Tally, seconds: float = math.inf, count: int = 0
    ) -> None:
        """CONCURRENCY clients back to back, for `seconds` or until `count` requests."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        limit = count or math.inf

        async def client() -> None:
            while loop.time() < end and tally.requests < limit:
                tally.requests += 1
                if await self.one(target) is None:
                    tally.errors += 1

        with measuring(target, tally):
            await asyncio.gather(*(client() for _ in range(CONCURRENCY)))

    async def stream_ttft(self, target: Target, count: int) -> tuple[float, int]:
        """Median time to the first streamed event on a reused connection; sockets opened."""
        pool = UpstreamPool()  # its own pool: the count of sockets shows the reuse
        prompt = next(json.loads(b)["text"] for p, b in self.bodies if p == "/generate")
        params = {"max_new_tokens": OUTPUT_TOKENS}
        payload = json.dumps({"text": prompt, "sampling_params": params, "stream": True}).encode()
        times = []
        try:
            for i in range(count + len(target.urls)):  # the first round opens the sockets
                started = time.perf_counter()
                resp = await pool.request(
                    target.next_url(), "POST", "/generate", HEADERS, payload, timeout=TIMEOUT_S
                )
                first = None
                async for chunk in resp:
                    if first is None and b"data:" in chunk:
                        first = time.perf_counter() - started
                if first is None:
                    raise RuntimeError(f"{target.name}: a stream without a data event")
                if i >= len(target.urls):
                    times.append(first)
            return statistics.median(times), pool.open_connections()
        finally:
            await pool.close()


@contextmanager
def measuring(target: Target, tally: Tally) -> Iterator[None]:
    """Add the wall time, router CPU and client CPU of the block to `tally`."""
    wall, router, client = time.perf_counter(), cpu_seconds(target.proc), time.process_time()
    yield
    tally.wall_s += time.perf_counter() - wall
    tally.router_cpu_s += cpu_seconds(target.proc) - router
    tally.client_cpu_s += time.process_time() - client


# --- the run


def busy_cpu_seconds() -> tuple[float, float]:
    """CPU time used on the whole machine, and by this process and its children."""
    times = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq")  # guest time is inside user
    machine = sum(getattr(times, name, 0.0) for name in fields)
    me = psutil.Process()
    ours = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        ours += t.user + t.system
    return machine, ours


async def measure(plan: Plan, targets: list[Target]) -> float:
    """Run every phase; return the CPU cores other programs used meanwhile (noise)."""
    load = Load(payloads())
    machine, ours = busy_cpu_seconds()
    wall = time.perf_counter()
    try:
        for target in targets:
            await load.warm(target, plan.warmup)
        for target in targets:  # at idle: nothing else is running
            ttft, sockets = await load.stream_ttft(target, plan.streams)
            target.result["ttft_ms_stream"] = ttft * 1e3
            target.result["stream_sockets"] = sockets
        # Alternating blocks: a drift in the machine's load hits every target alike.
        for _ in range(plan.blocks):
            for target in targets:
                await load.paced(target, plan.paced_block_s)
        for _ in range(plan.blocks):
            for target in targets:
                await load.closed_loop(target, target.closed, plan.closed_block_s)
    finally:
        await load.pool.close()
    for target in targets:
        target.result.update(results(target))
    machine_end, ours_end = busy_cpu_seconds()
    return ((machine_end - machine) - (ours_end - ours)) / (time.perf_counter() - wall)


def results(target: Target) -> dict[str, float]:
    paced, closed = target.paced, target.closed
    latencies = sorted(paced.latencies)
    out = {
        "p50_ms": percentile(latencies, 0.50) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "paced_requests": paced.requests,
        "paced_rps": paced.requests / paced.wall_s,
        "closed_loop_rps": (closed.requests - closed.errors) / closed.wall_s,
        "closed_requests": closed.requests,
        "errors": paced.errors + closed.errors,
        "client_cpu_us_per_req": paced.per_request_us(paced.client_cpu_s),
    }
    if target.proc is not None:
        out["cpu_us_per_req"] = paced.per_request_us(paced.router_cpu_s)
        out["closed_cpu_us_per_req"] = closed.per_request_us(closed.router_cpu_s)
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarise(plan: Plan, quick: bool, targets: list[Target], others: float) -> dict[str, Any]:
    by_name = {t.name: t.result for t in targets}
    direct, router = by_name["direct"], by_name["router"]
    headline = {
        "added_p50_ms": router["p50_ms"] - direct["p50_ms"],
        "added_p99_ms": router["p99_ms"] - direct["p99_ms"],
        "router_cpu_us_per_req": router["cpu_us_per_req"],
        "closed_loop_rps": router["closed_loop_rps"],
        "added_ttft_ms_stream": router["ttft_ms_stream"] - direct["ttft_ms_stream"],
    }
    out: dict[str, Any] = {key: round(value, 3) for key, value in headline.items()}
    out["targets_met"] = {
        key: (out[key] <= bound if op == "<=" else out[key] >= bound)
        for key, (op, bound) in TARGETS.items()
    }
    if "sglang_router" in by_name:
        base = by_name["sglang_router"]
        out["sglang_router"] = {
            "added_p50_ms": round(base["p50_ms"] - direct["p50_ms"], 3),
            "added_p99_ms": round(base["p99_ms"] - direct["p99_ms"], 3),
            "cpu_us_per_req": round(base["cpu_us_per_req"], 1),
            "closed_loop_rps": round(base["closed_loop_rps"]),
            "added_ttft_ms_stream": round(base["ttft_ms_stream"] - direct["ttft_ms_stream"], 3),
        }
    out["measured"] = {
        name: {key: round(value, 3) for key, value in result.items()}
        for name, result in by_name.items()
    }
    out["setup"] = {
        "workers": WORKERS,
        "rate_per_s": RATE,
        "concurrency": CONCURRENCY,
        "prompt_chars": PROMPT_CHARS,
        "groups": GROUPS,
        "output_tokens": OUTPUT_TOKENS,
        "paced_s_per_target": plan.blocks * plan.paced_block_s,
        "closed_s_per_target": plan.blocks * plan.closed_block_s,
        "quick": quick,
        "cpus": os.cpu_count(),
        "other_programs_cpu_cores": round(others, 2),  # > 0.1: the figures are noisy
    }
    return out


ROWS = [
    ("p50 ms (paced)", "p50_ms", "{:.3f}"),
    ("p99 ms (paced)", "p99_ms", "{:.3f}"),
    ("router CPU µs/req (paced)", "cpu_us_per_req", "{:.0f}"),
    ("client CPU µs/req (paced)", "client_cpu_us_per_req", "{:.0f}"),
    ("closed-loop req/s", "closed_loop_rps", "{:.0f}"),
    ("router CPU µs/req (closed)", "closed_cpu_us_per_req", "{:.0f}"),
    ("stream TTFT ms (idle)", "ttft_ms_stream", "{:.3f}"),
    ("errors", "errors", "{:.0f}"),
]


def table(out: dict[str, Any]) -> str:
    """The measurements side by side, then the headline figures against their targets."""
    measured = out["measured"]
    names = list(measured)
    lines = [f"{'':28}" + "".join(f"{n:>15}" for n in names)]
    for label, key, form in ROWS:
        cells = [form.format(measured[n][key]) if key in measured[n] else "-" for n in names]
        lines.append(f"{label:28}" + "".join(f"{c:>15}" for c in cells))
    lines.append("")
    for key, (op, bound) in TARGETS.items():
        verdict = "met" if out["targets_met"][key] else "MISSED"
        lines.append(f"{key:24}{out[key]:>10.3f}   target {op} {bound:g}: {verdict}")
    lines.append(f"{'added_p99_ms':24}{out['added_p99_ms']:>10.3f}")
    others = out["setup"]["other_programs_cpu_cores"]
    lines.append(f"other programs used {others:.2f} CPU cores meanwhile (noise if > 0.1)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="shorter phases (under 30 s)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so the process groups below are stopped either way
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with ExitStack() as stack:
            workers = start_workers(stack)
            targets = [Target("direct", workers), start_router(stack, workers)]
            baseline = start_sglang_router(stack, workers)
            if baseline is not None:
                targets.append(baseline)
            others = uvloop.run(measure(plan, targets))
    except KeyboardInterrupt:
        sys.exit("interrupted: workers and routers stopped")
    out = summarise(plan, args.quick, targets, others)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out) if args.json else table(out))


if __name__ == "__main__":
    main()
