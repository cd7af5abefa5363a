"""The KV events subscriber against real simulated workers on loopback: replay, drops, restart."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from sglang_dp.router.kv_index import KvIndex
from sglang_dp.router.kv_subscriber import EventSource, KvSubscriber, source_from_server_info
from tests.processes import Worker, free_port_band, run_on, sim_worker, until

pytestmark = pytest.mark.slow
FRESH = itertools.count()  # fresh prompts: new tokens, so new blocks and new events


def events_worker(base: int, drop: float, replay: bool) -> Any:
    config: dict[str, Any] = {"publisher": "zmq", "endpoint": f"tcp://*:{base}", "topic": "kv"}
    if replay:
        config["replay_endpoint"] = f"tcp://*:{base + 1}"
    return sim_worker(
        "--time-scale",
        "1000",
        "--page-size",
        "4",
        "--max-total-tokens",
        "600",
        "--kv-events-config",
        json.dumps(config),
        "--kv-events-drop-rate",
        str(drop),
    )


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[Worker, Worker]]:
    """One worker dropping 30 % of its batches with a replay socket, one dropping without."""
    a, b = free_port_band(2), free_port_band(2)
    with events_worker(a, 0.3, True) as replayed, events_worker(b, 0.3, False) as lossy:
        yield replayed, lossy


async def traffic(w: Worker, n: int, tag: str) -> None:
    """`n` prompts sharing prefixes, enough to make the 600-token cache evict."""
    loop = asyncio.get_running_loop()
    for i in range(n):
        text = f"shared {i % 3} " + " ".join(f"{tag}{i}x{j}" for j in range(10))
        body = {"text": text, "sampling_params": {"max_new_tokens": 6}}
        reply = await loop.run_in_executor(None, w.post, "/generate", body)
        assert reply.status == 200


async def real_blocks(w: Worker) -> set[int]:
    reply = await asyncio.get_running_loop().run_in_executor(None, w.get, "/debug/kv_blocks")
    return set(reply.json()["blocks"])


def test_index_follows_a_worker_through_drops_by_replay(workers: tuple[Worker, Worker]) -> None:
    w, _ = workers
    info = w.get("/server_info").json()
    source = source_from_server_info("w", w.url, info)
    assert source is not None and source.endpoint.startswith("tcp://127.0.0.1:")
    port = info["kv_events"]["endpoint_port_base"]
    source = EventSource("w", source.endpoint, f"tcp://127.0.0.1:{port + 1}", source.topic)

    async def scenario() -> None:
        index = KvIndex(block_size=4)
        subscriber = KvSubscriber(index)
        subscriber.add(source)
        try:
            for round_ in range(3):
                await traffic(w, 30, f"r{round_}")

                async def agrees() -> bool:
                    # a dropped last batch shows only when the next one comes: keep traffic on
                    await traffic(w, 1, f"tick{next(FRESH)}")
                    real = await real_blocks(w)
                    return index.trusted("w") and index.blocks("w") == real

                await until_async(agrees, "index == the worker's cache")
            status = index.status("w")
            assert status.gaps_filled >= 1 and status.gaps_lost == 0
            assert index.match([1, 2, 3]) == {"w": 0}
        finally:
            await subscriber.close()

    run_on("uvloop", scenario, timeout=60)


def test_without_replay_a_gap_makes_the_worker_untrusted(workers: tuple[Worker, Worker]) -> None:
    _, w = workers
    source = source_from_server_info("w", w.url, w.get("/server_info").json())
    assert source is not None

    async def scenario() -> None:
        index = KvIndex(block_size=4)
        subscriber = KvSubscriber(index)
        subscriber.add(source)
        try:
            await traffic(w, 20, "lossy")
            await until(lambda: index.status("w").gaps_lost > 0, what="a lost gap")
            status = index.status("w")
            assert not status.trusted and "lost" in status.reason
        finally:
            await subscriber.close()

    run_on("uvloop", scenario, timeout=60)


async def until_async(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_wrong_block_size_is_a_clear_reason(workers: tuple[Worker, Worker]) -> None:
    w, _ = workers
    info = w.get("/server_info").json()
    replay = f"tcp://127.0.0.1:{info['kv_events']['endpoint_port_base'] + 1}"
    source = source_from_server_info("w", w.url, info, replay)
    assert source is not None

    async def scenario() -> None:
        index = KvIndex(block_size=8)  # the worker pages by 4
        subscriber = KvSubscriber(index)
        subscriber.add(source)
        try:
            await until_async(lambda: _traffic_then(w, index), "a rejected batch")
            status = index.status("w")
            assert not status.trusted and "block size 4, expected 8" in status.reason
            assert index.blocks("w") == set()
        finally:
            await subscriber.close()

    run_on("uvloop", scenario, timeout=60)


async def _traffic_then(w: Worker, index: KvIndex) -> bool:
    await traffic(w, 1, f"bs{next(FRESH)}")  # new tokens each time: new blocks, new events
    return index.status("w").rejected > 0


def test_a_restarted_publisher_drops_the_old_picture() -> None:
    base = free_port_band(2)
    source = EventSource("w", f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 1}", "kv")

    async def scenario() -> None:
        index = KvIndex(block_size=4)
        subscriber = KvSubscriber(index)
        subscriber.add(source)
        try:
            for life in range(2):
                with events_worker(base, 0.0, True) as w:

                    async def agrees(w: Worker = w, life: int = life) -> bool:
                        # fresh traffic until the (re)connected SUB socket sees it
                        await traffic(w, 1, f"life{life}n{next(FRESH)}")
                        real = await real_blocks(w)
                        return index.trusted("w") and index.blocks("w") == real

                    await until_async(agrees, f"index == cache of life {life}")
            status = index.status("w")
            assert status.restarts + status.resyncs >= 1
        finally:
            await subscriber.close()

    run_on("uvloop", scenario, timeout=90)
