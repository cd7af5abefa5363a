"""Token keys under load: the router's event loop with long prompts encoded off it, and without.

A byte-level BPE tokenizer (8,000 tokens, trained here in a second on Python's own standard
library sources, with Llama 3's special tokens and chat template; nothing is downloaded) is
saved to a temporary folder. Two `sglang-dp sim-worker --instant --enable-cache-report`
processes answer at once (`--context-length 65536`). Two routers with `--routing-key tokens
--tokenizer-path` run in front of them, each a child process of this script
(`--serve-router`): `RouterServer` plus a loop-lag probe. One has the encoding pool
(`--tokenizer-threads`, its default), the other 0 (every prompt encoded on the loop: the router
before issue 22's encoding pool).

The load: chat requests of ~8,000 tokens, a system prompt of ~2,000 tokens (one of 16, shared)
and a user message of ~6,000 tokens of its own (a window of the same corpus at a random
place), 16-token answers. Per router, in alternating blocks (pool, inline, pool, inline):
1. paced: an open loop at `RATE` req/s (below both routers' capacity) — the probe's figures
   and the client's latency;
2. closed loop: `CONCURRENCY` clients back to back — requests/s.

The probe (in the router process, on its loop): a task sleeping 1 ms at a time; a wake-up
later than asked is a stall of the loop. On a shared machine the OS also keeps the loop off a
CPU (preemption), which is no work of the router's: the probe reads the loop thread's run-queue
wait (`/proc/self/task/<tid>/schedstat`) across each sleep and takes it off.
`loop_block_ms_max` (and `_p99`, `loop_stalls_over_2ms`) is what is left: the loop busy or
blocked in the router's own work (encoding, or waiting for the GIL or the tokenizer's threads).
`loop_lag_wall_ms_*` is the raw lateness; the `_idle` figures are the probe's floor, read on
the idle routers in the same run (libuv's timers count whole milliseconds).
`loop_cpu_us_per_req`: the loop thread's CPU time per request in the closed loops;
`router_cpu_us_per_req`: the router process's (all its threads). The JSON also goes to
benchmarks/results_tokenize.json. Full run ~80 s, `--quick` ~30 s.

    python benchmarks/bench_tokenize.py [--json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

from sglang_dp.launcher.ports import free_port
from sglang_dp.launcher.process import stop_group
from sglang_dp.router.upstream import UpstreamPool
from support import healthy_workers, start_worker, wait_until

RESULTS = Path(__file__).with_name("results_tokenize.json")
HEADERS = [(b"content-type", b"application/json")]
CHAT = "/v1/chat/completions"
VOCAB = 8000
CORPUS_BYTES = 3 << 20
SYSTEM_TOKENS = 2000
USER_TOKENS = 6000
SYSTEMS = 16
OUTPUT_TOKENS = 16
RATE = 10.0
CONCURRENCY = 8
PROBE_S = 0.001
TIMEOUT_S = 60.0
SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TARGETS = {"loop_block_ms_max_pool": ("<=", 2.0)}


@dataclass(frozen=True)
class Plan:
    paced_s: float
    closed_s: float
    blocks: int


FULL = Plan(paced_s=8.0, closed_s=8.0, blocks=2)
QUICK = Plan(paced_s=4.0, closed_s=4.0, blocks=1)


# -- the tokenizer and the prompts -----------------------------------------------------------


def corpus() -> str:
    """Python's standard library sources, in a fixed order, up to CORPUS_BYTES, their runs of
    white space made single spaces (indentation is not what chat prompts are made of)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= CORPUS_BYTES:
            break
    return " ".join("".join(parts).split())  # words and single spaces, as prose has


