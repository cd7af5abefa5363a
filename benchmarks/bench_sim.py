"""Benchmark of the simulated worker: its CPU cost per request, and the fidelity of its clock.

    python benchmarks/bench_sim.py [--json] [--requests N] [--concurrency C]

Figures (one worker process, a closed-loop client on raw keep-alive HTTP/1.1 connections):
- `instant_cpu_us_per_req`: CPU time (user + system) of the worker process per request in
  `--instant` mode, shared-prefix prompts of ~256 words, 32 output tokens. Target <= 300 us, so
  eight workers + a router + a client fit on a 2-core machine.
- `instant_cpu_us_per_req_2k_prompt`: the same with 2,048-word shared prefixes (SGLang's
  generated-shared-prefix benchmark shape); tokenizing the prompt dominates.
- `instant_stream_cpu_us_per_req`: streamed `/generate`, 32 tokens at `--stream-interval 4`.
- `timed_cpu_us_per_req`: the cost model on (`--time-scale 10`), 2,048-word shared prefixes,
  128 output tokens, 32 requests in flight; `timed_stream_cpu_us_per_req`: the same streamed at
  `--stream-interval 8` (17 events a request: each is one socket write).
- `prefill_tokens_per_s_measured` vs `_configured`: one call of 24 distinct 4,096-token prompts
  (input_ids, max_new_tokens 1) at `--time-scale 10`, then the same call again (all cached but
  one token a prompt); measured = uncached tokens / (wall-time difference × 10), median of
  three. Must agree within 5 %.
- `decode_step_ms_measured` vs `_configured`: the wall-time slope between a 1-token and a
  401-token generation of one request at `--time-scale 10`, in modelled ms per step.
- `timed_cpu_pct_of_core`: how much of one core a worker uses while serving the timed workload
  at `timed_req_per_s` (32 in flight, 10× real time): scale it to your load and time scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from sglang_dp.launcher.process import free_port, stop_group

PREFILL_RATE = 30000.0  # the h100-llama3-8b profile
# one running request with ~200 tokens of context: 6 ms + 0.02 ms + 200 × 52 ns
DECODE_STEP_MS = 6.0 + 0.02 + 200 * 131072 / 2.5e12 * 1e3
TIME_SCALE = 10.0


@contextmanager
def worker(*args: str) -> Iterator[tuple[int, psutil.Process]]:
    """A simulated worker process on a free port: (port, process)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sglang_dp.sim",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--skip-server-warmup",
            *args,
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                    if s.recv(100).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("worker did not start")
            time.sleep(0.05)
        yield port, psutil.Process(proc.pid)
    finally:
        stop_group(proc, grace=10.0)


