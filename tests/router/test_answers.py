"""router.answers: token counts and output of every answer shape, and the SSE stream tap."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.router.answers import (
    MAX_PENDING,
    StreamTap,
    last_data_event,
    outcome,
    output_ids,
    output_text,
    token_counts,
)
from sglang_dp.router.keys import KIND_CHAT, KIND_IDS, route_request
from sglang_dp.sglang_api import CHAT, COMPLETIONS, GENERATE

NATIVE = {
    "text": "hi",
    "meta_info": {"prompt_tokens": 10, "cached_tokens": 4, "completion_tokens": 2},
}
USAGE = {
    "choices": [{"message": {"content": "hello"}}],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 5},
    },
}


def test_token_counts_native_and_openai() -> None:
    assert token_counts(NATIVE) == (10, 4, 2)
    assert token_counts(USAGE) == (9, 5, 3)


def test_token_counts_absent_when_not_reported() -> None:
    assert token_counts({"text": "x"}) is None
    assert token_counts({"usage": {"prompt_tokens": 3}}) is None  # no cache report
    assert token_counts({"meta_info": {"prompt_tokens": 3}}) is None


def test_output_text_per_path() -> None:
    assert output_text(GENERATE, NATIVE) == "hi"
    assert output_text(CHAT, USAGE) == "hello"
    assert output_text(COMPLETIONS, {"choices": [{"text": "abc"}]}) == "abc"
    assert output_text(CHAT, {"choices": []}) is None
    assert output_text(CHAT, {"choices": [{"message": {"content": None}}]}) is None
    assert output_text(GENERATE, {"text": 3}) is None


def test_last_data_event_skips_done_and_comments() -> None:
    events = b'data: {"a": 1}\n\n: keep-alive\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    assert last_data_event(events) == b'{"b": 2}'
    assert last_data_event(b"data: [DONE]\n\n") == b""


def _stream(events: list[bytes]) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"


@given(
    st.lists(st.integers(0, 10**6), min_size=1, max_size=20),
    st.lists(st.integers(1, 40), min_size=1, max_size=50),
)
def test_tap_passes_every_byte_and_finds_the_last_event(values: list[int], cuts: list[int]) -> None:
    raw = _stream([b'{"n": %d}' % v for v in values])
    tap = StreamTap()
    assert _feed_in_cuts(tap, raw, cuts) == raw
    assert tap.last_reply() == {"n": values[-1]}


def test_tap_memory_is_bounded_without_event_boundaries() -> None:
    tap = StreamTap()
    for _ in range(3):
        tap.feed(b"x" * (MAX_PENDING // 2 + 1))
    assert len(tap._pending) <= MAX_PENDING


def test_tap_final_event_without_blank_line() -> None:
    tap = StreamTap()
    tap.feed(b'data: {"a": 1}\n\ndata: {"b": 2}\n')
    assert tap.last_reply() == {"b": 2}


@pytest.mark.parametrize(("path", "expected"), [(GENERATE, None), (CHAT, {"a": 1})])
def test_tap_a_malformed_last_event(path: str, expected: dict[str, int] | None) -> None:
    # /generate's last event is read at the end (a broken one: no correction); an OpenAI
    # stream's events are parsed as they pass, so the last well-formed one is kept
    tap = StreamTap(path)
    tap.feed(b'data: {"a": 1}\n\ndata: {"broken\n\n')
    assert tap.last_reply() == expected
    assert StreamTap(path).last_reply() is None


def _chat_stream(pieces: list[str], usage: bool) -> list[bytes]:
    """A chat stream as SGLang writes it: role, deltas, finish, [usage], [DONE]."""
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{**base, "choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    if usage:
        chunks.append({**base, "choices": [], "usage": USAGE["usage"]})
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def _feed_in_cuts(tap: StreamTap, raw: bytes, cuts: list[int]) -> bytes:
    out, at, i = [], 0, 0
    while at < len(raw):
        size = cuts[i % len(cuts)]
        out.append(tap.feed(raw[at : at + size]))
        at += size
        i += 1
    return b"".join(out)


@given(
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=12),
    st.lists(st.integers(1, 300), min_size=1, max_size=30),
    st.booleans(),
)
def test_tap_strips_the_usage_it_asked_for_byte_for_byte(
    pieces: list[str], cuts: list[int], strip: bool
) -> None:
    with_usage = b"".join(_chat_stream(pieces, usage=True))
    tap = StreamTap(CHAT, strip_usage=strip)
    out = _feed_in_cuts(tap, with_usage, cuts)
    assert out == (b"".join(_chat_stream(pieces, usage=False)) if strip else with_usage)
    assert token_counts(tap.last_reply() or {}) == (9, 5, 3)  # the router still reads it
    assert tap.output() == "".join(pieces)


def test_tap_collects_completion_text_and_leaves_generate_to_its_last_event() -> None:
    events = [{"choices": [{"index": 0, "text": t}]} for t in ["a", "b", "c"]]
    tap = StreamTap(COMPLETIONS)
    tap.feed(_stream([orjson.dumps(e) for e in events]))
    assert tap.output() == "abc"
    generate = StreamTap(GENERATE)
    generate.feed(_stream([orjson.dumps(NATIVE)]))
    assert generate.output() is None and generate.last_reply() == NATIVE


def test_tap_keeps_a_stream_without_usage_and_ignores_other_choices() -> None:
    raw = b"".join(_chat_stream(["x"], usage=False))
    other = b'data: {"choices": [{"index": 1, "delta": {"content": "zz"}}]}\n\n'
    tap = StreamTap(CHAT, strip_usage=True)
    assert tap.feed(other + raw) == other + raw
    assert tap.output() == "x"


def test_output_ids_only_when_reported() -> None:
    assert output_ids({"output_ids": [3, 4]}) == [3, 4]
    assert output_ids({"output_ids": []}) is None
    assert output_ids({"output_ids": ["a"]}) is None
    assert output_ids(NATIVE) is None


def test_outcome_of_each_answer_shape() -> None:
    chat = route_request(CHAT, b'{"messages": [{"role": "user", "content": "Hi"}]}')
    whole = outcome(chat, USAGE)
    assert whole is not None and whole.kind == KIND_CHAT
    assert (whole.prompt_tokens, whole.cached_tokens, whole.completion_tokens) == (9, 5, 3)
    assert whole.extended_key == str(chat.key) + "h"  # "hello" but about a token
    streamed = outcome(chat, {"choices": [], "usage": USAGE["usage"]}, " the answer")
    assert streamed is not None and streamed.extended_key == str(chat.key) + " the"
    ids = route_request(GENERATE, b'{"input_ids": [5, 6]}')
    native = outcome(ids, {**NATIVE, "output_ids": [7, 8]})
    assert native is not None and native.kind == KIND_IDS and native.extended_key == "5 6 7"
    assert outcome(chat, {"choices": []}) is None  # no cache report: nothing to correct
    batch = route_request(COMPLETIONS, b'{"prompt": ["a", "b"]}')
    assert outcome(batch, USAGE) is None  # usage of two prompts: not one key's
