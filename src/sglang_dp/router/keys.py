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

import re
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from sglang_dp.router.tree import Key

GENERATE = "/generate"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
INFERENCE_PATHS = (GENERATE, COMPLETIONS, CHAT)

# Kinds of key: what one key element stands for differs between them.
KIND_CHAT = 0  # a rendered conversation
KIND_TEXT = 1  # a prompt's text
KIND_IDS = 2  # token ids given by the client
KINDS = ("chat", "text", "ids")

MAX_TOKEN_ID = 2**32 - 1  # token keys are stored as array('I')
ASSISTANT_HEADER = "<|assistant|>\n"


class Encoder(Protocol):
    """A tokenizer as token-level routing needs it (`HFEncoder` wraps a Hugging Face one)."""

    def encode(self, text: str, special: bool) -> Sequence[int]:
        """Token ids of `text`; `special`: with the special tokens SGLang adds (BOS)."""
        ...

    def render_chat(self, messages: list[dict[str, Any]]) -> str | None:
        """The conversation through the model's chat template with the generation prompt, or
        None if the tokenizer has no template."""
        ...


class HFEncoder:
    """An `Encoder` over a Hugging Face tokenizer (loaded by the shell from a local folder).

    It remembers what it encoded: a tokenizer encodes the text between its added tokens
    (`<|start_header_id|>`, `<|eot_id|>`, ...) piece by piece, so a conversation rendered
    through a chat template is encoded message by message, and the pieces a new turn shares
    with the last one (the system prompt, the history; the prompt again when its key is
    extended by the answer) come from a memo. The memo holds pieces of at least `MIN_PIECE`
    characters, `MEMO_CHARS` characters of them at most (their ids as `array('I')`: about
    2 bytes per character of ASCII text in all), and forgets the least recently used first, so
    a system prompt every request shares is never the one evicted. The pieces it lacks are
    encoded in one call of the Rust tokenizer, which releases the GIL while it works. The
    first `SELF_CHECKS` encodings are also made whole and compared: on any difference (a
    tokenizer whose added tokens strip the spaces around them) it encodes whole from then on.

    Thread-safe: the router's encoding pool (`router/encoding.py`) calls it from several
    threads. The memo and the count of checks left change under one lock (never two threads
    evicting the same piece); giving up on pieces is one attribute write, each call reads it
    once; every encoding made while checks are left is checked (a check is never skipped
    because another thread took the last one).
    """

    MEMO_CHARS = 1 << 24
    MIN_PIECE = 64  # shorter pieces are encoded again: cheaper than remembering them
    SELF_CHECKS = 16

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._templated = bool(getattr(tokenizer, "chat_template", None))
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # A fast tokenizer that truncates or pads is reconfigured on every `encode`, and two
            # threads reconfiguring it at once collide ("Already borrowed"): ours never does.
            if backend.truncation is not None:
                backend.no_truncation()
            if backend.padding is not None:
                backend.no_padding()
        self._backend = backend
        added: dict[str, int] = dict(tokenizer.get_added_vocab())
        self._added = added
        names = sorted(added, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        bare = list(tokenizer.encode("x", add_special_tokens=False))
        framed = list(tokenizer.encode("x", add_special_tokens=True))
        at = _find(framed, bare)
        self._frame = (
            (array("I", framed[:at]), array("I", framed[at + len(bare) :])) if at >= 0 else None
        )
        self._memo: dict[str, array[int]] = {}  # piece -> its ids, least recently used first
        self._memo_chars = 0
        self._lock = threading.Lock()
        self._checks = self.SELF_CHECKS
        self.encoded_chars = 0  # characters given to the tokenizer so far (memo misses)

    def encode(self, text: str, special: bool) -> Sequence[int]:
        splitter, frame = self._splitter, self._frame
        if splitter is None or frame is None:
            return self._whole(text, special)
        ids = self._by_pieces(splitter, text)
        if special:
            head, tail = frame
            ids = head + ids + tail
        if self._splitter is not splitter:  # another thread's check gave up on pieces meanwhile
            return self._whole(text, special)
        if self._checks > 0:
            whole = self._whole(text, special)
            with self._lock:
                if ids != array("I", whole):
                    self._splitter = None  # this tokenizer does not split that way
                    self._checks = 0
                    return whole
                self._checks = max(0, self._checks - 1)
        return ids

    def _whole(self, text: str, special: bool) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=special)
        return ids

    def _by_pieces(self, splitter: re.Pattern[str], text: str) -> array[int]:
        parts: list[Sequence[int] | str] = []
        missing: list[str] = []
        added, memo = self._added, self._memo
        with self._lock:
            for piece in splitter.split(text):
                if not piece:
                    continue
                token = added.get(piece)
                if token is not None:
                    parts.append((token,))
                    continue
                found = memo.pop(piece, None)
                if found is None:
                    missing.append(piece)
                    parts.append(piece)
                else:
                    memo[piece] = found  # now the most recently used
                    parts.append(found)
        if missing:
            encoded = self._encode_pieces(missing)
            self._remember(missing, encoded)
            fresh = iter(encoded)
            parts = [next(fresh) if isinstance(p, str) else p for p in parts]
        ids = array("I")
        for part in parts:
            assert not isinstance(part, str)
            ids.extend(part)
        return ids

    def _encode_pieces(self, pieces: list[str]) -> list[array[int]]:
        """The ids of each piece without special tokens, in one call of a fast tokenizer."""
        if self._backend is not None:
            batch = self._backend.encode_batch(pieces, add_special_tokens=False)
            return [array("I", encoding.ids) for encoding in batch]
        return [array("I", self._whole(piece, False)) for piece in pieces]

    def _remember(self, pieces: list[str], encoded: list[array[int]]) -> None:
        memo = self._memo
        with self._lock:
            self.encoded_chars += sum(map(len, pieces))
            for piece, ids in zip(pieces, encoded, strict=True):
                if self.MIN_PIECE <= len(piece) <= self.MEMO_CHARS and piece not in memo:
                    memo[piece] = ids
                    self._memo_chars += len(piece)
            while self._memo_chars > self.MEMO_CHARS:
                oldest = next(iter(memo))
                self._memo_chars -= len(oldest)
                del memo[oldest]

    def render_chat(self, messages: list[dict[str, Any]]) -> str | None:
        if not self._templated:
            return None
        try:
            text = self._tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # a template may reject a conversation (roles out of order)
            raise InvalidRequest(f"the chat template rejects these messages: {exc}") from None
        return str(text)


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


def chat_message(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}\n"


def chat_text(body: dict[str, Any], encode: Encoder | None = None) -> str:
    """The conversation as the worker renders it (see the module docstring)."""
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
    if encode is not None:
        rendered = encode.render_chat(messages)
        if rendered is not None:
            return rendered
    return "".join(parts) + ASSISTANT_HEADER


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


def _find(haystack: list[int], needle: list[int]) -> int:
    for at in range(len(haystack) - len(needle) + 1):
        if haystack[at : at + len(needle)] == needle:
            return at
    return -1


def _is_ids(values: list[Any]) -> bool:
    """Token ids: non-empty, all integers in array('I')'s range."""
    if not values or not all(type(v) is int for v in values):
        return False
    if min(values) < 0 or max(values) > MAX_TOKEN_ID:
        raise InvalidRequest(f"token ids must be integers from 0 to {MAX_TOKEN_ID}")
    return True


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), f"a {type(value).__name__}")
