"""Routing keys: whole conversations, prompts, token ids; every bad input named."""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from sglang_dp.router.keys import (
    KIND_CHAT,
    KIND_IDS,
    KIND_TEXT,
    InvalidRequest,
    Routed,
    extend_key,
    route_request,
    without_last_token,
)
from sglang_dp.sglang_api import CHAT, COMPLETIONS, GENERATE
from sglang_dp.tokenizer import HFEncoder
from tests.processes import make_chat_tokenizer


class Chars:
    """An encoder with one token per character and no chat template."""

    def encode(self, text: str, special: bool) -> Sequence[int]:
        return ([1] if special else []) + [ord(c) for c in text]

    def render_chat(self, messages: list[dict[str, Any]]) -> str | None:
        return None


def routed(path: str, body: object, encode: Any = None) -> Routed:
    return route_request(path, orjson.dumps(body), encode)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    folder = make_chat_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_chat_key_is_the_whole_conversation_with_roles() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "More"}]},
    ]
    r = routed(CHAT, {"messages": messages})
    assert r.key == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello\n<|user|>\nMore\n<|assistant|>\n"
    )
    assert not r.stream and not r.batch and r.kind == KIND_CHAT


def test_next_turn_extends_the_key_with_the_answer() -> None:
    turn1 = routed(CHAT, {"messages": [{"role": "user", "content": "Hi"}]})
    after = extend_key(turn1, "Hello there")
    turn2 = routed(
        CHAT,
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"},
            ]
        },
    )
    assert isinstance(turn2.key, str) and turn2.key.startswith(str(after))
    assert after == turn1.key + "Hello"  # the last token is not cached by the worker


def test_generate_text_batch_and_ids() -> None:
    assert routed(GENERATE, {"text": "abc"}).key == "abc"
    batch = routed(GENERATE, {"text": ["first", "second"]})
    assert batch.key == "first" and batch.batch
    ids = routed(GENERATE, {"input_ids": [1, 22, 333]})
    assert ids.key == "1 22 333" and ids.kind == KIND_IDS
    assert list(routed(GENERATE, {"input_ids": [1, 2]}, Chars()).key) == [1, 2]
    text = routed(GENERATE, {"text": "ab"}, Chars())
    assert list(text.key) == [1, 97, 98] and text.kind == KIND_TEXT  # with the BOS


def test_completions_prompt_forms() -> None:
    assert routed(COMPLETIONS, {"prompt": "p"}).key == "p"
    assert routed(COMPLETIONS, {"prompt": [5, 6]}).key == "5 6"
    assert routed(COMPLETIONS, {"prompt": [[5, 6], [7]]}).batch


def test_ids_keys_extend_with_output_ids_never_text() -> None:
    chars = routed(GENERATE, {"input_ids": [1, 2]})
    assert extend_key(chars, "some text", [7, 8, 9]) == "1 2 7 8"
    assert extend_key(chars, "some text") is None
    tokens = routed(GENERATE, {"input_ids": [1, 2]}, Chars())
    assert list(extend_key(tokens, "xy", [7, 8], Chars()) or []) == [1, 2, 7]


def test_token_keys_encode_prompt_and_output_as_one_sequence() -> None:
    r = routed(COMPLETIONS, {"prompt": "ab"}, Chars())
    assert list(extend_key(r, "cd", None, Chars()) or []) == [1, 97, 98, 99]
    assert extend_key(r, "cd") is None  # no tokenizer: cannot be encoded


def test_chat_keys_follow_the_models_chat_template(hf: Any) -> None:
    encoder = HFEncoder(hf)
    history = [{"role": "system", "content": "You are a helpful assistant."}]
    turn1 = [*history, {"role": "user", "content": "the capital of France?"}]
    r1 = routed(CHAT, {"messages": turn1}, encoder)
    expected = hf.apply_chat_template(turn1, tokenize=True, add_generation_prompt=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    assert list(r1.key) == list(expected)  # what SGLang caches, template tokens included
    answer = "Paris is the capital of France."
    cached = extend_key(r1, answer, None, encoder)
    assert cached is not None
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "Yes?"}]
    r2 = routed(CHAT, {"messages": turn2}, encoder)
    assert list(r2.key[: len(cached)]) == list(cached)  # the next turn extends it
    assert len(cached) == len(hf.encode(r1.text + answer, add_special_tokens=False)) - 1


