"""Benchmark of the simulated worker: its CPU cost per request, and the fidelity of its clock.

    python benchmarks/bench_sim.py [--json] [--requests N] [--concurrency C] [--h200-only]

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
- `prefill_tokens_per_s_measured` vs `_expected`: one call of 24 distinct 4,096-token prompts
  (input_ids, max_new_tokens 1) at `--time-scale 10`, then the same call again (all cached but
  one token a prompt); measured = uncached tokens / (wall-time difference × 10), median of
  three; expected = the same tokens over the cost model's time for the two calls (h100 profile:
  30,000 tokens/s for the token part, minus attention over each 4,096-token prompt). Must agree
  within 5 %.
- `decode_step_ms_measured` vs `_configured`: the wall-time slope between a 1-token and a
  401-token generation of one request at `--time-scale 10`, in modelled ms per step.
- `timed_cpu_pct_of_core`: how much of one core a worker uses while serving the timed workload
  at `timed_req_per_s` (32 in flight, 10× real time): scale it to your load and time scale.
- `h200_points_max_rel_err`: every timed point of benchmarks/h200-llama3-8b-measured.json (16
  prefill/extend/chunk batches, 17 decode steps, and the chunked 8,192-token prompt as a whole)
  replayed through the `h200-llama3-8b` cost model, and five of them (8 × (1,920 + 128),
  1 × 2,048, 1 × 8,192 in 2,048-token chunks, 1 × (2,048 + 128), a decode step at 512 tokens
  of context) through a running simulated worker at `--time-scale 2`, as the modelled
  `e2e_latency` it reports: worst relative error, target <= 0.10. `h200_worker_wall_rel_err`
  gives the same five from the wall clock × 2 instead (HTTP and JSON time included, so the short
  points read long on a loaded machine). `h200_prefix_hit_saving`: the modelled 8 × 2,048 fresh
  over 8 × (1,920 cached + 128 new) (measured 14.6), target within 10 %. Both replay points the
  profile was fitted to: they are regression guards of the fit (named under `fits`), not
  validations.
- `h200_leave_one_out_max_rel_err`: the validation — each of the 33 timed points predicted by
  the fit (sim.calibration, as benchmarks/fit_profiles.py makes it) of the other 32; target
  <= 0.15. `_not_launch_bound`: the same over the points the full fit does not put on its
  launch floor (the floor can only be known from such points).

The full run writes benchmarks/results_sim.json.
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
from pathlib import Path
from typing import Any

import psutil

from sglang_dp.launcher.ports import free_port
from sglang_dp.launcher.process import stop_group
from sglang_dp.sim.calibration import (
    decode_points,
    fit_decode,
    fit_prefill,
    prefill_points,
)
from sglang_dp.sim.config import SimConfig
from sglang_dp.sim.cost_model import CostModel, resolve

TIME_SCALE = 10.0
PREFILL_PROMPTS, PREFILL_LEN = 24, 4096
DECODE_STEPS = 400
MEASUREMENT = Path(__file__).parent / "h200-llama3-8b-measured.json"
RESULTS = Path(__file__).with_name("results_sim.json")
H200 = "h200-llama3-8b"
H200_TIME_SCALE = 2.0
H200_CHUNK = 2048  # the measurement's chunk size


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
        raise RuntimeError(head.decode() + (await reader.read(1000)).decode())
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
    prompts, length = PREFILL_PROMPTS, PREFILL_LEN

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


def expected_prefill_rate(cost: CostModel) -> float:
    """The rate `prefill_rate` should measure: tokens over the modelled time difference."""
    budget, prompts, length = cost.chunked_prefill_size, PREFILL_PROMPTS, PREFILL_LEN
    per_batch = max(1, budget // length)
    full, rest = divmod(prompts, per_batch)
    uncached = full * cost.prefill_seconds([(0, length)] * per_batch)
    uncached += cost.prefill_seconds([(0, length)] * rest) if rest else 0.0
    cached = cost.prefill_seconds([(length - 1, 1)] * prompts)  # one batch: 24 new tokens
    return prompts * (length - 1) / (uncached - cached)


def expected_decode_step_ms(cost: CostModel) -> float:
    """The mean modelled step `decode_step_ms` measures (context 2 → 2 + DECODE_STEPS)."""
    return cost.decode_run_seconds(1, 2, DECODE_STEPS) / DECODE_STEPS * 1e3


def decode_step_ms(port: int) -> float:
    """Measured decode step (batch of one, 1-token prompt) at TIME_SCALE, in modelled ms."""
    steps = DECODE_STEPS

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


def h200_cost_model_errors(measurement: dict[str, Any]) -> list[float]:
    """Relative error of the h200 profile on every timed point of the measurement."""
    cost = resolve(SimConfig(profile=H200))
    errors = [
        cost.prefill_seconds([(p.cached, p.new)] * p.batch) * 1e3 / p.ms - 1
        for p in prefill_points(measurement)
    ]
    errors += [
        cost.decode_first_step(p.batch, p.kv_tokens) * 1e3 / p.ms - 1
        for p in decode_points(measurement)
    ]
    chunked = measurement["chunked"]
    size, step = chunked["prompt"], chunked["chunk"]
    whole = sum(cost.prefill_seconds([(c, step)]) for c in range(0, size, step))
    errors.append(whole * 1e3 / chunked["total_ms"] - 1)
    return errors


def h200_leave_one_out(measurement: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of the 33 timed points predicted by the fit of the other 32 (prefill points by
    the prefill fit, decode steps by the decode fit, both as `fit_profiles.py` makes them):
    what the cost model says about a batch it was not fitted to. `launch_bound`: the full fit
    puts the point on its launch floor (only such points can tell the floor)."""
    prefill, decode = prefill_points(measurement), decode_points(measurement)
    whole = fit_prefill(prefill)
    rows: list[dict[str, Any]] = []
    for i, p in enumerate(prefill):
        fit = fit_prefill(prefill[:i] + prefill[i + 1 :])
        linear = whole.fixed_ms + whole.per_token_ms * p.new_tokens + whole.per_pair_ms * p.pairs
        rows.append({"point": f"prefill {p.batch}x({p.cached}+{p.new})", "measured_ms": p.ms,
                     "predicted_ms": fit.ms(p.new_tokens, p.pairs),
                     "launch_bound": linear < whole.floor_ms})  # fmt: skip
    for i, d in enumerate(decode):
        step = fit_decode(decode[:i] + decode[i + 1 :])
        rows.append({"point": f"decode {d.batch}x{d.kv_tokens // d.batch}", "measured_ms": d.ms,
                     "predicted_ms": step.ms(d.batch, d.kv_tokens),
                     "launch_bound": False})  # fmt: skip
    for row in rows:
        row["rel_err"] = round(row["predicted_ms"] / row["measured_ms"] - 1, 4)
        row["predicted_ms"] = round(row["predicted_ms"], 3)
    return rows


