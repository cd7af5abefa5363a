"""sglang_api: the one wire contract, and the router and the simulator agreeing on it."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.router.keys import InvalidRequest, route_request
from sglang_dp.sglang_api import (
    ASSISTANT_HEADER,
    CHAT,
    ChatError,
    chat_prompt,
    event_data,
    meta_counts,
    sse,
    usage_counts,
)
from sglang_dp.sim import api

IMAGE = {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}

texts = st.text(max_size=8)
parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, texts),
)
contents = st.one_of(st.none(), texts, st.lists(parts, max_size=3))
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": contents}
    ),
    min_size=1,
    max_size=4,
)


def test_built_in_template() -> None:
    chat = [{"role": "user", "content": [{"type": "text", "text": "q"}, IMAGE]}]
    assert chat_prompt(chat) == "<|user|>\nq" + orjson.dumps(IMAGE).decode() + "\n" + (
        ASSISTANT_HEADER
    )


@given(messages)
def test_router_key_is_the_simulators_prompt(chat: list[dict[str, Any]]) -> None:
    """Both render through the one template: the router keys what the worker caches."""
    routed = route_request(CHAT, orjson.dumps({"messages": chat}))
    prompt = api.parse_chat({"messages": chat}).inputs[0].text
    assert routed.key == prompt == chat_prompt(chat)


@pytest.mark.parametrize(
    ("chat", "field"),
    [
        ([], "'messages'"),
        (["x"], "messages[0] must be an object"),
        ([{"role": "", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": ["x"]}], "messages[0].content parts"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
    ],
)
def test_malformed_chats_are_rejected_alike(chat: Any, field: str) -> None:
    field = re.escape(field)
    with pytest.raises(ChatError, match=field):
        chat_prompt(chat)
    with pytest.raises(InvalidRequest, match=field):
        route_request(CHAT, orjson.dumps({"messages": chat}))
    with pytest.raises(api.BadRequest, match=field):
        api.parse_chat({"messages": chat})


def test_token_counts() -> None:
    assert meta_counts({"prompt_tokens": 3, "cached_tokens": 1}) == (3, 1, None)
    assert meta_counts(None) == (None, None, None)
    usage = {"prompt_tokens": 9, "completion_tokens": True, "prompt_tokens_details": {}}
    assert usage_counts(usage) == (9, None, None)  # a boolean is not a count
    full = {
        "prompt_tokens": 9,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert usage_counts(full) == (9, 4, 2)


def test_event_data() -> None:
    event = sse({"a": 1})
    assert event.endswith(b"\n\n")
    assert event_data(event) == b'{"a":1}'
    assert event_data(b": keep-alive") == b""
    assert event_data(b": ping\ndata: {}") == b"{}"
    assert event_data(b"data: a\r\ndata: b") == b"a\nb"
