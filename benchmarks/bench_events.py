"""KV events: does the router's exact index agree with the workers' real caches, and what it costs.

Starts three `sglang-dp sim-worker` processes publishing SGLang's KV events on loopback
(`--page-size 16`, a 6,000-token KV cache so the traffic evicts, 200× real time):
`exact` (every batch sent), `dropped` (`--kv-events-drop-rate 0.05`, replay socket on) and
`no_replay` (5 % dropped, no replay socket). An in-process `KvSubscriber` feeds one `KvIndex`;
a shared-prefix workload (24 system prompts of 300 words, each request one of them + 30 unique
words, 8 requests in flight) runs against each worker; then each worker's `/debug/kv_blocks`
(its cache's pages, hashed afresh) is compared with the index, while a trickle of requests goes
on (a dropped last batch shows only when the next batch arrives):

- `events_index_agreement`: |index ∩ real| / |index ∪ real| for `exact` (target ≥ 0.999);
- `events_dropped_5pct_agreement`: the same for `dropped`, after replay (≥ 0.999);
- `events_no_replay_untrusted`: `no_replay` is marked untrusted (its reason is printed);
- `events_ingested_per_s_per_core`: decode + apply of every batch `exact` published (read back
  from its replay socket), events per CPU second, in this process;
- `events_match_us_p50_8w`: `KvIndex.match` p50 over 8 workers holding that stream (the match
  only: the engine's route adds its policy), probes are cached paths + 7 unknown tokens;
- `events_index_bytes_per_block`: what the index holds per block of that stream (tracemalloc;
  the trie, digests, pages and the worker's id set, the decoded batches not counted).

    python benchmarks/bench_events.py [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import zmq

from sglang_dp.kv_wire import END_SEQ, BlockStored
from sglang_dp.launcher.ports import free_port, free_port_band
from sglang_dp.router.kv_events import Batch, decode_payload
from sglang_dp.router.kv_index import KvIndex
from sglang_dp.router.kv_subscriber import KvSubscriber, source_from_server_info
from support import get_json, process, publish, wait_until

SGLANG_DP = str(Path(sys.executable).parent / "sglang-dp")
PAGE = 16
GROUPS, SYSTEM_WORDS, QUESTION_WORDS = 24, 300, 30


def start_worker(stack: ExitStack, drop: float, replay: bool) -> tuple[str, str | None]:
    """A publishing worker; returns its URL and its replay endpoint."""
    port, base = free_port(), free_port_band(2)
    config: dict[str, Any] = {"publisher": "zmq", "endpoint": f"tcp://*:{base}", "topic": "kv"}
    replay_endpoint = f"tcp://127.0.0.1:{base + 1}" if replay else None
    if replay:
        config["replay_endpoint"] = f"tcp://*:{base + 1}"
    argv = [SGLANG_DP, "sim-worker", "--port", str(port), "--log-level", "warning"]
    argv += ["--time-scale", "200", "--page-size", str(PAGE), "--max-total-tokens", "6000"]
    argv += ["--kv-events-config", json.dumps(config), "--kv-events-drop-rate", str(drop)]
    proc = stack.enter_context(process(argv))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: healthy(url), proc, url)
    return url, replay_endpoint


def healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=2) as reply:
        return bool(reply.status == 200)


def post(url: str, text: str) -> None:
    body = json.dumps({"text": text, "sampling_params": {"max_new_tokens": 8}}).encode()
    request = urllib.request.Request(url + "/generate", body, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        reply.read()


def prompts(rng: random.Random, n: int) -> list[str]:
    systems = [
        " ".join(f"s{g}w{rng.randrange(5000)}" for _ in range(SYSTEM_WORDS)) for g in range(GROUPS)
    ]
    return [
        rng.choice(systems) + " " + " ".join(f"q{rng.randrange(10**6)}" for _ in range(30))
        for _ in range(n)
    ]


def agreement(index_blocks: set[int], real: set[int]) -> float:
    union = index_blocks | real
    return len(index_blocks & real) / len(union) if union else 1.0


async def drive(urls: dict[str, tuple[str, str | None]], requests: int) -> dict[str, Any]:
    """Subscribe, run the workload on every worker, wait for the index to settle, compare."""
    index = KvIndex(block_size=PAGE)
    subscriber = KvSubscriber(index)
    loop = asyncio.get_running_loop()
    for name, (url, replay) in urls.items():
        info = get_json(url + "/server_info")
        source = source_from_server_info(name, url, info)
        assert source is not None
        subscriber.add(type(source)(name, source.endpoint, replay, source.topic))
    await asyncio.sleep(0.3)  # let the SUB sockets connect (slow joiner); replay covers the rest
    rng = random.Random(0)
    with ThreadPoolExecutor(8) as pool:
        jobs = [
            loop.run_in_executor(pool, post, url, text)
            for url, _ in urls.values()
            for text in prompts(rng, requests)
        ]
        await asyncio.gather(*jobs)
    out: dict[str, Any] = {}
    for name, (url, _) in urls.items():
        deadline = loop.time() + 5
        tick = 0
        while True:
            # a trickle of requests goes on, as live traffic would: a dropped last batch shows
            # only when the next batch arrives
            await loop.run_in_executor(None, post, url, f"tick {tick}")
            tick += 1
            real = set(get_json(url + "/debug/kv_blocks")["blocks"])
            score = agreement(index.blocks(name), real)
            if score == 1.0 or loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        status = index.status(name)
        out[name] = {
            "agreement": score,
            "real_blocks": len(real),
            "trusted": status.trusted,
            "reason": status.reason,
            "gaps_filled": status.gaps_filled,
            "gaps_lost": status.gaps_lost,
            "batches": status.batches,
        }
    await subscriber.close()
    return out


def replay_all(endpoint: str) -> list[Batch]:
    """Every batch a worker still buffers, decoded."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    raw: list[tuple[int, bytes]] = []
    while dealer.poll(5000):
        _, seq, payload = dealer.recv_multipart()
        if seq == END_SEQ:
            break
        raw.append((int.from_bytes(seq, "big"), payload))
    dealer.close()
    return [b for s, p in raw if isinstance(b := decode_payload(s, p, PAGE), Batch)]


