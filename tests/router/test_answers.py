"""router.answers: token counts and output of every answer shape, and the SSE stream tap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.router.answers import (
    MAX_PENDING,
    StreamTap,
    last_data_event,
    output_text,
    token_counts,
)
from sglang_dp.router.keys import CHAT, COMPLETIONS, GENERATE

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
    out, at, i = [], 0, 0
    while at < len(raw):
        size = cuts[i % len(cuts)]
        out.append(tap.feed(raw[at : at + size]))
        at += size
        i += 1
    assert b"".join(out) == raw
    assert tap.last_event() == b'{"n": %d}' % values[-1]


def test_tap_memory_is_bounded_without_event_boundaries() -> None:
    tap = StreamTap()
    for _ in range(3):
        tap.feed(b"x" * (MAX_PENDING // 2 + 1))
    assert len(tap._pending) <= MAX_PENDING


def test_tap_final_event_without_blank_line() -> None:
    tap = StreamTap()
    tap.feed(b'data: {"a": 1}\n\ndata: {"b": 2}\n')
    assert tap.last_event() == b'{"b": 2}'
