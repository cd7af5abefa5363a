"""Routing keys: what part of an inference request decides where it goes (pure).

A request body is validated and reduced to a `Routed` record: its kind, whether it streams, the
body to forward, and its routing key —
- `/v1/chat/completions`: the WHOLE conversation rendered as the worker renders it, generation
  prompt included, so that turn N+1's key extends turn N's key followed by its answer
  (sgl-router routed chat on the first message only and lost a third of its hit rate). With a
  tokenizer that has a chat template, the template (`apply_chat_template`, as SGLang does);
  otherwise the simulator's built-in one (`<|role|>\\ncontent\\n` per message, then
  `<|assistant|>\\n`);
- `/v1/completions`: the prompt; `/generate`: the text, or the token ids.
A batch (a list of prompts) is routed by its first prompt: it goes to one worker as a whole.

Three kinds of key (`CHAT`, `TEXT`, `IDS`), because a character of each stands for a different
number of tokens and the engine keeps one estimate per kind. Character keys are strings, token
ids included (`input_ids` as sgl-router renders them: decimal numbers joined by spaces); with an
`Encoder` (token-level routing, `--tokenizer-path`) every key is an `array('I')` of token ids:
text encoded as SGLang encodes it (special tokens included), chat through the chat template.

`extend_key` builds what the worker caches once it has answered — the prompt followed by the
output minus its last token, which SGLang never caches — in the key's own format, so the next
turn of a conversation matches it: characters are extended by text, token keys by encoding
prompt and output as ONE sequence (`encode(p) + encode(o)` is not `encode(p + o)`), and `IDS`
keys only by the worker's `output_ids`, never by text.

OpenAI streams report usage only when asked (`stream_options.include_usage`). When the client
did not ask, `route_request` asks for it in the forwarded body and sets `strip_usage`, so the
stream tap (`router/answers.py`) removes the usage chunk from what the client receives.

Bad input raises `InvalidRequest` with a message naming the field and the problem.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from sglang_dp.router.tree import Key
from sglang_dp.sglang_api import (
    CHAT,
    COMPLETIONS,
    GENERATE,
    ChatError,
    chat_prompt,
)
from sglang_dp.sglang_api import json_kind as _kind

# Kinds of key: what one key element stands for differs between them.
KIND_CHAT = 0  # a rendered conversation
KIND_TEXT = 1  # a prompt's text
KIND_IDS = 2  # token ids given by the client
KINDS = ("chat", "text", "ids")

MAX_TOKEN_ID = 2**32 - 1  # token keys are stored as array('I')


class Encoder(Protocol):
    """A tokenizer as token-level routing needs it (`sglang_dp.tokenizer.HFEncoder` wraps a
    Hugging Face one)."""

    def encode(self, text: str, special: bool) -> Sequence[int]:
        """Token ids of `text`; `special`: with the special tokens SGLang adds (BOS)."""
        ...

    def render_chat(self, messages: list[dict[str, Any]]) -> str | None:
        """The conversation through the model's chat template with the generation prompt, or
        None if the tokenizer has no template; `ChatError` if the template rejects it."""
        ...


class InvalidRequest(ValueError):
    """The request body is not a valid inference request; the message says why."""


@dataclass(frozen=True, slots=True)
class Routed:
    path: str
    body: dict[str, Any]
    key: Key
    stream: bool
    batch: bool  # a list of prompts: the answer is a list
    kind: int = KIND_TEXT
    forward: bytes = b""  # the body to send to the worker (the client's, or rewritten)
    strip_usage: bool = False  # the router asked for usage the client did not: remove it
    text: str | None = None  # the text the key was made from (to encode it with the output)


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
    kind = KIND_TEXT
    if path == CHAT:
        text, batch, kind = chat_text(body, encode), False, KIND_CHAT
    elif path == COMPLETIONS:
        text, batch = _prompt(body, "prompt")
    elif path == GENERATE:
        text, batch = _generate_input(body)
    else:
        raise InvalidRequest(f"{path} is not an inference route")
    if not isinstance(text, str):
        kind = KIND_IDS
    forward, strip = raw, False
    if stream and path != GENERATE and not _asks_usage(body):
        forward, strip = _with_usage(body), True
    key = _to_key(text, encode, special=kind == KIND_TEXT)
    source = text if isinstance(text, str) else None
    return Routed(path, body, key, stream, batch, kind, forward, strip, source)


def chat_text(body: dict[str, Any], encode: Encoder | None = None) -> str:
    """The conversation as the worker renders it (see the module docstring)."""
    try:
        builtin = chat_prompt(
            body.get("messages")
        )  # validates the messages whichever template renders
    except ChatError as exc:
        raise InvalidRequest(str(exc)) from None
    if encode is not None:
        try:
            rendered = encode.render_chat(body["messages"])  # a list of objects by now
        except ChatError as exc:
            raise InvalidRequest(str(exc)) from None
        if rendered is not None:
            return rendered
    return builtin


def extend_key(
    routed: Routed,
    output: str | None,
    output_ids: Sequence[int] | None = None,
    encode: Encoder | None = None,
) -> Key | None:
    """What the worker caches after answering: the prompt and the output but its last token
    (see the module docstring); None when the output cannot be put in the key's format."""
    key = routed.key
    if routed.kind == KIND_IDS:
        if not output_ids:
            return None
        kept = list(output_ids)[:-1]
        if isinstance(key, str):
            return key + "".join([" " + str(i) for i in kept])
        return _concat_ids(key, kept)
    if output is None:
        return None
    if isinstance(key, str):
        return key + without_last_token(output)
    if encode is None or routed.text is None:
        return None
    ids = encode.encode(routed.text + output, routed.kind == KIND_TEXT)
    return _token_key(ids[:-1]) if len(ids) > len(key) else None


def without_last_token(text: str) -> str:
    """`text` without (an estimate of) its last token: from its last space on, as the last
    word of a BPE vocabulary carries its leading space; a few characters if it has none."""
    cut = text.rfind(" ")
    if cut < 0 or len(text) - cut > 16:
        return text[: max(0, len(text) - 4)]
    return text[:cut]


def _asks_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _with_usage(body: dict[str, Any]) -> bytes:
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest(f"'stream_options' must be an object, not {_kind(options)}")
    rewritten = dict(body)
    rewritten["stream_options"] = {**(options or {}), "include_usage": True}
    return orjson.dumps(rewritten)


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


def _to_key(text: str | list[int], encode: Encoder | None, special: bool) -> Key:
    if isinstance(text, str):
        return _token_key(encode.encode(text, special)) if encode is not None else text
    if encode is None:  # character routing of token ids: sgl-router's decimal strings
        return " ".join(map(str, text))
    return _token_key(text)


def _token_key(ids: Sequence[int]) -> Key:
    return array("I", ids)


def _concat_ids(key: Key, ids: list[int]) -> Key:
    assert not isinstance(key, str)
    extended = array("I", key)
    extended.extend(ids)
    return extended


def _is_ids(values: list[Any]) -> bool:
    """Token ids: non-empty, all integers in array('I')'s range."""
    if not values or not all(type(v) is int for v in values):
        return False
    if min(values) < 0 or max(values) > MAX_TOKEN_ID:
        raise InvalidRequest(f"token ids must be integers from 0 to {MAX_TOKEN_ID}")
    return True
