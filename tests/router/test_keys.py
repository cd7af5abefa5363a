"""Routing keys: whole conversations, prompts, token ids; every bad input named."""

from __future__ import annotations

import orjson
import pytest

from sglang_dp.router.keys import (
    CHAT,
    COMPLETIONS,
    GENERATE,
    InvalidRequest,
    extend_key,
    route_request,
)


def routed(path: str, body: object, encode=None):
    return route_request(path, orjson.dumps(body), encode)


def test_chat_key_is_the_whole_conversation_with_roles() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "More"}]},
    ]
    r = routed(CHAT, {"messages": messages, "stream": True})
    assert r.key == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello\n<|user|>\nMore\n"
    assert r.stream and not r.batch


def test_next_turn_extends_the_key_with_the_answer() -> None:
    turn1 = routed(CHAT, {"messages": [{"role": "user", "content": "Hi"}]})
    after = extend_key(turn1, "Hello")
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


def test_generate_text_batch_and_ids() -> None:
    assert routed(GENERATE, {"text": "abc"}).key == "abc"
    batch = routed(GENERATE, {"text": ["first", "second"]})
    assert batch.key == "first" and batch.batch
    assert routed(GENERATE, {"input_ids": [1, 22, 333]}).key == "1 22 333"
    assert routed(GENERATE, {"input_ids": [1, 2]}, encode=lambda s: [9]).key == (1, 2)
    assert routed(GENERATE, {"text": "ab"}, encode=lambda s: [ord(c) for c in s]).key == (97, 98)


def test_completions_prompt_forms() -> None:
    assert routed(COMPLETIONS, {"prompt": "p"}).key == "p"
    assert routed(COMPLETIONS, {"prompt": [5, 6]}).key == "5 6"
    assert routed(COMPLETIONS, {"prompt": [[5, 6], [7]]}).batch


def test_extend_key_for_token_keys_needs_the_tokenizer() -> None:
    r = routed(GENERATE, {"input_ids": [1, 2]}, encode=lambda s: [7] * len(s))
    assert extend_key(r, "xy", encode=lambda s: [7] * len(s)) == (1, 2, 7, 7)
    assert extend_key(r, "xy") == (1, 2)


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
    ],
)
def test_bad_input_is_named(path: str, raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        route_request(path, raw)