def build_tokenizer(folder: Path, text: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    step = 4096
    tok.train_from_iterator((text[i : i + step] for i in range(0, len(text), step)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(folder))


class Prompts:
    """Chat bodies: a shared system prompt and a user message of its own, ~8k tokens."""

    def __init__(self, text: str, folder: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        sample = text[:200_000]
        self.chars_per_token = len(sample) / len(tok.encode(sample, add_special_tokens=False))
        self.text = text
        self.rng = random.Random(0)
        self.system_chars = round(SYSTEM_TOKENS * self.chars_per_token)
        self.user_chars = round(USER_TOKENS * self.chars_per_token)
        self.systems = [self._window(self.system_chars) for _ in range(SYSTEMS)]
        body = self.body()
        rendered = tok.apply_chat_template(
            orjson.loads(body)["messages"], tokenize=False, add_generation_prompt=True
        )
        self.prompt_tokens = len(tok.encode(rendered, add_special_tokens=False))
        self.body_bytes = len(body)

    def _window(self, chars: int) -> str:
        at = self.rng.randrange(len(self.text) - chars)
        return self.text[at : at + chars]

    def body(self) -> bytes:
        messages = [
            {"role": "system", "content": self.rng.choice(self.systems)},
            {"role": "user", "content": self._window(self.user_chars)},
        ]
        return orjson.dumps({"messages": messages, "max_tokens": OUTPUT_TOKENS})


# -- the router child: RouterServer and the probe --------------------------------------------


class Probe:
    """Sleeps PROBE_S at a time on the loop; how late each wake-up is, and the loop thread's
    CPU time meanwhile (see the module docstring)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.reset()

    def reset(self) -> None:
        self.loop_cpu = time.thread_time()  # the probe runs on the loop: the loop thread's
        self.router_cpu = time.process_time()
        self.lateness: list[float] = []  # wall
        self.stalls: list[float] = []  # wall less the time the OS kept the loop off a CPU

    async def run(self) -> None:
        # the loop thread's time waiting for a CPU (ns): the second field of its schedstat
        stat = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
        while True:
            wall, queued = time.perf_counter(), int(os.pread(stat, 128, 0).split()[1])
            await asyncio.sleep(PROBE_S)
            late = time.perf_counter() - wall - PROBE_S
            preempted = (int(os.pread(stat, 128, 0).split()[1]) - queued) * 1e-9
            self.lateness.append(late)
            self.stalls.append(max(0.0, late - preempted))

    def report(self) -> None:
        """One JSON line on stdout (the parent reads it), then start afresh."""
        late = sorted(self.lateness) or [0.0]
        stalls = sorted(self.stalls) or [0.0]
        line = {
            "late_max_ms": late[-1] * 1e3,
            "late_p99_ms": late[int(0.99 * (len(late) - 1))] * 1e3,
            "stall_max_ms": stalls[-1] * 1e3,
            "stall_p99_ms": stalls[int(0.99 * (len(stalls) - 1))] * 1e3,
            "over_2ms": sum(x > 0.002 for x in stalls),
            "samples": len(late),
            "threads": self.threads,
            "loop_cpu_s": time.thread_time() - self.loop_cpu,
            "router_cpu_s": time.process_time() - self.router_cpu,
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        self.reset()


async def serve_router(port: int, threads: int, folder: str, workers: list[str]) -> None:
    from sglang_dp.router.config import RouterConfig
    from sglang_dp.router.server import RouterServer

    config = RouterConfig(
        worker_urls=tuple(workers),
        port=port,
        routing_key="tokens",
        tokenizer_path=folder,
        tokenizer_threads=threads if threads >= 0 else None,
        log_level="error",
    )
    server = RouterServer(config)
    await server.start()
    probe = Probe(server.encoding.threads if server.encoding is not None else 0)
    probing = asyncio.get_running_loop().create_task(probe.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, probe.report)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    probing.cancel()
    await server.stop(1.0)


@dataclass
class Router:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    threads: int
    rounds: list[dict[str, float]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    closed_requests: int = 0
    closed_seconds: float = 0.0
    loop_cpu_s: float = 0.0  # in the closed loops
    router_cpu_s: float = 0.0
    errors: int = 0

    def probe(self) -> dict[str, float]:
        """The probe's figures since the last call."""
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"router {self.name} exited with {self.proc.poll()}")
        return dict(json.loads(line))


def start_router(
    stack: ExitStack, name: str, threads: int, folder: Path, workers: list[str]
) -> Router:
    port = free_port()
    argv = [sys.executable, __file__, "--serve-router", str(port), str(threads), str(folder)]
    proc = subprocess.Popen(
        [*argv, *workers], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
    stack.callback(stop_group, proc)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: healthy_workers(url) == len(workers), proc, f"router {name}")
    router = Router(name, url, proc, 0)
    router.threads = int(router.probe()["threads"])
    return router


# -- the load --------------------------------------------------------------------------------


class Load:
    def __init__(self, prompts: Prompts) -> None:
        self.pool = UpstreamPool()
        self.prompts = prompts
        self.failures: collections.Counter[str] = collections.Counter()

    async def one(self, router: Router) -> float | None:
        body = self.prompts.body()
        started = time.perf_counter()
        try:
            resp = await self.pool.request(
                router.url, "POST", CHAT, HEADERS, body, timeout=TIMEOUT_S
            )
            payload = await resp.read(TIMEOUT_S)
        except Exception as exc:
            self.failures[type(exc).__name__] += 1
            return None
        if resp.status != 200:
            self.failures[f"{resp.status} {payload[:200]!r}"] += 1
            return None
        return time.perf_counter() - started

    async def paced(self, router: Router, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        router.probe()  # start afresh
        tasks = []
        start = loop.time()
        for i in range(round(RATE * seconds)):
            due = start + i / RATE
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            tasks.append(loop.create_task(self.one(router)))
        done = await asyncio.gather(*tasks)
        router.rounds.append(router.probe())
        router.latencies += [t for t in done if t is not None]
        router.errors += sum(t is None for t in done)

    async def closed_loop(self, router: Router, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        count = 0

        async def client() -> None:
            nonlocal count
            while loop.time() < end:
                if await self.one(router) is None:
                    router.errors += 1
                else:
                    count += 1

        router.probe()
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        router.closed_seconds += time.perf_counter() - started
        router.closed_requests += count
        cpu = router.probe()
        router.loop_cpu_s += cpu["loop_cpu_s"]
        router.router_cpu_s += cpu["router_cpu_s"]


async def measure(plan: Plan, load: Load, routers: list[Router]) -> tuple[float, float]:
    """Warm both routers, read the probe's floor, then the alternating blocks."""
    for router in routers:
        for _ in range(SYSTEMS * 2):  # the system prompts seen: the memo holds them
            await load.one(router)
        router.probe()
    await asyncio.sleep(2.0)
    floors = [router.probe() for router in routers]
    idle = (max(f["stall_max_ms"] for f in floors), max(f["late_max_ms"] for f in floors))
    for _ in range(plan.blocks):
        for router in routers:
            await load.paced(router, plan.paced_s)
        for router in routers:
            await load.closed_loop(router, plan.closed_s)
    return idle


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def summarise(
    plan: Plan, quick: bool, prompts: Prompts, routers: list[Router], idle: tuple[float, float]
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "quick": quick,
        "prompt_tokens": prompts.prompt_tokens,
        "body_bytes": prompts.body_bytes,
        "chars_per_token": round(prompts.chars_per_token, 2),
        "rate": RATE,
        "concurrency": CONCURRENCY,
        "loop_block_ms_max_idle": round(idle[0], 3),
        "loop_lag_wall_ms_max_idle": round(idle[1], 3),
    }
    for router in routers:
        n = router.name
        rounds = router.rounds
        out[f"loop_block_ms_max_{n}"] = round(max(r["stall_max_ms"] for r in rounds), 3)
        out[f"loop_block_ms_p99_{n}"] = round(max(r["stall_p99_ms"] for r in rounds), 3)
        out[f"loop_lag_wall_ms_max_{n}"] = round(max(r["late_max_ms"] for r in rounds), 3)
        out[f"loop_lag_wall_ms_p99_{n}"] = round(max(r["late_p99_ms"] for r in rounds), 3)
        out[f"loop_stalls_over_2ms_{n}"] = sum(r["over_2ms"] for r in router.rounds)
        out[f"latency_ms_p50_{n}"] = round(statistics.median(router.latencies) * 1e3, 2)
        out[f"latency_ms_p99_{n}"] = round(percentile(router.latencies, 0.99) * 1e3, 2)
        out[f"rps_{n}"] = round(router.closed_requests / router.closed_seconds, 1)
        loop_us = router.loop_cpu_s / router.closed_requests * 1e6
        out[f"loop_cpu_us_per_req_{n}"] = round(loop_us)
        out[f"router_cpu_us_per_req_{n}"] = round(
            router.router_cpu_s / router.closed_requests * 1e6
        )
        out[f"errors_{n}"] = router.errors
        out[f"threads_{n}"] = router.threads
    out["rps_pool_over_inline"] = round(out["rps_pool"] / out["rps_inline"], 3)

    out["targets"] = {
        name: {"op": op, "target": value, "met": _met(out[name], op, value)}
        for name, (op, value) in TARGETS.items()
    }
    return out


def _met(value: float, op: str, target: float) -> bool:
    return value <= target if op == "<=" else value >= target


def table(out: dict[str, Any]) -> str:
    lines = [
        f"chat prompts of {out['prompt_tokens']} tokens ({out['body_bytes']} bytes), "
        f"{out['chars_per_token']} chars/token",
        f"probe floor (idle routers): block max {out['loop_block_ms_max_idle']} ms, "
        f"wall lag max {out['loop_lag_wall_ms_max_idle']} ms",
        f"{'':24}{'pool':>12}{'inline':>12}",
    ]
    for name in (
        "threads",
        "loop_block_ms_max",
        "loop_block_ms_p99",
        "loop_lag_wall_ms_max",
        "loop_lag_wall_ms_p99",
        "loop_stalls_over_2ms",
        "latency_ms_p50",
        "latency_ms_p99",
        "rps",
        "loop_cpu_us_per_req",
        "router_cpu_us_per_req",
        "errors",
    ):
        lines.append(f"{name:24}{out[name + '_pool']:>12}{out[name + '_inline']:>12}")
    lines.append(f"rps pool / inline: {out['rps_pool_over_inline']}")

    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-router":
        port, threads, folder, *workers = sys.argv[2:]
        uvloop.run(serve_router(int(port), int(threads), folder, workers))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="shorter phases")
    parser.add_argument(
        "--threads", type=int, default=-1, help="the pool's threads (default: the router's)"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp) / "tokenizer"
        text = corpus()
        build_tokenizer(folder, text)
        prompts = Prompts(text, folder)
        workers = [
            start_worker(stack, "--instant", "--enable-cache-report", "--context-length", "65536")
            for _ in range(2)
        ]
        routers = [
            start_router(stack, "pool", args.threads, folder, workers),
            start_router(stack, "inline", 0, folder, workers),
        ]
        load = Load(prompts)
        idle = uvloop.run(measure(plan, load, routers))
    out = summarise(plan, args.quick, prompts, routers, idle)
    out["failures"] = dict(load.failures)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out) if args.json else table(out))


if __name__ == "__main__":
    main()