def h200_prefix_hit_saving() -> float:
    """Modelled 8 × 2,048 fresh over 8 × (1,920 cached + 128 new)."""
    cost = resolve(SimConfig(profile=H200))
    return cost.prefill_seconds([(0, 2048)] * 8) / cost.prefill_seconds([(1920, 128)] * 8)


def generate(port: int, ids: list[list[int]], max_new: int = 1) -> tuple[float, float]:
    """One /generate call of several prompts: (largest reported e2e_latency, wall seconds)."""

    async def call() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new}}
        start = time.perf_counter()
        writer.write(request_bytes("/generate", payload))
        body = await read_response(reader)
        elapsed = time.perf_counter() - start
        writer.close()
        return body, elapsed

    body, wall = asyncio.run(call())
    answers = json.loads(body)
    return max(a["meta_info"]["e2e_latency"] for a in answers), wall


def h200_worker_points(port: int, measurement: dict[str, Any]) -> list[dict[str, Any]]:
    """Five measured points through a running h200 worker: modelled and wall-clock ms."""
    extend = {(r["batch"], r["cached"], r["new"]): r["ms"] for r in measurement["extend"]}
    fresh = {(r["batch"], r["new"]): r["ms"] for r in measurement["prefill"]}
    base = iter(range(1_000_000, 100_000_000, 100_000))  # distinct token ranges

    def tokens(n: int) -> list[int]:
        start = next(base)
        return list(range(start, start + n))

    rows: list[dict[str, Any]] = []

    def timed(name: str, measured_ms: float, ids: list[list[int]], max_new: int = 1) -> None:
        e2e, wall = generate(port, ids, max_new)
        rows.append({"point": name, "measured_ms": measured_ms, "e2e_ms": e2e * 1e3,
                     "wall_ms": wall * H200_TIME_SCALE * 1e3})  # fmt: skip

    primes = [tokens(1920) for _ in range(8)]
    generate(port, primes)
    timed("8x(1920+128)", extend[8, 1920, 128], [p + tokens(128) for p in primes])
    timed("1x(0+2048)", fresh[1, 2048], [tokens(2048)])
    timed("1x8192 in 2048 chunks", measurement["chunked"]["total_ms"], [tokens(8192)])
    prime = tokens(2048)
    generate(port, [prime])
    timed("1x(2048+128)", extend[1, 2048, 128], [prime + tokens(128)])
    # a decode step at 512 tokens of context: the slope between 1 and 1 + 64 generated tokens
    steps, prompt = 64, tokens(511)
    generate(port, [prompt])  # cached from now on: both timed calls prefill one token
    e2e_one, wall_one = generate(port, [prompt])
    e2e_all, wall_all = generate(port, [prompt], 1 + steps)
    decode_512 = next(
        p.ms for p in decode_points(measurement) if (p.batch, p.kv_tokens) == (1, 512)
    )
    rows.append({"point": "decode 1x512", "measured_ms": decode_512,
                 "e2e_ms": (e2e_all - e2e_one) / steps * 1e3,
                 "wall_ms": (wall_all - wall_one) / steps * H200_TIME_SCALE * 1e3})  # fmt: skip
    for row in rows:
        row["e2e_rel_err"] = round(row["e2e_ms"] / row["measured_ms"] - 1, 4)
        row["wall_rel_err"] = round(row["wall_ms"] / row["measured_ms"] - 1, 4)
        for key in ("measured_ms", "e2e_ms", "wall_ms"):
            row[key] = round(row[key], 3)
    return rows


