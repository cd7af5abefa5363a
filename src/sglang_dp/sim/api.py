"""Request parsing and response shapes of SGLang's generation routes (pure, no I/O).

- `/generate`: `text` (str or list) or `input_ids` (list or list of lists), `sampling_params`
  (dict, or one per input), `stream`, `rid`. Response `{"text", "output_ids", "meta_info":
  {...}}`, a list for list inputs; streamed events carry the CUMULATIVE text and ids (SGLang's
  default, without --incremental-streaming-output).
- `/v1/completions`, `/v1/chat/completions`: OpenAI shapes; streamed chunks carry deltas.
  Chat prompts use the built-in template of `sglang_dp.sglang_api` (the one the router keys
  chats with: one `<|role|>\\ncontent\\n` block per message and an `<|assistant|>\\n` header,
  so a conversation's prompt is a prefix of its next turn's; non-text content parts as their
  JSON); a `--tokenizer-path` tokenizer that has a chat template renders them instead
  (`Tokenizer.encode_chat`, given `ApiRequest.messages`).

Anything malformed raises `BadRequest` (the shell answers 400 with a JSON error, `error_body`:
SGLang's shape); nothing here can raise anything else on user input.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

import orjson

from sglang_dp.sglang_api import ChatError, chat_prompt

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's sampling-params default
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's max_tokens default for completions
DEFAULT_CHAT_TOKENS = 128  # SGLang lets a chat run to EOS; the simulator has no EOS


class BadRequest(Exception):
    """Invalid request body; the message is shown to the client."""


@dataclass
class GenInput:
    """One prompt to generate from."""

    text: str | None
    input_ids: list[int] | None
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    rid: str | None = None


@dataclass
class ApiRequest:
    """A parsed generation request of any of the three routes."""

    kind: str  # "generate" | "completion" | "chat"
    inputs: list[GenInput]
    batched: bool  # list input: answer with a list / several choices
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    model: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat: the conversation


@dataclass
class Result:
    """One finished (or partial) generation, as the response builders need it."""

    rid: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: dict[str, Any] | None
    e2e_latency: float = 0.0
    output_ids: list[int] = field(default_factory=list)  # the generated ids so far


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_list(x: Any) -> bool:
    """A list of non-negative ints (checked in C: prompts can hold 100k ids)."""
    if not isinstance(x, list):
        return False
    try:
        array("Q", x)  # one C pass: rejects non-integers, negatives and overflows
    except (TypeError, OverflowError):
        return False
    return True


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _stops(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise BadRequest(f"{name} must be a string or a list of strings")


def _count(value: Any, name: str, default: int) -> int:
    if value is None:
        return default
    if not _is_int(value) or value < 0:
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(value)


def _check_sampling(params: dict[str, Any]) -> None:
    temperature = params.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
        raise BadRequest("temperature must be a non-negative number")
    top_p = params.get("top_p")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise BadRequest("top_p must be in (0, 1]")
    n = params.get("n")
    if n is not None and n != 1:
        raise BadRequest("n > 1 is not supported by the simulated worker")


def _sampling(params: Any, key: str, default: int) -> tuple[int, list[str], list[int]]:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest("sampling_params must be an object")
    _check_sampling(params)
    stop_ids = params.get("stop_token_ids") or []
    if not _int_list(stop_ids):
        raise BadRequest("stop_token_ids must be a list of token ids")
    return _count(params.get(key), key, default), _stops(params.get("stop"), "stop"), stop_ids


def _rids(value: Any, n: int) -> list[str | None]:
    if value is None:
        return [None] * n
    if isinstance(value, str) and n == 1:
        return [value]
    if isinstance(value, list) and len(value) == n and all(isinstance(r, str) for r in value):
        return list(value)
    raise BadRequest("rid must be a string, or a list with one string per input")


def parse_generate(body: Any) -> ApiRequest:
    """Parse a native `/generate` body."""
    body = _object(body)
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("give exactly one of text and input_ids")
    prompts: list[tuple[str | None, list[int] | None]]
    if isinstance(text, str):
        batched, prompts = False, [(text, None)]
    elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        batched, prompts = True, [(t, None) for t in text]
    elif text is not None:
        raise BadRequest("text must be a string or a non-empty list of strings")
    elif _int_list(ids) and ids:
        batched, prompts = False, [(None, ids)]
    elif isinstance(ids, list) and ids and all(_int_list(x) and x for x in ids):
        batched, prompts = True, [(None, x) for x in ids]
    else:
        raise BadRequest("input_ids must be a non-empty list of token ids, or a list of them")
    params = body.get("sampling_params")
    per_input = params if isinstance(params, list) else [params] * len(prompts)
    if len(per_input) != len(prompts):
        raise BadRequest("sampling_params list must have one entry per input")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean")
    if stream and batched:
        raise BadRequest("streaming a list of inputs is not supported by the simulated worker")
    inputs = []
    for (t, i), p, rid in zip(
        prompts, per_input, _rids(body.get("rid"), len(prompts)), strict=True
    ):
        max_new, stop, stop_ids = _sampling(p, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        inputs.append(GenInput(t, i, max_new, stop, stop_ids, rid))
    return ApiRequest("generate", inputs, batched, stream)


def _openai_common(body: dict[str, Any], kind: str, default_tokens: int) -> ApiRequest:
    _check_sampling(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise BadRequest("model must be a string")
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_new = _count(tokens, "max_tokens", default_tokens)
    stop = _stops(body.get("stop"), "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not _int_list(stop_ids):
        raise BadRequest("stop_token_ids must be a list of token ids")
    req = ApiRequest(kind, [], False, stream, bool(options.get("include_usage")), model=model)
    req.inputs.append(GenInput(None, None, max_new, stop, stop_ids))
    return req


def parse_completion(body: Any) -> ApiRequest:
    """Parse an OpenAI `/v1/completions` body."""
    body = _object(body)
    req = _openai_common(body, "completion", DEFAULT_COMPLETION_TOKENS)
    proto = req.inputs[0]
    prompt = body.get("prompt")
    prompts: list[tuple[str | None, list[int] | None]]
    if isinstance(prompt, str):
        prompts = [(prompt, None)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts, req.batched = [(p, None) for p in prompt], True
    elif _int_list(prompt) and prompt:
        prompts = [(None, prompt)]
    elif isinstance(prompt, list) and prompt and all(_int_list(p) and p for p in prompt):
        prompts, req.batched = [(None, p) for p in prompt], True
    else:
        raise BadRequest("prompt must be a string, a list of strings, or token ids")
    if req.stream and len(prompts) > 1:
        raise BadRequest("streaming several prompts is not supported by the simulated worker")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise BadRequest("echo must be a boolean")
    req.echo = echo
    req.inputs = [
        GenInput(t, i, proto.max_new_tokens, proto.stop, proto.stop_token_ids) for t, i in prompts
    ]
    return req


def render_chat(messages: Any) -> str:
    """The built-in chat template (`sglang_api.chat_prompt`: the router keys chats with it)."""
    try:
        return chat_prompt(messages)
    except ChatError as exc:
        raise BadRequest(str(exc)) from None


def parse_chat(body: Any) -> ApiRequest:
    """Parse an OpenAI `/v1/chat/completions` body."""
    body = _object(body)
    req = _openai_common(body, "chat", DEFAULT_CHAT_TOKENS)
    messages = body.get("messages")
    req.inputs[0].text = render_chat(messages)
    req.messages = messages
    return req


# ---------------------------------------------------------------- response shapes


def meta_info(r: Result) -> dict[str, Any]:
    """`meta_info` of a `/generate` answer."""
    return {
        "id": r.rid,
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens,
        "e2e_latency": r.e2e_latency,
    }


def generate_body(r: Result) -> dict[str, Any]:
    """One `/generate` answer (or streamed event: same shape, cumulative text and ids)."""
    return {"text": r.text, "output_ids": r.output_ids, "meta_info": meta_info(r)}


def openai_finish(reason: dict[str, Any] | None) -> str | None:
    """OpenAI's finish_reason string for SGLang's finish-reason object."""
    if reason is None:
        return None
    return (
        "length" if reason["type"] == "length" else "stop" if reason["type"] == "stop" else "abort"
    )


def usage(results: list[Result], cache_report: bool) -> dict[str, Any]:
    """OpenAI `usage`, with `prompt_tokens_details.cached_tokens` under --enable-cache-report."""
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cache_report:
        out["prompt_tokens_details"] = {"cached_tokens": sum(r.cached_tokens for r in results)}
    return out


def _choice(
    kind: str, index: int, text: str, reason: dict[str, Any] | None, delta: bool
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index}
    if kind == "chat":
        if delta:
            choice["delta"] = (
                {"content": text} if text or reason else {"role": "assistant", "content": ""}
            )
        else:
            choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    choice["finish_reason"] = openai_finish(reason)
    if reason and reason["type"] == "stop":
        choice["matched_stop"] = reason.get("matched")
    return choice


def openai_body(
    kind: str,
    oid: str,
    created: int,
    model: str,
    results: list[Result],
    texts: list[str],
    cache_report: bool,
) -> dict[str, Any]:
    """A complete (non-streamed) completion or chat completion."""
    return {
        "id": oid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [
            _choice(kind, i, t, r.finish_reason, False)
            for i, (r, t) in enumerate(zip(results, texts, strict=True))
        ],
        "usage": usage(results, cache_report),
    }


def openai_chunk(
    kind: str,
    oid: str,
    created: int,
    model: str,
    delta: str,
    reason: dict[str, Any] | None,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed chunk: a text delta, the role header (chat, first) or the finish."""
    choice = _choice(kind, 0, delta, reason, True)
    if kind == "chat" and first:
        choice["delta"] = {"role": "assistant", "content": delta}
    return {
        "id": oid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(
    kind: str, oid: str, created: int, model: str, r: Result, cache_report: bool
) -> dict[str, Any]:
    """The final chunk with usage (stream_options.include_usage)."""
    return {
        "id": oid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage([r], cache_report),
    }


def error_body(message: str, kind: str = "BadRequestError", code: int = 400) -> bytes:
    """The JSON error every 4xx/5xx carries."""
    return orjson.dumps(
        {
            "error": {"message": message, "type": kind, "code": code},
            "object": "error",
            "message": message,
            "code": code,
        }
    )
