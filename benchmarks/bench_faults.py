"""The router under misbehaving workers and clients: bounded waits, bounded memory, quick exit.

Starts `sglang-dp sim-worker` processes, one per injected fault (`--fail-rate 1`, `--hang-rate 1`,
`--garble-rate 1`, `--close-after-head 1`, `--truncate-rate 1`, `--reset-rate 1`, `--instant`
workers; `--stall-after-tokens 2 --stall-secs 3` with `--instant` and timed by the scheduler at
`--time-scale 100`) and a good one, on each HTTP server (`--http-server lean`, ours, and
`uvicorn`: uvicorn + Starlette, the stack SGLang serves with), and `sglang-dp router` processes
in front of them. Every process runs in its own session and is stopped by its process group at
the end. Figures:

- `max_client_wait_s` (over both servers; `max_client_wait_s_lean`, `..._uvicorn` for each):
  the longest a client waited for its answer (or for the connection to close) over the fault
  matrix: each fault × stream / whole × alone without retries / beside the good worker with
  `--retries 2`, two requests each, `--request-timeout-secs 1`. Target <= 2 s. Also, per server
  in `servers`: `waits_s` and `outcomes`, what the clients got, per case;
- `inflight_after` (`inflight_after_lean`, `..._uvicorn`): requests the matrix's routers still
  count in flight afterwards (their `/debug/stats`, after the answers). Target 0;
- `keepalive_after_idle`: per server, the status of a request sent 5.5 s after the previous one
  on the router (past uvicorn's 5 s keep-alive timeout, which SGLang runs with: the worker has
  closed the pooled connection). Target 200 on both;
- `slow_reader_rss_growth_mb`: a client asks for a 200k-token stream (`/v1/completions`) and
  never reads it; the router's RSS growth over 15 s. Target <= 16;
- `shutdown_s_under_load`: SIGINT to a router while 32 keep-alive clients send requests back
  to back; seconds until it exited. Target <= 1.5.

Figures taken on a busy machine are perturbed: the other programs' CPU is not subtracted.

    python benchmarks/bench_faults.py [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httptools
import psutil
import uvloop

from sglang_dp.router.upstream import UpstreamError, UpstreamPool
from sglang_dp.sim.faults import INSTANT, MATRIX
from support import (
    get_json,
    healthy_workers,
    start_router,
    start_worker,
)

RESULTS = Path(__file__).with_name("results_faults.json")
SERVERS = ("lean", "uvicorn")
IDLE_S = 5.5  # past uvicorn's keep-alive timeout (5 s, SGLang's setting)
SLOW_READER_TOKENS = 200_000
SLOW_READER_S = 15.0
LOAD_CLIENTS = 32
LOAD_S = 2.0
GIVE_UP_S = 30.0  # a client waiting this long counts as hung (and the figure shows it)
TARGETS = {
    "max_client_wait_s": ("<=", 2.0),
    **{f"max_client_wait_s_{server}": ("<=", 2.0) for server in SERVERS},
    "slow_reader_rss_growth_mb": ("<=", 16.0),
    "shutdown_s_under_load": ("<=", 1.5),
    "inflight_after": ("<=", 0),
    **{f"inflight_after_{server}": ("<=", 0) for server in SERVERS},
}


class _Reader:
    def __init__(self) -> None:
        self.complete = False

    def on_message_complete(self) -> None:
        self.complete = True


def timed_request(port: int, body: dict[str, Any]) -> tuple[float, str]:
    """Seconds until the answer ended or the connection closed, and what it was."""
    data = json.dumps(body).encode()
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP_S)
    reader = _Reader()
    parser = httptools.HttpResponseParser(reader)
    how = "hung"
    try:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(data), data)
        )
        while not reader.complete:
            chunk = sock.recv(65536)
            if not chunk:
                break
            parser.feed_data(chunk)
        status = parser.get_status_code()
        how = str(status) if reader.complete else f"{status} closed mid-answer"
    except TimeoutError:
        pass
    finally:
        sock.close()
    return time.monotonic() - started, how


def fault_matrix(stack: ExitStack, server: str) -> dict[str, Any]:
    """The matrix with workers on one HTTP server."""
    on = ("--http-server", server)
    good = start_worker(stack, *INSTANT, *on)
    waits: dict[str, float] = {}
    outcomes: dict[str, list[str]] = {}
    routers: list[str] = []
    for fault, args in MATRIX.items():
        bad = start_worker(stack, *args, *on)
        for setup, workers, retries in (("alone", [bad], "0"), ("retried", [bad, good], "2")):
            url, _ = start_router(
                stack,
                workers,
                "--retries",
                retries,
                "--request-timeout-secs",
                "1",
                "--policy",
                "round_robin",
            )
            routers.append(url)
            port = int(url.rsplit(":", 1)[1])
            for stream in (False, True):
                case = f"{fault}/{'stream' if stream else 'whole'}/{setup}"
                for i in range(2):
                    deadline = time.monotonic() + 5  # a reported failure: back after a check
                    while healthy_workers(url) < len(workers) and time.monotonic() < deadline:
                        time.sleep(0.02)
                    body = {
                        "text": f"{case} {i}",
                        "stream": stream,
                        "sampling_params": {"max_new_tokens": 8},
                    }
                    wait, how = timed_request(port, body)
                    waits[case] = max(waits.get(case, 0.0), wait)
                    outcomes.setdefault(case, []).append(how)
    in_flight = 0
    for url in routers:
        stats = get_json(url + "/debug/stats")
        in_flight += sum(w["in_flight"] for w in stats["workers"])
    return {
        "max_client_wait_s": round(max(waits.values()), 3),
        "inflight_after": in_flight,
        "waits_s": {k: round(v, 3) for k, v in waits.items()},
        "outcomes": outcomes,
    }


def keepalive_after_idle(stack: ExitStack) -> dict[str, int]:
    """Per server: a request, IDLE_S of quiet, a request (the routers wait side by side)."""
    urls = {
        server: start_router(stack, [start_worker(stack, *INSTANT, "--http-server", server)])[0]
        for server in SERVERS
    }
    statuses: dict[str, int] = {}

    def exchange(server: str) -> None:
        port = int(urls[server].rsplit(":", 1)[1])
        body = {"text": "idle", "sampling_params": {"max_new_tokens": 4}}
        first = timed_request(port, body)[1]
        time.sleep(IDLE_S)  # the gap is what is measured, not a synchronisation
        second = timed_request(port, body)[1]
        statuses[server] = int(second) if first == "200" and second.isdigit() else 0

    threads = [threading.Thread(target=exchange, args=(server,)) for server in SERVERS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def slow_reader(stack: ExitStack) -> float:
    worker = start_worker(
        stack,
        "--instant",
        "--context-length",
        str(SLOW_READER_TOKENS * 2),
        "--max-total-tokens",
        str(SLOW_READER_TOKENS * 3),
    )
    url, proc = start_router(stack, [worker])
    router = psutil.Process(proc.pid)
    body = json.dumps(
        {"model": "m", "prompt": "tell me", "max_tokens": SLOW_READER_TOKENS, "stream": True}
    ).encode()
    # an --instant worker writes the whole stream at once: ~25 s of CPU on a busy machine
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=120)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    try:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body)
        )
        sock.recv(4096)  # the head and a first event: the stream is on; then never read
        before = router.memory_info().rss
        peak = before
        deadline = time.monotonic() + SLOW_READER_S
        while time.monotonic() < deadline:
            peak = max(peak, router.memory_info().rss)
            time.sleep(0.25)
        return round((peak - before) / 2**20, 2)
    finally:
        sock.close()


def shutdown_under_load(stack: ExitStack) -> float:
    workers = [start_worker(stack, "--instant") for _ in range(2)]
    url, proc = start_router(stack, workers)
    body = json.dumps({"text": "load", "sampling_params": {"max_new_tokens": 4}}).encode()
    headers = [(b"content-type", b"application/json")]
    gone = threading.Event()

    async def client(pool: UpstreamPool) -> None:
        while not gone.is_set():
            try:
                reply = await pool.request(url, "POST", "/generate", headers, body, timeout=10)
                await reply.read()
            except UpstreamError:
                await asyncio.sleep(0.01)

    async def load() -> float:
        pool = UpstreamPool()
        clients = [asyncio.create_task(client(pool)) for _ in range(LOAD_CLIENTS)]
        await asyncio.sleep(LOAD_S)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < GIVE_UP_S:
            await asyncio.sleep(0.005)
        took = time.monotonic() - started
        gone.set()
        await asyncio.gather(*clients)
        await pool.close()
        return took

    return round(uvloop.run(load()), 3)


def table(out: dict[str, Any]) -> str:
    lines = []
    for server, matrix in out["servers"].items():
        lines.append(f"workers on the {server} server:")
        lines += [
            f"  {case:38}{wait:>8.3f} s  {matrix['outcomes'][case]}"
            for case, wait in matrix["waits_s"].items()
        ]
    lines.append(f"\nkeep-alive after {IDLE_S:g} s idle: {out['keepalive_after_idle']}\n")
    for key, (op, bound) in TARGETS.items():
        verdict = "met" if out["targets_met"][key] else "MISSED"
        lines.append(f"{key:34}{out[key]:>10}   target {op} {bound:g}: {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out: dict[str, Any] = {}
    try:
        servers = {}
        for server in SERVERS:
            with ExitStack() as stack:
                servers[server] = matrix = fault_matrix(stack, server)
            out[f"max_client_wait_s_{server}"] = matrix["max_client_wait_s"]
            out[f"inflight_after_{server}"] = matrix["inflight_after"]
        out["max_client_wait_s"] = max(m["max_client_wait_s"] for m in servers.values())
        out["inflight_after"] = sum(m["inflight_after"] for m in servers.values())
        out["servers"] = servers
        with ExitStack() as stack:
            out["keepalive_after_idle"] = keepalive_after_idle(stack)
        with ExitStack() as stack:
            out["slow_reader_rss_growth_mb"] = slow_reader(stack)
        with ExitStack() as stack:
            out["shutdown_s_under_load"] = shutdown_under_load(stack)
    except KeyboardInterrupt:
        sys.exit("interrupted: workers and routers stopped")
    out["targets_met"] = {key: out[key] <= bound for key, (_, bound) in TARGETS.items()}
    out["targets_met"]["keepalive_after_idle"] = set(out["keepalive_after_idle"].values()) == {200}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out) if args.json else table(out))


if __name__ == "__main__":
    main()
