"""Reading a worker's answer: what the router corrects its tree from (pure).

`router/keys.py` reads requests; this module reads the answers to them:
- `token_counts(reply)`: (prompt, cached, completion) tokens from SGLang's `meta_info` or an
  OpenAI `usage` object (`prompt_tokens_details.cached_tokens`), or None when not reported;
- `output_text(path, reply)`: the generated text of a whole answer (`/generate`'s `text`, a chat
  choice's `message.content`, a completion choice's `text`);
- `StreamTap`: watches a relayed SSE stream chunk by chunk. `feed(chunk)` returns what to pass
  on to the client and remembers the data of the last complete `data: {...}` event (the one
  that carries `meta_info` / `usage`). It keeps only the bytes after the last event boundary
  (`\\n\\n`), never a copy of the stream, and at most `MAX_PENDING` of them: a worker that never
  ends an event cannot grow the router's memory.
"""

from __future__ import annotations

from typing import Any

from sglang_dp.router.keys import CHAT, GENERATE

MAX_PENDING = 1 << 20  # one SSE event is far smaller; past this the partial event is dropped
EVENT_END = b"\n\n"


class StreamTap:
    """Watches one SSE stream on its way to the client (see the module docstring)."""

    def __init__(self) -> None:
        self._pending = b""  # what follows the last event boundary seen
        self._last = b""  # data of the last complete JSON event

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk from the worker; return the bytes to send to the client."""
        data = self._pending + chunk if self._pending else chunk
        cut = data.rfind(EVENT_END)
        if cut < 0:
            self._pending = data if len(data) <= MAX_PENDING else b""
            return chunk
        last = last_data_event(data[:cut])
        if last:
            self._last = last
        rest = data[cut + len(EVENT_END) :]
        self._pending = rest if len(rest) <= MAX_PENDING else b""
        return chunk

    def last_event(self) -> bytes:
        """The data of the last complete `data: {...}` event seen (b"" if none)."""
        if self._pending:  # a final event without its blank line still counts
            last = last_data_event(self._pending)
            if last:
                return last
        return self._last


def last_data_event(events: bytes) -> bytes:
    """The data of the last `data: {...}` event in `events` (`[DONE]` and comments skipped)."""
    for event in reversed(events.split(EVENT_END)):
        line = event.strip()
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data.startswith(b"{"):
                return data
    return b""


def token_counts(reply: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prompt, cached, completion) tokens from `meta_info` or OpenAI `usage`, if reported."""
    meta = reply.get("meta_info")
    if isinstance(meta, dict) and isinstance(meta.get("cached_tokens"), int):
        return (
            int(meta.get("prompt_tokens", 0)),
            meta["cached_tokens"],
            int(meta.get("completion_tokens", 0)),
        )
    usage = reply.get("usage")
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            return (
                int(usage.get("prompt_tokens", 0)),
                details["cached_tokens"],
                int(usage.get("completion_tokens", 0)),
            )
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