def ingest_rate(endpoint: str) -> tuple[float, list[Batch], list[bytes]]:
    """Events per CPU second for decode + apply of a whole stream."""
    dealer_batches = replay_all(endpoint)
    payloads: list[tuple[int, bytes]] = []
    from sglang_dp.kv_wire import EventBatch, encode_batch

    for b in dealer_batches:
        payloads.append((b.seq, encode_batch(EventBatch(b.ts, b.events, b.dp_rank))))
    events = sum(len(b.events) for b in dealer_batches)
    best = float("inf")
    for _ in range(3):
        index = KvIndex(block_size=PAGE)
        start = time.process_time()
        for seq, payload in payloads:
            batch = decode_payload(seq, payload, PAGE)
            assert isinstance(batch, Batch)
            index.apply("w", batch, 0.0)
        best = min(best, time.process_time() - start)
    return events / best, dealer_batches, [p for _, p in payloads]


def route_p50(batches: list[Batch], rng: random.Random) -> float:
    """match() p50 in µs with 8 workers holding the same stream."""
    index = KvIndex(block_size=PAGE)
    for w in range(8):
        for b in batches:
            index.apply(f"w{w}", b, 0.0)
    paths: dict[int, list[int]] = {}
    for b in batches:
        for e in b.events:
            if isinstance(e, BlockStored):
                prefix = paths.get(e.parent_block_hash, []) if e.parent_block_hash else []
                for i, h in enumerate(e.block_hashes):
                    prefix = prefix + list(e.token_ids[i * PAGE : (i + 1) * PAGE])
                    paths[h] = prefix
    probes = [p + [rng.randrange(1 << 30) for _ in range(7)] for p in paths.values()]
    rng.shuffle(probes)
    times = []
    for probe in probes[:3000]:
        t = time.perf_counter_ns()
        index.match(probe)
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1000


def bytes_per_block(batches: list[Batch]) -> float:
    """Memory the index holds per block of one worker (tracemalloc, after the whole stream)."""
    import tracemalloc

    tracemalloc.start()
    index = KvIndex(block_size=PAGE)
    for b in batches:
        index.apply("w", b, 0.0)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return used / max(1, len(index.blocks("w")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--requests", type=int, default=300, help="requests per worker")
    args = parser.parse_args()
    with ExitStack() as stack:
        urls = {
            "exact": start_worker(stack, 0.0, True),
            "dropped": start_worker(stack, 0.05, True),
            "no_replay": start_worker(stack, 0.05, False),
        }
        per_worker = asyncio.run(drive(urls, args.requests))
        replay = urls["exact"][1]
        assert replay is not None
        rate, batches, _ = ingest_rate(replay)
    figures = {
        "events_index_agreement": per_worker["exact"]["agreement"],
        "events_dropped_5pct_agreement": per_worker["dropped"]["agreement"],
        "events_no_replay_untrusted": not per_worker["no_replay"]["trusted"],
        "events_ingested_per_s_per_core": round(rate),
        "events_match_us_p50_8w": round(route_p50(batches, random.Random(1)), 2),
        "events_index_bytes_per_block": round(bytes_per_block(batches)),
        "workers": per_worker,
    }
    publish(figures, Path(__file__).with_name("results_events.json"), args.json)


if __name__ == "__main__":
    main()
