"""Reading a worker's answer: what the router corrects its tree from (pure).

`router/keys.py` reads requests; this module reads the answers to them:
- `token_counts(reply)`: (prompt, cached, completion) tokens from SGLang's `meta_info` or an
  OpenAI `usage` object (`prompt_tokens_details.cached_tokens`), or None when not reported;
- `output_text(path, reply)` / `output_ids(reply)`: the generated text of a whole answer
  (`/generate`'s `text`, a chat choice's `message.content`, a completion choice's `text`) and
  the generated token ids where the worker reports them (`/generate`'s `output_ids`);
- `outcome(routed, reply, ...)`: the `engine.Outcome` of an answer, its extended key included;
- `StreamTap`: watches a relayed SSE stream chunk by chunk. `feed(chunk)` returns what to pass
  on to the client and remembers the last complete `data: {...}` event (the one that carries
  `meta_info` / `usage`; `last_reply()` gives it parsed, no event is parsed twice). It keeps
  only the bytes after the last event boundary (`\\n\\n`), never a copy of the stream, and at
  most `MAX_PENDING` of them: a worker that never ends an event cannot grow the router's memory.
  For OpenAI streams it also collects the streamed output (choice 0's deltas, at most
  `MAX_OUTPUT` characters) so that it can be inserted like a whole answer's; with `strip_usage`
  (the router asked for usage the client did not) it passes on only complete events and drops
  the usage-only chunk (`choices: []`), so the client receives byte for byte what the worker
  would have sent without the option. An event still incomplete when the stream ends is then
  not passed on: SSE clients discard an incomplete final event anyway.
"""

from __future__ import annotations

from typing import Any

import orjson

from sglang_dp.router.engine import Outcome
from sglang_dp.router.keys import Encoder, Routed, extend_key
from sglang_dp.sglang_api import CHAT, EVENT_END, GENERATE, event_data, meta_counts, usage_counts

MAX_PENDING = 1 << 20  # one SSE event is far smaller; past this the partial event is dropped
MAX_OUTPUT = 1 << 20  # characters of streamed output collected (a prefix of it is inserted)


class StreamTap:
    """Watches one SSE stream on its way to the client (see the module docstring)."""

    def __init__(self, path: str = GENERATE, strip_usage: bool = False) -> None:
        self._pending = b""  # what follows the last event boundary seen
        self._last = b""  # data of the last complete JSON event
        self._last_reply: dict[str, Any] | None = None  # _last parsed (OpenAI events already are)
        self._openai = path != GENERATE
        self._chat = path == CHAT
        self._strip = strip_usage and self._openai
        self._output: list[str] = []
        self._output_chars = 0

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk from the worker; return the bytes to send to the client."""
        data = self._pending + chunk if self._pending else chunk
        cut = data.rfind(EVENT_END)
        if cut < 0:
            self._pending = data if len(data) <= MAX_PENDING else b""
            return b"" if self._strip else chunk
        complete = data[: cut + len(EVENT_END)]
        rest = data[cut + len(EVENT_END) :]
        self._pending = rest if len(rest) <= MAX_PENDING else b""
        if not self._openai:
            last = last_data_event(complete)
            if last:
                self._last, self._last_reply = last, None
            return chunk
        kept = self._read_events(complete)
        return kept if self._strip else chunk

    def last_reply(self) -> dict[str, Any] | None:
        """The last complete `data: {...}` event seen, parsed (None if none, or not an object)."""
        if self._pending:  # a final event without its blank line still counts
            last = last_data_event(self._pending)
            if last:
                return _json_object(last)
        if self._last_reply is None and self._last:
            self._last_reply = _json_object(self._last)
        return self._last_reply

    def output(self) -> str | None:
        """The streamed output of an OpenAI stream (None for `/generate`: its last event
        carries the whole text)."""
        return "".join(self._output) if self._openai else None

    def _read_events(self, complete: bytes) -> bytes:
        """Collect the output of complete OpenAI events; return them, the usage-only chunk
        left out when stripping."""
        kept: list[bytes] = []
        dropped = False
        for event in complete.split(EVENT_END)[:-1]:
            data = event_data(event)
            reply = _json_object(data) if data.startswith(b"{") else None
            if reply is not None:
                self._last, self._last_reply = data, reply
                choices = reply.get("choices")
                if self._strip and choices == [] and "usage" in reply:
                    dropped = True
                    continue
                if isinstance(choices, list) and choices:
                    self._collect(choices[0])
            if self._strip:  # only then can an event be left out
                kept.append(event + EVENT_END)
        if not dropped:
            return complete
        return b"".join(kept)

    def _collect(self, choice: Any) -> None:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            return
        if self._chat:
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else None
        else:
            piece = choice.get("text")
        if isinstance(piece, str) and piece and self._output_chars < MAX_OUTPUT:
            self._output.append(piece)
            self._output_chars += len(piece)


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def last_data_event(events: bytes) -> bytes:
    """The data of the last `data: {...}` event in `events` (`[DONE]` and comments skipped)."""
    for event in reversed(events.split(EVENT_END)):
        data = event_data(event)
        if data.startswith(b"{"):
            return data
    return b""


def token_counts(reply: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prompt, cached, completion) tokens from `meta_info` or OpenAI `usage`, if reported
    (the cached count is required: without it there is nothing to correct from)."""
    for prompt, cached, completion in (
        meta_counts(reply.get("meta_info")),
        usage_counts(reply.get("usage")),
    ):
        if cached is not None:
            return prompt or 0, cached, completion or 0
    return None


def output_text(path: str, reply: dict[str, Any]) -> str | None:
    """The generated text of a whole (non-streamed) answer, or a /generate stream event."""
    if path == GENERATE:
        text = reply.get("text")
        return text if isinstance(text, str) else None
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if path == CHAT:
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        return content if isinstance(content, str) else None
    text = choice.get("text")
    return text if isinstance(text, str) else None


def output_ids(reply: dict[str, Any]) -> list[int] | None:
    """The generated token ids of a `/generate` answer, when the worker reports them."""
    ids = reply.get("output_ids")
    if isinstance(ids, list) and ids and all(type(i) is int and i >= 0 for i in ids):
        return ids
    return None


def outcome(
    routed: Routed,
    reply: dict[str, Any],
    streamed_output: str | None = None,
    encode: Encoder | None = None,
) -> Outcome | None:
    """What the engine corrects from, or None when the answer reports no cached tokens.

    The output comes from the reply (a whole answer, a `/generate` stream's last event) or,
    for OpenAI streams, from what the tap collected (`streamed_output`). An OpenAI batch
    reports the usage of all its prompts together: it cannot correct one prompt's key.
    """
    counts = token_counts(reply)
    if counts is None or (routed.batch and routed.path != GENERATE):
        return None
    prompt, cached, completion = counts
    extended = None
    if not routed.batch:
        text = streamed_output if streamed_output is not None else output_text(routed.path, reply)
        extended = extend_key(routed, text, output_ids(reply), encode)
    return Outcome(prompt, cached, completion, extended, routed.kind)
