"""Request bodies and response parsing of the three routes (pure)."""

from __future__ import annotations

import json

from sglang_dp.bench.protocol import ReplyParser, request_body
from sglang_dp.bench.workloads import Script, Turn

CONVERSATION = Script(0.0, (Turn("q1", 3), Turn("q2", 4)), (("system", "sys"),))


def sse(*payloads: object) -> bytes:
    return b"".join(
        b"data: " + (p.encode() if isinstance(p, str) else json.dumps(p).encode()) + b"\n\n"
        for p in payloads
    )


def test_generate_body() -> None:
    body = request_body("generate", CONVERSATION, 1, ["a1"], stream=True, model="")
    assert body["text"] == "sys\nUser: q1\nAssistant:a1\nUser: q2\nAssistant:"
    assert body["sampling_params"] == {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    assert body["stream"] is True


def test_chat_body_sends_the_whole_history_and_asks_for_usage() -> None:
    body = request_body("chat", CONVERSATION, 1, ["a1"], stream=True, model="m")
    assert body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert body["model"] == "m" and body["max_tokens"] == 4
    assert body["stream_options"] == {"include_usage": True}
    raw = Script(0.0, (Turn("bare", 2),), raw=True)
    assert request_body("chat", raw, 0, [], stream=False, model="m")["messages"] == [
        {"role": "user", "content": "bare"}
    ]
    assert "stream_options" not in request_body("chat", raw, 0, [], stream=False, model="m")


def test_completions_body() -> None:
    raw = Script(0.0, (Turn("bare prompt", 2),), raw=True)
    body = request_body("completions", raw, 0, [], stream=False, model="m")
    assert body["prompt"] == "bare prompt" and body["max_tokens"] == 2


def meta(completion: int) -> dict[str, int]:
    return {"prompt_tokens": 10, "cached_tokens": 6, "completion_tokens": completion}


def test_generate_stream_split_anywhere() -> None:
    data = sse(
        {"text": "a", "meta_info": meta(1)},
        {"text": "a b", "meta_info": meta(2)},
        {"text": "a b c", "meta_info": meta(3)},
        "[DONE]",
    )
    for cut in range(1, len(data)):
        reply = ReplyParser("generate")
        reply.feed(data[:cut], 1.0)
        reply.feed(data[cut:], 2.0)
        reply.finish_stream()
        assert reply.error is None and reply.done
        assert reply.answer == "a b c"
        assert (reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens) == (10, 6, 3)
        assert reply.text_times in ([1.0, 2.0], [1.0], [2.0])


def test_generate_stream_timing_per_read() -> None:
    reply = ReplyParser("generate")
    for i, text in enumerate(["x", "x y", "x y z"]):
        reply.feed(sse({"text": text, "meta_info": meta(i + 1)}), float(i))
    reply.feed(sse("[DONE]"), 9.0)
    assert reply.text_times == [0.0, 1.0, 2.0] and reply.texts == ["x", " y", " z"]


def test_chat_stream_with_usage_chunk() -> None:
    reply = ReplyParser("chat")
    reply.feed(sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]}), 1.0)
    reply.feed(sse({"choices": [{"delta": {"content": "hel"}}], "usage": None}), 2.0)
    reply.feed(sse({"choices": [{"delta": {"content": "lo"}, "finish_reason": "length"}]}), 3.0)
    usage = {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    reply.feed(sse({"choices": [], "usage": usage}, "[DONE]"), 4.0)
    reply.finish_stream()
    assert reply.error is None and reply.answer == "hello"
    assert reply.text_times == [2.0, 3.0]  # the role-only first chunk is not a token
    assert (reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens) == (5, 4, 2)


def test_completions_stream_pieces_of_one_read_count_once() -> None:
    reply = ReplyParser("completions")
    reply.feed(sse({"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]}), 1.0)
    reply.feed(sse({"choices": [{"text": "c"}]}, "[DONE]"), 2.0)
    reply.finish_stream()
    assert reply.answer == "abc" and reply.text_times == [1.0, 2.0]
    assert reply.cached_tokens is None  # no usage: nothing reported


def test_errors() -> None:
    reply = ReplyParser("generate")
    reply.feed(sse({"error": {"message": "boom"}}), 1.0)
    assert (reply.error, reply.detail) == ("error event", "boom")
    reply = ReplyParser("chat")
    reply.feed(sse({"choices": [{"delta": {"content": "a"}}]}), 1.0)
    reply.finish_stream()
    assert reply.error == "incomplete stream"
    reply = ReplyParser("completions")
    reply.finish_body(b"<html>")
    assert reply.error == "invalid response" and not reply.done
    reply = ReplyParser("generate")
    reply.finish_body(b'{"text": "a"}')
    assert reply.error == "invalid response"
    reply = ReplyParser("chat")
    reply.feed(sse({"object": "error", "message": "too long"}), 1.0)
    assert (reply.error, reply.detail) == ("error event", "too long")


def test_whole_bodies() -> None:
    reply = ReplyParser("generate")
    reply.finish_body(json.dumps({"text": "out", "meta_info": meta(1)}).encode())
    assert reply.done and reply.answer == "out" and reply.cached_tokens == 6
    assert reply.text_times == []  # no streaming, no TTFT
    reply = ReplyParser("chat")
    body = {
        "choices": [{"message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
    reply.finish_body(json.dumps(body).encode())
    assert reply.done and reply.answer == "hi" and reply.prompt_tokens == 3
    assert reply.cached_tokens is None
