"""The load runner with its client swapped for a scripted one (no sockets): load shape,
budgets, conversations, failures and cancellation; and lengths with a real local tokenizer."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sglang_dp.bench.clients import Failure, Sink
from sglang_dp.bench.codec import HFCodec
from sglang_dp.bench.config import BenchConfig
from sglang_dp.bench.load import Load
from sglang_dp.bench.runner import run_bench
from sglang_dp.bench.workloads import VOCABULARY, build_workload


@dataclass
class FakeServer:
    """Answers /generate streams after a few loop turns; fails the prompts it is told to."""

    fail_when: str = "\x00"  # a prompt containing this fails with 503
    in_flight: int = 0
    most_in_flight: int = 0
    prompts: list[str] = field(default_factory=list)

    async def post(self, path: str, body: bytes, sink: Sink) -> None:
        request = json.loads(body)
        prompt = request["text"]
        self.prompts.append(prompt)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            for _ in range(3):
                await asyncio.sleep(0)
            if self.fail_when in prompt:
                raise Failure("http 503", "busy")
            sink.head(200, "http://w1")
            answer = f" answer{len(self.prompts)}"
            meta = {"prompt_tokens": len(prompt.split()), "cached_tokens": 1}
            meta["completion_tokens"] = request["sampling_params"]["max_new_tokens"]
            sink.chunk(b"data: " + json.dumps({"text": answer, "meta_info": meta}).encode())
            sink.chunk(b"\n\ndata: [DONE]\n\n")
        finally:
            self.in_flight -= 1

    async def get(self, path: str) -> tuple[int, bytes]:
        return 404, b""

    async def close(self) -> None:
        pass


def run_load(config: BenchConfig, server: FakeServer) -> Load:
    async def go() -> Load:
        load = Load(config, build_workload(config), server, "", time.perf_counter)
        await load.run()
        return load

    return asyncio.run(go())


SMALL = {"system_prompt_len": 5, "question_len": 3, "output_len": 2}


def test_closed_loop_keeps_at_most_concurrency_in_flight() -> None:
    server = FakeServer()
    config = BenchConfig(num_groups=5, prompts_per_group=6, concurrency=4, **SMALL)
    load = run_load(config, server)
    assert len(load.records) == 30 and all(r.ok for r in load.records)
    assert server.most_in_flight == 4
    assert all(r.worker == "http://w1" and r.reply.cached_tokens == 1 for r in load.records)


def test_all_at_once_without_a_limit() -> None:
    server = FakeServer()
    load = run_load(BenchConfig(num_groups=5, prompts_per_group=6, **SMALL), server)
    assert len(load.records) == 30 and server.most_in_flight == 30


def test_request_budget() -> None:
    server = FakeServer()
    config = BenchConfig(
        workload="multi-turn", num_conversations=4, turns=3, num_requests=7, concurrency=2, **SMALL
    )
    load = run_load(config, server)
    assert load.planned == 7 and len(load.records) == 7 and len(server.prompts) == 7


def test_turns_send_the_answers_returned() -> None:
    server = FakeServer()
    config = BenchConfig(workload="multi-turn", num_conversations=2, turns=3, **SMALL)
    load = run_load(config, server)
    assert len(load.records) == 6
    for script in (0, 1):
        turns = [r for r in load.records if r.script == script]
        assert [r.turn for r in turns] == [0, 1, 2]
        for earlier, later in itertools.pairwise(turns):
            # The next prompt is the previous one, the answer actually returned, then more.
            assert later.prompt.startswith(earlier.prompt + earlier.reply.answer + "\n")


def test_a_failed_turn_ends_its_conversation() -> None:
    server = FakeServer()
    config = BenchConfig(workload="multi-turn", num_conversations=3, turns=4, **SMALL)
    scripts = build_workload(config)
    server.fail_when = scripts[1].turns[1].content  # conversation 1 fails at turn 1

    async def go() -> Load:
        load = Load(config, scripts, server, "", time.perf_counter)
        await load.run()
        return load

    load = asyncio.run(go())
    failed = [r for r in load.records if r.failed]
    assert [(r.script, r.turn, r.reply.error) for r in failed] == [(1, 1, "http 503")]
    assert len(load.records) == 4 + 2 + 4 and load.planned == 12  # two turns never sent


def test_time_limit_cancels_what_runs() -> None:
    class Stuck(FakeServer):
        async def post(self, path: str, body: bytes, sink: Sink) -> None:
            await asyncio.sleep(60)

    config = BenchConfig(
        workload="random", num_requests=3, input_len=2, max_duration=0.05, **{"output_len": 1}
    )
    load = run_load(config, Stuck())
    assert [r.cancelled for r in load.records] == [True] * 3


def test_a_stop_event_ends_the_run() -> None:
    class Stuck(FakeServer):
        async def post(self, path: str, body: bytes, sink: Sink) -> None:
            await asyncio.sleep(60)

    async def go() -> Load:
        stop = asyncio.Event()
        config = BenchConfig(workload="random", num_requests=2, input_len=2)
        load = Load(config, build_workload(config), Stuck(), "", time.perf_counter)
        asyncio.get_running_loop().call_later(0.05, stop.set)
        await load.run(stop)
        return load

    assert all(r.cancelled for r in asyncio.run(go()).records)


def test_a_bug_in_the_load_is_not_hidden() -> None:
    class Broken(FakeServer):
        async def post(self, path: str, body: bytes, sink: Sink) -> None:
            raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        run_load(BenchConfig(workload="random", num_requests=1, input_len=2), Broken())


def test_nothing_listening_gives_connect_errors() -> None:
    config = BenchConfig(workload="random", num_requests=2, input_len=2, output_len=1)
    result = asyncio.run(run_bench(config, "http://127.0.0.1:9"))
    assert result.figures.failures == {"connect error": 2}


def test_lengths_in_a_local_tokenizers_tokens(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, Any] = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(VOCABULARY)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.save_pretrained(str(tmp_path))
    codec = HFCodec(str(tmp_path))
    config = BenchConfig(num_groups=2, prompts_per_group=2, system_prompt_len=30, question_len=9)
    for script in build_workload(config, codec):
        ((_, system),) = script.history
        assert len(codec.encode(system)) == 30
        assert len(codec.encode(script.turns[0].content)) == 9