def test_without_a_template_chat_uses_the_built_in_one(hf: Any) -> None:
    hf_plain = copy.copy(hf)
    hf_plain.chat_template = None
    r = routed(CHAT, {"messages": [{"role": "user", "content": "hello"}]}, HFEncoder(hf_plain))
    assert list(r.key) == hf.encode("<|user|>\nhello\n<|assistant|>\n", add_special_tokens=False)


def test_openai_streams_ask_for_usage_and_say_so() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "temperature": 0.5}
    r = routed(CHAT, body)
    assert r.strip_usage
    sent = orjson.loads(r.forward)
    assert sent["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in sent.items() if k != "stream_options"} == body
    kept = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    asked = routed(COMPLETIONS, kept)
    assert not asked.strip_usage and asked.forward == orjson.dumps(kept)
    other = routed(COMPLETIONS, {"prompt": "x", "stream": True, "stream_options": {"a": 1}})
    assert orjson.loads(other.forward)["stream_options"] == {"a": 1, "include_usage": True}
    for path, plain in [
        (GENERATE, {"text": "x", "stream": True}),
        (CHAT, {**body, "stream": False}),
    ]:
        r = routed(path, plain)
        assert not r.strip_usage and r.forward == orjson.dumps(plain)


def test_without_last_token() -> None:
    assert without_last_token(" the cat sat") == " the cat"
    assert without_last_token("word") == ""
    assert without_last_token("x" * 40) == "x" * 36


@pytest.mark.parametrize(
    ("path", "raw", "message"),
    [
        (GENERATE, b"", "body is empty"),
        (GENERATE, b"{not json", "not valid JSON"),
        (GENERATE, b"[1, 2]", "must be a JSON object, not a list"),
        (GENERATE, b"{}", "exactly one of 'text' and 'input_ids'"),
        (GENERATE, b'{"text": "a", "input_ids": [1]}', "exactly one of"),
        (GENERATE, b'{"text": 5}', "'text' must be a string"),
        (GENERATE, b'{"input_ids": ["a"]}', "'input_ids' must be"),
        (GENERATE, b'{"input_ids": "12"}', "'input_ids' must be a list of token ids"),
        (GENERATE, b'{"text": "a", "sampling_params": 3}', "'sampling_params' must be an object"),
        (GENERATE, b'{"text": "a", "stream": "yes"}', "'stream' must be true or false"),
        (COMPLETIONS, b'{"model": "m"}', "'prompt' is required"),
        (COMPLETIONS, b'{"prompt": []}', "'prompt' must be"),
        (COMPLETIONS, b'{"prompt": {"a": 1}}', "not an object"),
        (CHAT, b'{"messages": []}', "'messages' must be a non-empty list"),
        (CHAT, b'{"messages": ["hi"]}', "messages[0] must be an object"),
        (CHAT, b'{"messages": [{"content": "x"}]}', "messages[0].role"),
        (CHAT, b'{"messages": [{"role": "user", "content": 3}]}', "messages[0].content"),
        (GENERATE, b'{"input_ids": [1, -2]}', "token ids must be integers from 0"),
        (
            CHAT,
            b'{"messages": [{"role": "user"}], "stream": true, "stream_options": 1}',
            "'stream_options' must be an object",
        ),
    ],
)
def test_bad_input_is_named(path: str, raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        route_request(path, raw)


def test_encoding_by_pieces_equals_encoding_whole(hf: Any) -> None:
    encoder = HFEncoder(hf)
    rng = random.Random(0)
    fragments = ["<|start|>", "<|end|>", "<s>", "hello", " world", "\n", "  ", "Paris.", "é"]
    long = " the capital of France is Paris" * 4  # remembered pieces are at least 64 characters
    for _ in range(3 * HFEncoder.SELF_CHECKS):
        text = "".join(rng.choice([*fragments, long]) for _ in range(rng.randrange(1, 12)))
        for special in (False, True):
            assert list(encoder.encode(text, special)) == hf.encode(
                text, add_special_tokens=special
            )
    assert encoder._splitter is not None and encoder._memo  # still encoding by pieces
