"""Routing keys: what part of an inference request decides where it goes (pure).

A request body is validated and reduced to a `Routed` record: its kind, whether it streams, and
its routing key —
- `/v1/chat/completions`: the WHOLE conversation, every message in order with its role
  (`<|role|>\\ncontent\\n` each), so that turn N+1 extends turn N's key (sgl-router routed chat on
  the first message only and lost a third of its hit rate);
- `/v1/completions`: the prompt; `/generate`: the text, or the token ids.
A batch (a list of prompts) is routed by its first prompt: it goes to one worker as a whole.

Character keys are strings; with a tokenizer (token-level routing) text is encoded to a tuple of
token ids and `input_ids` are used as they are. The key extended by the generated output (what
the worker caches after answering) is built by `extend_key` in the same format, so the next turn
of a conversation matches it.

Bad input raises `InvalidRequest` with a message naming the field and the problem.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from sglang_dp.router.tree import Key

GENERATE = "/generate"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
INFERENCE_PATHS = (GENERATE, COMPLETIONS, CHAT)

Encoder = Callable[[str], Sequence[int]]


class InvalidRequest(ValueError):
    """The request body is not a valid inference request; the message says why."""


@dataclass(frozen=True, slots=True)
class Routed:
    path: str
    body: dict[str, Any]
    key: Key
    stream: bool
    batch: bool  # a list of prompts: the answer is a list


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body."""
    if not raw.strip():
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not {_kind(body)}")
    return body


def route_request(path: str, raw: bytes, encode: Encoder | None = None) -> Routed:
    """Validate an inference request and compute its routing key."""
    body = parse_body(raw)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest(f"'stream' must be true or false, not {_kind(stream)}")
    text: str | list[int]
    if path == CHAT:
        text, batch = chat_text(body), False
    elif path == COMPLETIONS:
        text, batch = _prompt(body, "prompt")
    elif path == GENERATE:
        text, batch = _generate_input(body)
    else:
        raise InvalidRequest(f"{path} is not an inference route")
    return Routed(path, body, _to_key(text, encode), stream, batch)


def chat_message(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}\n"


def chat_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of messages")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object, not {_kind(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"messages[{i}].role must be a non-empty string")
        parts.append(chat_message(role, _content_text(message.get("content"), i)))
    return "".join(parts)


def extend_key(routed: Routed, output: str, encode: Encoder | None = None) -> Key:
    """The key extended by the generated output, as the worker now caches it."""
    addition = chat_message("assistant", output) if routed.path == CHAT else output
    if isinstance(routed.key, str):
        return routed.key + addition
    if encode is None:  # token ids without a tokenizer: the output cannot be encoded
        return routed.key
    return routed.key + tuple(encode(addition))


def _content_text(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise InvalidRequest(f"messages[{index}].content parts must be objects")
            if part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:  # images etc.: their reference still distinguishes prompts
                texts.append(orjson.dumps(part).decode())
        return "".join(texts)
    raise InvalidRequest(
        f"messages[{index}].content must be a string or a list of parts, not {_kind(content)}"
    )


def _prompt(body: dict[str, Any], field: str) -> tuple[str | list[int], bool]:
    if field not in body:
        raise InvalidRequest(f"'{field}' is required")
    prompt = body[field]
    if isinstance(prompt, str):
        return prompt, False
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return prompt[0], len(prompt) > 1
        if _is_ids(prompt):
            return prompt, False
        if all(isinstance(p, list) and _is_ids(p) for p in prompt):
            return prompt[0], len(prompt) > 1
    raise InvalidRequest(
        f"'{field}' must be a string, a list of strings or a list of token ids, not {_kind(prompt)}"
    )


def _generate_input(body: dict[str, Any]) -> tuple[str | list[int], bool]:
    has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
    if has_text == has_ids:
        raise InvalidRequest("exactly one of 'text' and 'input_ids' is required")
    params = body.get("sampling_params", {})
    if not isinstance(params, dict | list):
        raise InvalidRequest(f"'sampling_params' must be an object, not {_kind(params)}")
    text, batch = _prompt(body, "text" if has_text else "input_ids")
    if has_ids and isinstance(text, str):
        raise InvalidRequest("'input_ids' must be a list of token ids (integers)")
    if has_text and not isinstance(text, str):
        raise InvalidRequest("'text' must be a string or a list of strings")
    return text, batch


def _to_key(text: str | list[int], encode: Encoder | None) -> Key:
    if isinstance(text, str):
        return tuple(encode(text)) if encode is not None else text
    if encode is None:  # character routing of token ids: sgl-router's decimal strings
        return " ".join(map(str, text))
    return tuple(text)


def _is_ids(values: list[Any]) -> bool:
    return bool(values) and all(type(v) is int for v in values)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), f"a {type(value).__name__}")
