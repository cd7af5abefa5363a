"""Request bodies and response parsing for the three generation routes (pure: no I/O, no clock).

- `request_body` builds what one turn of a script sends: `/generate` (`text`, `sampling_params`
  with `max_new_tokens`), `/v1/completions` (`prompt`, `max_tokens`) or `/v1/chat/completions`
  (`messages`, `max_tokens`). Greedy (`temperature` 0) and `ignore_eos`, as SGLang's
  bench_serving sends, so every request generates exactly the asked number of tokens on a real
  server too. Streamed OpenAI requests ask for `stream_options.include_usage`, so the token
  counts arrive in a last chunk.
- `ReplyParser` reads a response as it arrives: `feed(bytes, now)` for server-sent events
  (`data: {json}` blocks ending with `data: [DONE]`; `/generate` events carry the CUMULATIVE text,
  OpenAI chunks a delta), `finish_body(bytes, now)` for a whole JSON answer. It records when each
  piece of new text arrived (TTFT and inter-token gaps), the answer text, and the token counts
  (`meta_info.prompt_tokens / cached_tokens / completion_tokens`, or `usage.prompt_tokens`,
  `usage.completion_tokens`, `usage.prompt_tokens_details.cached_tokens`). A malformed answer or
  an error event sets `error` and never raises. Text that arrives in one read counts as one
  piece (gaps between events of one read would measure the client's lateness, not the server);
  of the cumulative `/generate` events of one read only the last is parsed, which keeps the
  client's cost per read, not per token, when it falls behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from sglang_dp.bench.workloads import Message, Script, messages_for, prompt_text
from sglang_dp.sglang_api import event_data, meta_counts, usage_counts


def request_body(
    api: str,
    script: Script,
    turn: int,
    answers: Sequence[str],
    *,
    stream: bool,
    model: str,
) -> dict[str, Any]:
    """The JSON body of request `turn` of `script` on route `api`."""
    max_tokens = script.turns[turn].max_tokens
    if api == "generate":
        return {
            "text": prompt_text(script, turn, answers),
            "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
            "stream": stream,
        }
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if api == "chat":
        messages: list[Message] = (
            [("user", script.turns[0].content)]
            if script.raw
            else messages_for(script, turn, answers)
        )
        body["messages"] = [{"role": role, "content": content} for role, content in messages]
    else:
        body["prompt"] = prompt_text(script, turn, answers)
    return body


@dataclass
class ReplyParser:
    """One response being read (see the module docstring). Times are the caller's clock."""

    api: str
    texts: list[str] = field(default_factory=list)  # pieces of the answer, in order
    text_times: list[float] = field(default_factory=list)  # when each piece arrived
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None  # the failure reason, when the answer is not a success
    detail: str = ""  # what the server said about it
    done: bool = False  # [DONE] seen, or a whole body read
    _buffer: bytes = b""
    _cumulative: str = ""  # /generate streams: the text so far

    @property
    def answer(self) -> str:
        return "".join(self.texts)

    def feed(self, data: bytes, now: float) -> None:
        """Bytes of an event stream, as they arrived at `now`."""
        self._buffer += data
        *events, self._buffer = self._buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        payloads = [data for data in map(event_data, events) if data]
        if payloads and payloads[-1] == b"[DONE]":
            self.done = True
            payloads.pop()
        if self.api == "generate":
            # Cumulative events: the last one of a read says all the earlier ones said.
            payloads = payloads[-1:]
        for payload in payloads:
            if self.error is None:
                self._data(payload, now)

    def finish_stream(self) -> None:
        """The stream ended: it must have said [DONE]."""
        if self.error is None and not self.done:
            self.fail("incomplete stream", "the stream ended before data: [DONE]")

    def finish_body(self, data: bytes) -> None:
        """A whole (non-streamed) JSON answer."""
        obj = self._json(data)
        if obj is None:
            return
        if self.api == "generate":
            self._generate(obj, None, cumulative=False)
        else:
            choice = self._choice(obj)
            if choice is not None:
                piece = choice.get("text") if self.api == "completions" else _content(choice)
                self._piece(piece, None)
            self._usage(obj.get("usage"))
        self.done = self.error is None

    # --- internals
    def _data(self, payload: bytes, now: float) -> None:
        obj = self._json(payload)
        if obj is None:
            return
        if self.api == "generate":
            self._generate(obj, now, cumulative=True)
            return
        choice = self._choice(obj, required=False)
        if choice is not None:
            delta = choice.get("delta") or {}
            self._piece(
                choice.get("text") if self.api == "completions" else delta.get("content"), now
            )
        self._usage(obj.get("usage"))

    def _json(self, data: bytes) -> dict[str, Any] | None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.fail("invalid response", data[:200].decode(errors="replace"))
            return None
        if not isinstance(obj, dict):
            self.fail("invalid response", "not a JSON object")
            return None
        if "error" in obj or obj.get("object") == "error":
            error = obj.get("error", obj)
            message = error.get("message", "") if isinstance(error, dict) else str(error)
            self.fail("error event", str(message))
            return None
        return obj

    def _generate(self, obj: dict[str, Any], now: float | None, *, cumulative: bool) -> None:
        text = obj.get("text")
        meta = obj.get("meta_info")
        if not isinstance(text, str) or not isinstance(meta, dict):
            self.fail("invalid response", "a /generate answer needs text and meta_info")
            return
        if cumulative:
            # Events carry the whole text so far; the new piece is what grew.
            if len(text) > len(self._cumulative):
                self._piece(text[len(self._cumulative) :], now)
                self._cumulative = text
        else:
            self._piece(text, None)
        self._counts(meta_counts(meta))

    def _choice(self, obj: dict[str, Any], required: bool = True) -> dict[str, Any] | None:
        choices = obj.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            return choices[0]
        if required or not isinstance(choices, list):  # a usage chunk has "choices": []
            self.fail("invalid response", "an OpenAI answer needs choices")
        return None

    def _piece(self, piece: Any, now: float | None) -> None:
        """A piece of answer text; `now` when it was streamed (a whole body has no timing)."""
        if isinstance(piece, str) and piece:
            self.texts.append(piece)
            # Pieces of one read arrived together: their gaps would time the client, not the server.
            if now is not None and (not self.text_times or self.text_times[-1] != now):
                self.text_times.append(now)

    def _usage(self, usage: Any) -> None:
        # Streamed chunks carry "usage": null until the last one: nothing reported, nothing kept.
        self._counts(usage_counts(usage))

    def _counts(self, counts: tuple[int | None, int | None, int | None]) -> None:
        """Keep the token counts an answer reports (a count it leaves out keeps its value)."""
        prompt, cached, completion = counts
        self.prompt_tokens = self.prompt_tokens if prompt is None else prompt
        self.cached_tokens = self.cached_tokens if cached is None else cached
        self.completion_tokens = self.completion_tokens if completion is None else completion

    def fail(self, reason: str, detail: str = "") -> None:
        """Mark the request failed (the first reason wins)."""
        if self.error is None:
            self.error, self.detail = reason, detail


def _content(choice: dict[str, Any]) -> Any:
    message = choice.get("message")
    return message.get("content") if isinstance(message, dict) else None
