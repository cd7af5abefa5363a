"""Client CPU per forwarded request: the router's UpstreamPool against an aiohttp baseline.

Starts one `sglang-dp sim-worker --instant` process (answers at once, no cost model), then in
this process, on uvloop (the router's loop), sends N POST /generate requests (2 KB prompt,
max_new_tokens 16) sequentially and then from 64 concurrent tasks, first with
`upstream.UpstreamPool`, then with `aiohttp.ClientSession` (keep-alive connector). Measured:
this process's CPU time (`time.process_time`, the worker's CPU is not counted) and wall time.
Prints µs of client CPU per request, the aiohttp/pool ratio and requests/s, per mode and overall.

    python benchmarks/bench_upstream.py [--json] [--requests N] [--concurrency C] [--loop asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from sglang_dp.launcher.ports import free_port
from sglang_dp.launcher.process import stop_group
from sglang_dp.router.upstream import UpstreamPool

SGLANG_DP = str(Path(sys.executable).parent / "sglang-dp")
HEADERS = [(b"content-type", b"application/json"), (b"x-request-id", b"bench")]
Send = Callable[[bytes], Awaitable[int]]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@contextmanager
def sim_worker() -> Iterator[str]:
    """One instant simulated worker in its own process group, stopped by that group."""
    port = free_port()
    cmd = [SGLANG_DP, "sim-worker", "--port", str(port), "--instant", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the simulated worker did not become healthy")
            time.sleep(0.05)
        yield url
    finally:
        stop_group(proc)


def bodies(count: int = 64, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + "      .,"
    return [
        json.dumps(
            {
                "text": "".join(rng.choices(alphabet, k=2048)),
                "sampling_params": {"max_new_tokens": 16},
            }
        ).encode()
        for _ in range(count)
    ]


async def drive(
    send: Send, payloads: list[bytes], requests: int, concurrency: int
) -> dict[str, float]:
    """`requests` sends from `concurrency` tasks; client CPU and wall time per request."""
    next_index = 0
    failures = 0

    async def loop() -> None:
        nonlocal next_index, failures
        while next_index < requests:
            i = next_index
            next_index += 1
            if await send(payloads[i % len(payloads)]) != 200:
                failures += 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if failures:
        raise RuntimeError(f"{failures} requests failed")
    return {"cpu_s": cpu, "wall_s": wall, "requests": requests}


async def with_pool(
    url: str, payloads: list[bytes], requests: int, concurrency: int
) -> dict[str, dict[str, float]]:
    pool = UpstreamPool()

    async def send(body: bytes) -> int:
        resp = await pool.request(url, "POST", "/generate", HEADERS, body, timeout=30)
        await resp.read()
        return resp.status

    try:
        return await run_modes(send, payloads, requests, concurrency)
    finally:
        await pool.close()


async def with_aiohttp(
    url: str, payloads: list[bytes], requests: int, concurrency: int
) -> dict[str, dict[str, float]]:
    headers = {k.decode(): v.decode() for k, v in HEADERS}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(body: bytes) -> int:
            async with session.post(url + "/generate", data=body, headers=headers) as resp:
                await resp.read()
                return resp.status

        return await run_modes(send, payloads, requests, concurrency)


async def run_modes(
    send: Send, payloads: list[bytes], requests: int, concurrency: int
) -> dict[str, dict[str, float]]:
    await drive(send, payloads, 200, concurrency)  # warm-up: connections, caches, code paths
    return {
        "sequential": await drive(send, payloads, requests, 1),
        "concurrent": await drive(send, payloads, requests, concurrency),
    }


def summary(pool: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    pool_us = pool["cpu_s"] / pool["requests"] * 1e6
    aiohttp_us = baseline["cpu_s"] / baseline["requests"] * 1e6
    return {
        "pool_cpu_us_per_req": round(pool_us, 1),
        "aiohttp_cpu_us_per_req": round(aiohttp_us, 1),
        "aiohttp_over_pool_cpu": round(aiohttp_us / pool_us, 2),
        "pool_req_per_s": round(pool["requests"] / pool["wall_s"]),
        "aiohttp_req_per_s": round(baseline["requests"] / baseline["wall_s"]),
    }


def total(modes: dict[str, dict[str, float]]) -> dict[str, float]:
    return {key: sum(m[key] for m in modes.values()) for key in ("cpu_s", "wall_s", "requests")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=3000, help="per mode and client")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop
    payloads = bodies()
    with sim_worker() as url:
        measured = {}
        for name, client in (("pool", with_pool), ("aiohttp", with_aiohttp)):
            loop = new_loop()
            try:
                measured[name] = loop.run_until_complete(
                    client(url, payloads, args.requests, args.concurrency)
                )
            finally:
                loop.close()
    result: dict[str, object] = {
        "requests_per_mode": args.requests,
        "concurrency": args.concurrency,
        "loop": args.loop,
        **summary(total(measured["pool"]), total(measured["aiohttp"])),
    }
    for mode in ("sequential", "concurrent"):
        result[mode] = summary(measured["pool"][mode], measured["aiohttp"][mode])
    results = Path(__file__).with_name("results_upstream.json")
    results.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
        return
    print(f"client CPU per request, {args.requests} requests per mode, {args.loop}:")
    for key, value in result.items():
        print(f"  {key:24} {value}")


if __name__ == "__main__":
    main()
