"""The SGLang / OpenAI wire contract, written once (pure: no I/O, no clock).

What the router's keys and answers, the simulated worker's API and the benchmark's protocol
must all agree on:
- the inference paths: `GENERATE` (`/generate`), `COMPLETIONS` (`/v1/completions`), `CHAT`
  (`/v1/chat/completions`); `API_PATHS` names them as the benchmark's `--api` does;
- the built-in chat template, the simulator's stand-in for a model's: one `<|role|>\\ncontent\\n`
  block per message, then `ASSISTANT_HEADER` (`<|assistant|>\\n`), so a conversation's prompt is a
  prefix of its next turn's. `chat_prompt(messages)` validates and renders a conversation. A
  message's content is a string, null or a list of parts: text parts give their text; any
  other part (an image, audio) is rendered as its JSON. SGLang accepts such parts (multimodal
  models take them, the text template keeps them apart from the text), so the router must key
  them, and two prompts that differ only by their image must not share a key; the simulator
  renders them the same way, so its prompt is exactly the router's key;
- token counts: `meta_counts(meta_info)` / `usage_counts(usage)` give (prompt, cached,
  completion) as reported, each None when absent or not an integer (`cached` from
  `prompt_tokens_details.cached_tokens`, reported under `--enable-cache-report`);
- server-sent events: `sse(obj)` frames one event (`data: {json}` and a blank line, as SGLang
  writes them); `event_data(event)` is the data of one event (its `data:` lines joined).

Malformed chat input raises `ChatError` (a `ValueError`) naming the field; the router and the
simulator turn it into their own 400.
"""

from __future__ import annotations

from typing import Any

import orjson

GENERATE = "/generate"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
INFERENCE_PATHS = (GENERATE, COMPLETIONS, CHAT)
API_PATHS = {"generate": GENERATE, "completions": COMPLETIONS, "chat": CHAT}

ASSISTANT_HEADER = "<|assistant|>\n"
EVENT_END = b"\n\n"


class ChatError(ValueError):
    """A chat request's messages are malformed; the message names the field."""


def chat_message(role: str, content: str) -> str:
    """One message through the built-in template."""
    return f"<|{role}|>\n{content}\n"


def chat_prompt(messages: Any) -> str:
    """The conversation through the built-in template, generation prompt included."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list of messages")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"messages[{i}] must be an object, not {json_kind(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatError(f"messages[{i}].role must be a non-empty string")
        parts.append(chat_message(role, content_text(message.get("content"), i)))
    return "".join(parts) + ASSISTANT_HEADER


def content_text(content: Any, index: int) -> str:
    """The text of message `index`'s content (see the module docstring)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise ChatError(f"messages[{index}].content parts must be objects")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ChatError(f"messages[{index}].content: a text part needs a string text")
                texts.append(text)
            else:  # images etc.: their reference still distinguishes prompts
                texts.append(orjson.dumps(part).decode())
        return "".join(texts)
    raise ChatError(
        f"messages[{index}].content must be a string or a list of parts, not {json_kind(content)}"
    )


def meta_counts(meta: Any) -> tuple[int | None, int | None, int | None]:
    """(prompt, cached, completion) tokens of a `/generate` answer's `meta_info`."""
    if not isinstance(meta, dict):
        return None, None, None
    return (
        _int(meta.get("prompt_tokens")),
        _int(meta.get("cached_tokens")),
        _int(meta.get("completion_tokens")),
    )


def usage_counts(usage: Any) -> tuple[int | None, int | None, int | None]:
    """(prompt, cached, completion) tokens of an OpenAI `usage` object."""
    if not isinstance(usage, dict):
        return None, None, None
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    return _int(usage.get("prompt_tokens")), cached, _int(usage.get("completion_tokens"))


def sse(obj: Any) -> bytes:
    """One server-sent event."""
    return b"data: " + orjson.dumps(obj) + EVENT_END


def event_data(event: bytes) -> bytes:
    """The data of one SSE event (without its blank line): its `data:` lines, stripped and
    joined by newlines; empty for an event without data (a comment)."""
    single = event.strip()
    if b"\n" not in single:  # one line, as SGLang writes its events
        return single[5:].strip() if single.startswith(b"data:") else b""
    lines = [line.strip() for line in single.split(b"\n")]
    return b"\n".join([line[5:].strip() for line in lines if line.startswith(b"data:")])


def json_kind(value: Any) -> str:
    """What a JSON value is, for error messages ("a list", "null")."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), f"a {type(value).__name__}")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
