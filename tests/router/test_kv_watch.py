"""Stream silence and rate (`kv_watch.StreamWatch`), and what the router does about silence."""

from __future__ import annotations

import asyncio
from array import array

import pytest

from sglang_dp.kv_wire import AllBlocksCleared
from sglang_dp.router.engine import EngineConfig, Outcome, RoutingEngine
from sglang_dp.router.kv_events import Batch
from sglang_dp.router.kv_view import SILENT, KvView
from sglang_dp.router.kv_watch import SILENT_S, SILENT_TOKENS, StreamWatch
from tests.processes import free_port


def test_answers_without_events_for_long_enough_are_silence() -> None:
    watch = StreamWatch(0.0)
    assert not watch.tick(batches=5, uncached=100, now=1.0)  # a batch came: alive
    assert not watch.tick(5, 100 + SILENT_TOKENS, 2.0)  # new prompts answered: counting from now
    assert not watch.tick(5, 100 + 3 * SILENT_TOKENS, 2.0 + SILENT_S - 0.1)
    assert watch.tick(5, 100 + 3 * SILENT_TOKENS, 2.0 + SILENT_S)


@pytest.mark.parametrize(
    ("batches", "uncached"),
    [(6, 100 + 10 * SILENT_TOKENS), (5, 100 + SILENT_TOKENS - 1)],
    ids=["a batch came", "too little new prompt to be sure"],
)
def test_no_silence(batches: int, uncached: int) -> None:
    watch = StreamWatch(0.0)
    watch.tick(5, 100, 1.0)
    assert not any(watch.tick(batches, uncached, 1.0 + t) for t in range(1, 10))


def test_an_idle_worker_is_never_silent_and_reset_starts_over() -> None:
    watch = StreamWatch(0.0)
    assert not any(watch.tick(0, 0, float(t)) for t in range(1, 100))
    watch.tick(0, SILENT_TOKENS, 100.0)
    assert watch.tick(0, SILENT_TOKENS, 100.0 + SILENT_S)
    watch.reset(0, SILENT_TOKENS)
    assert not watch.tick(0, SILENT_TOKENS, 200.0)


def test_rate_follows_batches_per_second() -> None:
    watch = StreamWatch(0.0)
    for t in range(1, 60):
        watch.tick(10 * t, 0, float(t))
    assert watch.batches_per_s == pytest.approx(10.0, rel=0.01)
    for t in range(60, 120):
        watch.tick(590, 0, float(t))
    assert watch.batches_per_s < 0.01


def test_a_silent_trusted_stream_goes_to_the_tree_with_its_reason() -> None:
    """KvView's tick: a worker answering new prompts while its stream says nothing."""
    clock = [0.0]
    said: list[str] = []
    engine = RoutingEngine(EngineConfig(token_keys=True))
    engine.add_worker("http://127.0.0.1:1")
    view = KvView("auto", engine, True, lambda: clock[0], said.append)
    info = {
        "kv_events": {
            "publisher": "zmq",
            "endpoint_host": "127.0.0.1",
            "endpoint_port_base": free_port(),
            "topic": "",
            "block_size": 4,
        }
    }

    async def scenario() -> None:
        view.server_info("http://127.0.0.1:1", info)
        index = view.index
        assert index is not None
        index.apply("http://127.0.0.1:1", Batch(0, 0.0, [AllBlocksCleared()]), 0.0)
        assert index.trusted("http://127.0.0.1:1")
        await view._tick()
        for i in range(3):
            clock[0] += 1.0
            dispatch = engine.route(array("I", range(i * 100, i * 100 + 50)), clock[0])
            engine.observe(dispatch, Outcome(50, 0), clock[0])
            await view._tick()
        clock[0] += SILENT_S
        await view._tick()
        assert not index.trusted("http://127.0.0.1:1")
        assert index.status("http://127.0.0.1:1").reason == SILENT
        assert any("silent" in line for line in said)
        await view.close()

    asyncio.run(scenario())


def test_a_worker_publishing_at_another_block_size_is_not_followed() -> None:
    said: list[str] = []
    engine = RoutingEngine(EngineConfig(token_keys=True))
    view = KvView("events", engine, True, record_event=said.append)

    def info(block_size: int) -> dict[str, object]:
        return {
            "kv_events": {
                "publisher": "zmq",
                "endpoint_host": "127.0.0.1",
                "endpoint_port_base": free_port(),
                "block_size": block_size,
            }
        }

    async def scenario() -> None:
        view.server_info("http://a:1", info(16))
        view.server_info("http://b:1", info(32))
        view.server_info("http://c:1", {"version": "0.4.0"})  # an older SGLang: no events
        ranked = info(16)
        ranked["kv_events"]["dp_size"] = 2  # type: ignore[index]
        view.server_info("http://d:1", ranked)
        workers = view.status()["workers"]
        assert view.status()["block_size"] == 16 and workers["http://a:1"]["endpoint"]
        assert "blocks of 32 tokens" in workers["http://b:1"]["reason"]
        assert "does not publish" in workers["http://c:1"]["reason"]
        assert "2 attention-DP ranks" in workers["http://d:1"]["reason"]
        assert len([line for line in said if "routed on the approximate tree" in line]) == 3
        view.server_info("http://b:1", info(32))  # said once
        assert len([line for line in said if "32 tokens" in line]) == 1
        await view.close()

    asyncio.run(scenario())