def h200_figures() -> dict[str, Any]:
    """The H200 measurement replayed through the cost model and a running worker."""
    measurement = json.loads(MEASUREMENT.read_text())
    errors = h200_cost_model_errors(measurement)
    # the 8,192-token prompt needs a context longer than the profile's 8,192 (room for output)
    args = ("--profile", H200, "--time-scale", str(H200_TIME_SCALE),
            "--chunked-prefill-size", str(H200_CHUNK), "--context-length", "16384")  # fmt: skip
    with worker(*args) as (port, _):
        rows = h200_worker_points(port, measurement)
    errors += [row["e2e_rel_err"] for row in rows]
    saving = h200_prefix_hit_saving()
    measured_saving = measurement["prefix_hit"]["speedup"]
    left_out = h200_leave_one_out(measurement)
    worst = max(left_out, key=lambda row: abs(row["rel_err"]))
    return {
        "h200_leave_one_out_max_rel_err": abs(worst["rel_err"]),
        "h200_leave_one_out_worst_point": worst["point"],
        "h200_leave_one_out_points": len(left_out),
        # the floor rests on the launch-bound points alone: without them it cannot be predicted
        "h200_leave_one_out_max_rel_err_not_launch_bound": max(
            abs(row["rel_err"]) for row in left_out if not row["launch_bound"]
        ),
        "h200_leave_one_out_within_15pct": abs(worst["rel_err"]) <= 0.15,
        "h200_leave_one_out": left_out,
        "fits": {
            "h200_points_max_rel_err": "the profile replayed on the points it was fitted to "
            "(a regression guard, not a validation: see h200_leave_one_out_max_rel_err)",
            "h200_prefix_hit_saving": "both of its points are among the fitted ones",
        },
        "h200_points": len(errors),
        "h200_points_max_rel_err": round(max(abs(e) for e in errors), 4),
        "h200_worker_points": rows,
        "h200_worker_wall_rel_err": round(max(abs(r["wall_rel_err"]) for r in rows), 4),
        "h200_prefix_hit_saving": round(saving, 2),
        "h200_prefix_hit_saving_measured": round(measured_saving, 2),
        "h200_fit_residual_within_10pct": max(abs(e) for e in errors) <= 0.10,
        "h200_prefix_hit_saving_fit_within_10pct": abs(saving / measured_saving - 1) <= 0.10,
    }


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
    cost = resolve(SimConfig())
    expected = expected_prefill_rate(cost)
    results["prefill_tokens_per_s_configured"] = cost.prefill_tokens_per_s
    results["prefill_tokens_per_s_expected"] = round(expected)
    results["prefill_tokens_per_s_measured"] = round(measured)
    results["prefill_rate_error_pct"] = round(abs(measured / expected - 1) * 100, 2)
    results["decode_step_ms_configured"] = round(expected_decode_step_ms(cost), 3)
    results["decode_step_ms_measured"] = round(step_ms, 3)
    results.update(h200_figures())
    results["instant_target_met"] = results["instant_cpu_us_per_req"] <= 300
    results["prefill_within_5pct"] = results["prefill_rate_error_pct"] <= 5
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--h200-only", action="store_true", help="only the h200_* figures")
    args = parser.parse_args()
    results = h200_figures() if args.h200_only else run(args.requests, args.concurrency)
    if not args.h200_only:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:36} {value}")


if __name__ == "__main__":
    main()
