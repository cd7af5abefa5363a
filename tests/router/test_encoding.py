"""Token keys without stalls: the encoder's memo of chat pieces (equal to encoding whole,
bounded, thread-safe) and the encoding pool in a router (long prompts encoded off the loop,
every failure mode answered, nothing leaked)."""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.router import server as server_module
from sglang_dp.router.config import RouterConfig
from sglang_dp.router.encoding import EncodingPool, default_threads
from sglang_dp.router.server import RouterServer
from sglang_dp.tokenizer import HFEncoder, load_encoder
from tests.processes import Worker, free_port, make_chat_tokenizer, run_on, sim_worker

FRAGMENTS = ["<|start|>", "<|end|>", "<s>", "hello", " world", "\n", "  ", "Paris.", "é", "\t"]
LONG = " the capital of France is Paris" * 4  # remembered pieces are at least 64 characters
ROLES = ["system", "user", "assistant"]
Session = aiohttp.ClientSession
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def hf(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def whole(hf: Any, text: str, special: bool) -> list[int]:
    return list(hf.encode(text, add_special_tokens=special))


texts = st.lists(st.sampled_from([*FRAGMENTS, LONG]) | st.text(max_size=80), max_size=12).map(
    "".join
)
conversations = st.lists(
    st.tuples(st.sampled_from(ROLES), st.sampled_from([LONG, "hi", ""]) | st.text(max_size=90)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(text=texts, special=st.booleans())
def test_encoding_by_pieces_equals_encoding_whole(hf: Any, text: str, special: bool) -> None:
    encoder = _shared_encoder(hf)
    assert list(encoder.encode(text, special)) == whole(hf, text, special)
    assert encoder._splitter is not None  # still encoding by pieces


@settings(max_examples=80, deadline=None)
@given(turns=conversations, answer=st.sampled_from([LONG, "Paris.", ""]) | st.text(max_size=40))
def test_chat_turns_by_pieces_equal_the_template_encoded_whole(
    hf: Any, turns: list[tuple[str, str]], answer: str
) -> None:
    encoder = _shared_encoder(hf)
    messages = [{"role": role, "content": content} for role, content in turns]
    rendered = encoder.render_chat(messages)
    assert rendered is not None
    assert list(encoder.encode(rendered, False)) == whole(hf, rendered, False)
    extended = rendered + answer  # the key extended by the answer (`keys.extend_key`)
    assert list(encoder.encode(extended, False)) == whole(hf, extended, False)


_ENCODERS: dict[int, HFEncoder] = {}


def _shared_encoder(hf: Any) -> HFEncoder:
    """One encoder across examples, so the memo's hits are exercised, not only its misses."""
    return _ENCODERS.setdefault(id(hf), HFEncoder(hf))


def test_a_shared_system_prompt_and_history_are_not_encoded_again(hf: Any) -> None:
    encoder = HFEncoder(hf)
    system = {"role": "system", "content": "You are a helpful assistant. " * 20}
    history = [system, {"role": "user", "content": "the capital of France? " * 5}]
    encoder.encode(encoder.render_chat(history) or "", False)
    before = encoder.encoded_chars
    turn = [*history, {"role": "assistant", "content": LONG}, {"role": "user", "content": "x"}]
    rendered = encoder.render_chat(turn) or ""
    assert list(encoder.encode(rendered, False)) == whole(hf, rendered, False)
    fresh = encoder.encoded_chars - before
    assert fresh < len(LONG) + 64 < len(rendered) // 4  # the answer's piece and short ones


def test_the_memo_is_bounded_and_keeps_what_every_request_shares(hf: Any) -> None:
    encoder = HFEncoder(hf)
    encoder.MEMO_CHARS = 1000
    shared = "You are a helpful assistant. " * 5
    rng = random.Random(0)
    for n in range(200):
        own = f"question {n}: " + " ".join(rng.choice(["the", "capital", "of", "is"]) * 3)
        text = f"<|start|>system\n{shared}<|end|><|start|>user\n{own * 2}<|end|>"
        assert list(encoder.encode(text, False)) == whole(hf, text, False)
        assert encoder._memo_chars <= 1000
    assert f"system\n{shared}" in encoder._memo  # the least recently used go first


def test_threads_sharing_one_encoder_get_what_whole_encoding_gives(hf: Any) -> None:
    encoder = HFEncoder(hf)
    encoder.MEMO_CHARS = 2000  # evictions all the time, from every thread
    rng = random.Random(1)
    cases = [
        "".join(rng.choice([*FRAGMENTS, LONG, LONG + str(i)]) for _ in range(rng.randrange(1, 9)))
        for i in range(300)
    ]
    expected = [whole(hf, text, True) for text in cases]
    failures: list[BaseException] = []
    wrong: list[str] = []

    def work(seed: int) -> None:
        order = list(range(len(cases)))
        random.Random(seed).shuffle(order)
        try:
            for i in order:
                if list(encoder.encode(cases[i], True)) != expected[i]:
                    wrong.append(cases[i])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures and not wrong
    assert encoder._memo_chars <= 2000


def test_a_tokenizer_that_does_not_split_is_encoded_whole_from_every_thread(
    tmp_path: Path,
) -> None:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(make_chat_tokenizer(tmp_path)), local_files_only=True)
    hf.add_tokens([AddedToken("<|sep|>", lstrip=True, rstrip=True)])  # eats spaces around it
    encoder = HFEncoder(hf)
    texts = [f"hello {i} <|sep|> world {LONG}" for i in range(64)]
    results: dict[str, Sequence[int]] = {}

    def work(part: list[str]) -> None:
        for text in part:
            results[text] = encoder.encode(text, False)

    threads = [threading.Thread(target=work, args=(texts[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert {t: list(ids) for t, ids in results.items()} == {t: whole(hf, t, False) for t in texts}
    assert encoder._splitter is None


def test_the_pool_is_sized_from_the_cpus_and_needs_a_thread() -> None:
    assert 1 <= default_threads() <= 4
    before = sys.getswitchinterval()
    pool = EncodingPool(1)  # a thread holding the GIL gives it up to the loop within 1 ms
    assert sys.getswitchinterval() == min(before, 0.001)
    asyncio.run(pool.close())
    assert sys.getswitchinterval() == before
    with pytest.raises(ValueError, match="at least one thread"):
        EncodingPool(0)
    with pytest.raises(ValueError, match="--tokenizer-threads must be >= 0"):
        RouterConfig(tokenizer_threads=-1)


# -- the pool in a router -------------------------------------------------------------------


class Gated:
    """An encoder that waits for `gate` (in the pool's thread) before encoding: the test holds a
    request in its encoding; `fail` makes it raise instead."""

    def __init__(self, inner: HFEncoder) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail = False
        self.fail_answers = False  # raise on a key extended by an answer
        self.gate.set()

    def encode(self, text: str, special: bool) -> Sequence[int]:
        if len(text) > 1000:
            self.entered.set()
            if not self.gate.wait(30):
                raise TimeoutError("the test never opened the gate")
            if self.fail or (self.fail_answers and not text.endswith("assistant\n")):
                raise RuntimeError("tokenizer exploded")
        return self.inner.encode(text, special)

    def render_chat(self, messages: list[dict[str, Any]]) -> str | None:
        return self.inner.render_chat(messages)


@pytest.fixture(scope="module")
def worker() -> Any:
    with sim_worker("--instant", "--enable-cache-report") as running:
        yield running


def chat(content: str, system: str = "You are a helpful assistant. " * 200) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
    return {"messages": messages, "max_tokens": 8}


def in_router(
    folder: Path, worker: Worker, scenario: Any, threads: int | None = 2, gated: bool = False
) -> Any:
    """Run `scenario(server, encoder, session)` against a router in this process."""

    async def main() -> Any:
        encoder = Gated(load_encoder(str(folder))) if gated else None  # type: ignore[arg-type]
        loader = server_module.load_encoder
        if encoder is not None:
            server_module.load_encoder = lambda path: encoder  # type: ignore[assignment]
        try:
            config = RouterConfig(
                worker_urls=(worker.url,),
                port=free_port(),
                routing_key="tokens",
                tokenizer_path=str(folder),
                tokenizer_threads=threads,
            )
            server = RouterServer(config)
        finally:
            server_module.load_encoder = loader
        await server.start()
        try:
            async with aiohttp.ClientSession(server.url) as session:
                return await scenario(server, encoder, session)
        finally:
            await server.stop(0.5)

    try:
        return run_on("uvloop", main)
    finally:
        gc.unfreeze()  # `load_encoder` froze this test process's objects: let them go again


async def until(condition: Any, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


def completed(server: RouterServer) -> int:
    return sum(w.completed for w in server.engine.snapshot(0).workers)


def in_flight(server: RouterServer) -> int:
    return sum(w.in_flight for w in server.engine.snapshot(0).workers)


def test_long_prompts_are_encoded_in_the_pool_and_their_answers_observed(
    folder: Path, worker: Worker
) -> None:
    async def scenario(server: RouterServer, _: Any, session: Session) -> None:
        assert server.encoding is not None and server.encoding.threads == 2
        bodies = [chat(f"question {n}") for n in range(6)] + [chat("short", system="Be brief.")]
        for body in bodies:
            async with session.post("/v1/chat/completions", json=body) as reply:
                assert reply.status == 200, await reply.text()
        await until(lambda: completed(server) == len(bodies), "every answer observed")
        assert server.encoding.offloaded == 2 * 6  # each long prompt, each long answer's key
        stats = server.engine.snapshot(0).workers[0]
        assert stats.cached_tokens > 0 and stats.agreed_tokens >= 0.9 * stats.cached_tokens
        assert in_flight(server) == 0 and server.encoding.pending == 0

    in_router(folder, worker, scenario)


def test_without_a_pool_or_a_tokenizer_no_thread_is_used(folder: Path, worker: Worker) -> None:
    async def scenario(server: RouterServer, _: Any, session: Session) -> None:
        assert server.encoding is None
        async with session.post("/v1/chat/completions", json=chat("hi")) as reply:
            assert reply.status == 200
        await until(lambda: completed(server) == 1, "the answer observed")

    in_router(folder, worker, scenario, threads=0)
    assert RouterServer(RouterConfig(worker_urls=(worker.url,))).encoding is None


def test_a_tokenizer_error_is_a_500_naming_it_and_leaks_nothing(
    folder: Path, worker: Worker
) -> None:
    async def scenario(server: RouterServer, encoder: Gated, session: Session) -> None:
        encoder.fail = True
        async with session.post("/v1/chat/completions", json=chat("boom")) as reply:
            assert reply.status == 500
            message = (await reply.json())["error"]["message"]
        assert "tokenizer failed on this request: RuntimeError: tokenizer exploded" in message
        async with session.post("/v1/chat/completions", json={"messages": []}) as reply:
            assert reply.status == 400  # bad input found in the thread is still a 400
        async with session.post("/v1/chat/completions", data=b"{" + b" " * 5000) as reply:
            assert reply.status == 400
        encoder.fail = False
        async with session.post("/v1/chat/completions", json=chat("fine")) as reply:
            assert reply.status == 200
        await until(lambda: completed(server) == 1, "the answer observed")  # it held a dispatch
        assert in_flight(server) == 0 and server.admission.in_flight == 0

    in_router(folder, worker, scenario, gated=True)


def test_a_client_gone_during_its_encoding_is_never_routed(folder: Path, worker: Worker) -> None:
    async def scenario(server: RouterServer, encoder: Gated, session: Session) -> None:
        encoder.gate.clear()
        request = asyncio.ensure_future(session.post("/v1/chat/completions", json=chat("gone")))
        await until(encoder.entered.is_set, "the request in its encoding")
        request.cancel()  # the client closes its connection
        await asyncio.gather(request, return_exceptions=True)
        assert server.encoding is not None
        pool = server.encoding
        await until(lambda: pool.pending == 0, "the encoding cancelled")
        encoder.gate.set()
        await asyncio.sleep(0.05)  # the thread's late result, if any, has come back and gone
        assert server.engine.snapshot(0).workers[0].routed == 0  # never routed
        assert in_flight(server) == 0 and server.admission.in_flight == 0
        async with session.post("/v1/chat/completions", json=chat("next")) as reply:
            assert reply.status == 200

    in_router(folder, worker, scenario, gated=True)


def test_loading_a_tokenizer_puts_its_objects_out_of_the_collectors_way(folder: Path) -> None:
    try:
        load_encoder(str(folder))
        assert gc.get_freeze_count() > 10_000  # transformers' modules, the tokenizer's vocab
    finally:
        gc.unfreeze()


def test_a_tokenizer_error_on_an_answer_still_observes_it(folder: Path, worker: Worker) -> None:
    async def scenario(server: RouterServer, encoder: Gated, session: Session) -> None:
        encoder.fail_answers = True
        async with session.post("/v1/chat/completions", json=chat("fine")) as reply:
            assert reply.status == 200
        await until(lambda: completed(server) == 1, "observed without its extension")
        assert in_flight(server) == 0 and server.engine.tree.size(worker.url) > 0

    in_router(folder, worker, scenario, gated=True)


def test_stopping_with_an_encoding_under_way_does_not_hang(folder: Path, worker: Worker) -> None:
    async def main() -> None:
        encoder = Gated(load_encoder(str(folder)))
        loader = server_module.load_encoder
        server_module.load_encoder = lambda path: encoder  # type: ignore[assignment]
        try:
            config = RouterConfig(
                worker_urls=(worker.url,),
                port=free_port(),
                routing_key="tokens",
                tokenizer_path=str(folder),
            )
            server = RouterServer(config)
        finally:
            server_module.load_encoder = loader
        await server.start()
        encoder.gate.clear()
        try:
            async with aiohttp.ClientSession(server.url) as session:
                request = asyncio.ensure_future(session.post(CHAT, json=chat("late")))
                await until(encoder.entered.is_set, "the request in its encoding")
                await server.stop(0.2)
                outcome = (await asyncio.gather(request, return_exceptions=True))[0]
                assert isinstance(outcome, aiohttp.ClientError) or outcome.status == 503
                assert server.encoding is not None and server.encoding.pending == 0
                assert server.engine.snapshot(0).workers[0].routed == 0
        finally:
            encoder.gate.set()

    try:
        run_on("uvloop", main)
    finally:
        gc.unfreeze()