def request_bytes(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        b"POST %b HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (path.encode(), len(data), data)
    )


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 response's body (content-length or chunked)."""
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    if not head.startswith(b"http/1.1 200"):
        raise RuntimeError(head.decode())
    if b"transfer-encoding: chunked" in head:
        parts = []
        while True:
            size = int(await reader.readuntil(b"\r\n"), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return b"".join(parts)
            parts.append(chunk[:-2])
    length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
    return await reader.readexactly(length)


async def closed_loop(port: int, payloads: list[bytes], concurrency: int) -> float:
    """Send every payload, `concurrency` connections each waiting for its answer; wall seconds."""
    queue = iter(payloads)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for payload in queue:
            writer.write(payload)
            await read_response(reader)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return time.perf_counter() - start


def shared_prefix(
    n: int, groups: int, prefix_words: int, question_words: int, max_new: int, stream: bool = False
) -> list[bytes]:
    """`n` /generate requests in `groups` groups sharing a prefix (SGLang's benchmark shape)."""
    prefixes = [" ".join(f"g{g}w{i}" for i in range(prefix_words)) for g in range(groups)]
    out = []
    for r in range(n):
        question = " ".join(f"q{r}w{j}" for j in range(question_words))
        body = {
            "text": prefixes[r % groups] + " " + question,
            "stream": stream,
            "sampling_params": {"max_new_tokens": max_new},
        }
        out.append(request_bytes("/generate", body))
    return out


def cpu_us_per_request(
    proc: psutil.Process, port: int, payloads: list[bytes], concurrency: int
) -> tuple[float, float, float]:
    """(worker CPU µs per request, requests per second, worker CPU % of one core).

    A tenth of the payloads runs first as a warm-up.
    """
    warm = payloads[: len(payloads) // 10]
    asyncio.run(closed_loop(port, warm, concurrency))
    before = proc.cpu_times()
    wall = asyncio.run(closed_loop(port, payloads, concurrency))
    after = proc.cpu_times()
    cpu = (after.user - before.user) + (after.system - before.system)
    return cpu / len(payloads) * 1e6, len(payloads) / wall, cpu / wall * 100


def prefill_rate(port: int, repeats: int = 3) -> float:
    """Measured prefill tokens/s at TIME_SCALE, median of `repeats` (see module docstring)."""
    prompts, length = 24, 4096

    async def timed(payload: bytes) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.perf_counter()
        writer.write(payload)
        await read_response(reader)
        elapsed = time.perf_counter() - start
        writer.close()
        return elapsed

    rates = []
    for r in range(repeats):
        ids = [[(r * prompts + p) * 100_000 + i for i in range(length)] for p in range(prompts)]
        big = request_bytes(
            "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}}
        )
        # the same call again finds every prompt cached (all but its last token): parsing and
        # HTTP cost the same, so the difference is the prefill of the uncached tokens
        uncached = asyncio.run(timed(big))
        cached = asyncio.run(timed(big))
        rates.append(prompts * (length - 1) / ((uncached - cached) * TIME_SCALE))
    return statistics.median(rates)


def decode_step_ms(port: int) -> float:
    """Measured decode step (batch of one, 1-token prompt) at TIME_SCALE, in modelled ms."""
    steps = 400

    async def timed(max_new: int) -> float:
        payload = request_bytes(
            "/generate", {"input_ids": [max_new], "sampling_params": {"max_new_tokens": max_new}}
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.perf_counter()
        writer.write(payload)
        await read_response(reader)
        elapsed = time.perf_counter() - start
        writer.close()
        return elapsed

    # the slope between 1 and 1 + steps tokens: HTTP and prefill cancel out
    base = min(asyncio.run(timed(1)) for _ in range(3))
    return (asyncio.run(timed(1 + steps)) - base) * TIME_SCALE / steps * 1e3


def run(requests: int, concurrency: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "requests": requests,
        "concurrency": concurrency,
        "cpus": os.cpu_count(),
    }
    with worker("--instant") as (port, proc):
        cpu, rps, _ = cpu_us_per_request(
            proc, port, shared_prefix(requests, 16, 256, 16, 32), concurrency
        )
        results["instant_cpu_us_per_req"] = round(cpu, 1)
        results["instant_req_per_s"] = round(rps)
        cpu, _, _ = cpu_us_per_request(
            proc, port, shared_prefix(requests // 4, 16, 2048, 32, 32), concurrency
        )
        results["instant_cpu_us_per_req_2k_prompt"] = round(cpu, 1)
    with worker("--instant", "--stream-interval", "4") as (port, proc):
        cpu, _, _ = cpu_us_per_request(
            proc, port, shared_prefix(requests, 16, 256, 16, 32, stream=True), concurrency
        )
        results["instant_stream_cpu_us_per_req"] = round(cpu, 1)
    with worker("--time-scale", str(TIME_SCALE), "--stream-interval", "8") as (port, proc):
        n = max(64, requests // 10)
        cpu, rps, pct = cpu_us_per_request(proc, port, shared_prefix(n, 8, 2048, 32, 128), 32)
        results["timed_cpu_us_per_req"] = round(cpu, 1)
        results["timed_req_per_s"] = round(rps)
        results["timed_cpu_pct_of_core"] = round(pct, 1)
        payloads = shared_prefix(n, 8, 2048, 32, 128, stream=True)
        cpu, _, _ = cpu_us_per_request(proc, port, payloads, 32)
        results["timed_stream_cpu_us_per_req"] = round(cpu, 1)
        measured = prefill_rate(port)
        step_ms = decode_step_ms(port)
    results["prefill_tokens_per_s_configured"] = PREFILL_RATE
    results["prefill_tokens_per_s_measured"] = round(measured)
    results["prefill_rate_error_pct"] = round(abs(measured / PREFILL_RATE - 1) * 100, 2)
    results["decode_step_ms_configured"] = round(DECODE_STEP_MS, 3)
    results["decode_step_ms_measured"] = round(step_ms, 3)
    results["instant_target_met"] = results["instant_cpu_us_per_req"] <= 300
    results["prefill_within_5pct"] = results["prefill_rate_error_pct"] <= 5
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    results = run(args.requests, args.concurrency)
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:36} {value}")


if __name__ == "__main__":
    main()
