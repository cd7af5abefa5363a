"""Request parsing: good shapes parse, anything else is a BadRequest (never another error)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.sim import api


def test_generate_text_and_sampling() -> None:
    req = api.parse_generate(
        {"text": "hi", "sampling_params": {"max_new_tokens": 7, "stop": "x"}, "rid": "r1"}
    )
    assert not req.batched and req.inputs[0].max_new_tokens == 7
    assert req.inputs[0].stop == ["x"] and req.inputs[0].rid == "r1"


def test_generate_batches_and_ids() -> None:
    assert api.parse_generate({"text": ["a", "b"]}).batched
    req = api.parse_generate({"input_ids": [[1, 2], [3]]})
    assert [i.input_ids for i in req.inputs] == [[1, 2], [3]]
    assert api.parse_generate({"input_ids": [1, 2]}).inputs[0].max_new_tokens == 128


@pytest.mark.parametrize(
    "body",
    [
        [],
        {},
        {"text": "a", "input_ids": [1]},
        {"text": 3},
        {"text": []},
        {"input_ids": [-1]},
        {"input_ids": []},
        {"text": "a", "sampling_params": {"max_new_tokens": -1}},
        {"text": "a", "sampling_params": {"max_new_tokens": "5"}},
        {"text": "a", "sampling_params": {"temperature": -1}},
        {"text": "a", "sampling_params": {"top_p": 0}},
        {"text": "a", "sampling_params": {"n": 2}},
        {"text": "a", "sampling_params": {"stop": [1]}},
        {"text": "a", "sampling_params": []},
        {"text": "a", "stream": "yes"},
        {"text": ["a", "b"], "stream": True},
        {"text": ["a", "b"], "rid": "one"},
    ],
)
def test_generate_rejects(body: Any) -> None:
    with pytest.raises(api.BadRequest):
        api.parse_generate(body)


def test_chat_template_prefix_property() -> None:
    turn1 = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"}]
    turn2 = [*turn1, {"role": "assistant", "content": " a1"}, {"role": "user", "content": "q2"}]
    p1, p2 = api.render_chat(turn1), api.render_chat(turn2)
    assert p2.startswith(p1 + " a1")
    parts = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert api.render_chat(parts) == "<|user|>\nq\n<|assistant|>\n"


def test_openai_parsing() -> None:
    c = api.parse_completion({"prompt": ["a", "b"], "max_tokens": 3})
    assert c.batched and [i.max_new_tokens for i in c.inputs] == [3, 3]
    assert api.parse_completion({"prompt": "a"}).inputs[0].max_new_tokens == 16
    chat = api.parse_chat(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 9,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert chat.stream and chat.include_usage and chat.inputs[0].max_new_tokens == 9
    for bad in ({"messages": []}, {"messages": [{"content": "x"}]}, {"prompt": None}):
        with pytest.raises(api.BadRequest):
            (api.parse_chat if "messages" in bad else api.parse_completion)(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-2, 2) | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "text",
                    "input_ids",
                    "sampling_params",
                    "max_new_tokens",
                    "stop",
                    "stream",
                    "rid",
                    "prompt",
                    "messages",
                    "role",
                    "content",
                    "max_tokens",
                    "n",
                    "temperature",
                    "top_p",
                    "stream_options",
                    "echo",
                    "stop_token_ids",
                    "type",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_parses_or_is_a_bad_request(body: Any) -> None:
    for parse in (api.parse_generate, api.parse_completion, api.parse_chat):
        with contextlib.suppress(api.BadRequest):
            parse(body)
