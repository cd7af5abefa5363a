"""Benchmark workloads (pure, seeded: same configuration and seed, same requests) and the oracle.

A workload is a list of `Script`s, each arriving at an offset `at` (seconds from the start).
A script is one conversation: a fixed `history` (a system prompt, or a trace's earlier messages)
and one or more `Turn`s sent one after another; turn k's prompt is the history, then every
earlier question with the answer the server actually returned, then question k. The load
(`load.Load`) fills in the answers, so a generator yields scripts, not finished prompts.

- shared-prefix (SGLang's generated-shared-prefix): `num_groups` random system prompts of
  `system_prompt_len` tokens; `prompts_per_group` questions of `question_len` tokens each
  (uniform), or groups drawn from a Zipf law (weight of rank k: k^-s); shuffled.
- multi-turn (SGLang's long-prompt multi-turn): `num_conversations` scripts, each with its own
  system prompt and `turns` questions; answers of `answer_len` tokens.
- random: bare prompts of `input_len` random tokens, nothing shared (but chance).
- trace: JSONL lines `{"timestamp": s, "prompt": str | "messages": [...], "max_tokens": n}`,
  replayed at their timestamps (relative to the first, divided by `trace_speed`).

Arrivals: all at offset 0, or a Poisson process (exponential gaps of mean 1/rate), drawn after
the text from the same generator. Text: words of a fixed made-up vocabulary (two syllables each,
so one token per word on a word-level tokenizer); with a tokenizer (`Codec`), as many words as
needed, cut to exactly n of its tokens.

Text routes (`/generate`, `/v1/completions`) get a conversation rendered by `render_text`:
the system prompt, then `User: ...` and `Assistant:<answer>` lines, ending with `Assistant:`, so
each turn's prompt is a prefix of the next turn's (as with a real chat template).

The oracle hit rate is the share of prompt tokens that repeat a prefix of something sent
before: per request, the longest prefix it shares with any earlier prompt + its answer (what a
worker holding everything would have cached), capped at prompt length - 1 as SGLang reports it,
over all prompt tokens. No router can beat it with the same requests in the same order; it is
computed over what was actually sent (multi-turn answers are known only then) with `PrefixTrie`,
a radix trie that stores edges as tuples and compares them a slice at a time.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sglang_dp.bench.config import RANDOM_NUM_REQUESTS, BenchConfig

Message = tuple[str, str]  # (role, content)


def _vocabulary() -> tuple[str, ...]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    return tuple(a + b for a, b in itertools.product(syllables, repeat=2))


VOCABULARY = _vocabulary()  # 4,900 made-up words; immutable
_WORD = re.compile(r"\w+|[^\w\s]")  # the simulated worker's word-level tokenizer


class WorkloadError(ValueError):
    """A workload cannot be built as asked (a malformed trace line, say); the message says why."""


class Codec(Protocol):
    """What the generators need from a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Turn:
    """One request of a script: the user's message and how many tokens to generate."""

    content: str
    max_tokens: int


@dataclass(frozen=True)
class Script:
    """A conversation arriving `at` seconds after the start (see the module docstring)."""

    at: float
    turns: tuple[Turn, ...]
    history: tuple[Message, ...] = ()
    raw: bool = False  # one bare prompt: text routes send turns[0].content unchanged

    @property
    def requests(self) -> int:
        return len(self.turns)


# ------------------------------------------------------------------- text


def make_text(rng: random.Random, tokens: int, codec: Codec | None = None) -> str:
    """Random words, `tokens` long: words when there is no codec, else that codec's tokens."""
    if tokens <= 0:
        return ""
    if codec is None:
        return " ".join(rng.choices(VOCABULARY, k=tokens))
    ids: list[int] = []
    while len(ids) < tokens:  # a word is at least one token, so this loop rarely repeats
        ids += codec.encode(" " + " ".join(rng.choices(VOCABULARY, k=tokens - len(ids))))
    return codec.decode(ids[:tokens])


def messages_for(script: Script, turn: int, answers: Sequence[str]) -> list[Message]:
    """The messages of request `turn` of `script`, given the answers to the earlier turns."""
    out = list(script.history)
    for question, answer in zip(script.turns[:turn], answers):
        out += [("user", question.content), ("assistant", answer)]
    out.append(("user", script.turns[turn].content))
    return out


def render_text(messages: Sequence[Message]) -> str:
    """A conversation as one text prompt (see the module docstring)."""
    parts = []
    for role, content in messages:
        if role == "system":
            parts.append(content + "\n")
        elif role == "assistant":
            parts.append("Assistant:" + content + "\n")  # exactly what followed "Assistant:"
        else:
            parts.append(f"{role.capitalize()}: {content}\n")
    parts.append("Assistant:")
    return "".join(parts)


def prompt_text(script: Script, turn: int, answers: Sequence[str]) -> str:
    """The text prompt of request `turn` (text routes, and the oracle)."""
    if script.raw:
        return script.turns[0].content
    return render_text(messages_for(script, turn, answers))


def word_tokens(text: str) -> list[str]:
    """Tokens as the simulated worker's word-level tokenizer splits them."""
    # Most words are plain: split on whitespace in C, and run the regex only on the others
    # (about 5x faster than the regex alone on 2,000-word prompts).
    out: list[str] = []
    for word in text.split():
        if word.isalnum():
            out.append(word)
        else:
            out += _WORD.findall(word)
    return out


# ------------------------------------------------------------------- generators


def shared_prefix(
    rng: random.Random,
    *,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    distribution: str = "uniform",
    zipf_s: float = 1.0,
    codec: Codec | None = None,
) -> list[Script]:
    """SGLang's generated-shared-prefix workload, shuffled (all scripts at offset 0)."""
    systems = [make_text(rng, system_prompt_len, codec) for _ in range(num_groups)]
    total = num_groups * prompts_per_group
    if distribution == "zipf":
        weights = [1.0 / (rank**zipf_s) for rank in range(1, num_groups + 1)]
        groups = rng.choices(range(num_groups), weights=weights, k=total)
    else:
        groups = [g for g in range(num_groups) for _ in range(prompts_per_group)]
        rng.shuffle(groups)
    scripts = []
    for g in groups:
        history = (("system", systems[g]),) if system_prompt_len else ()
        turn = Turn(make_text(rng, question_len, codec), output_len)
        scripts.append(Script(0.0, (turn,), history))
    return scripts


def multi_turn(
    rng: random.Random,
    *,
    num_conversations: int,
    turns: int,
    system_prompt_len: int,
    question_len: int,
    answer_len: int,
    codec: Codec | None = None,
) -> list[Script]:
    """SGLang's long-prompt multi-turn workload: one script per conversation."""
    scripts = []
    for _ in range(num_conversations):
        history = (("system", make_text(rng, system_prompt_len, codec)),)
        questions = tuple(
            Turn(make_text(rng, question_len, codec), answer_len) for _ in range(turns)
        )
        scripts.append(Script(0.0, questions, history if system_prompt_len else ()))
    return scripts


def random_prompts(
    rng: random.Random, *, count: int, input_len: int, output_len: int, codec: Codec | None = None
) -> list[Script]:
    """Bare prompts with no shared prefix (beyond chance)."""
    return [
        Script(0.0, (Turn(make_text(rng, input_len, codec), output_len),), raw=True)
        for _ in range(count)
    ]


def parse_trace(
    lines: Iterable[str], *, default_max_tokens: int, speed: float = 1.0
) -> list[Script]:
    """Scripts from JSONL trace lines (blank lines skipped), ordered by timestamp."""
    entries: list[tuple[float, Script]] = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            entries.append(_trace_entry(number, line, default_max_tokens))
    if not entries:
        raise WorkloadError("the trace has no requests")
    start = min(ts for ts, _ in entries)
    scripts = [Script((ts - start) / speed, s.turns, s.history, s.raw) for ts, s in entries]
    return sorted(scripts, key=lambda s: s.at)


def _trace_entry(number: int, line: str, default_max_tokens: int) -> tuple[float, Script]:
    where = f"trace line {number}"
    try:
        entry = json.loads(line)
    except ValueError:
        raise WorkloadError(f"{where}: not valid JSON") from None
    if not isinstance(entry, dict):
        raise WorkloadError(f"{where}: must be a JSON object")
    ts = entry.get("timestamp", 0.0)
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise WorkloadError(f"{where}: timestamp must be a number of seconds")
    max_tokens = entry.get("max_tokens", default_max_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise WorkloadError(f"{where}: max_tokens must be a positive integer")
    prompt, messages = entry.get("prompt"), entry.get("messages")
    if isinstance(prompt, str) and messages is None:
        return float(ts), Script(0.0, (Turn(prompt, max_tokens),), raw=True)
    if prompt is None and isinstance(messages, list) and messages:
        history = tuple(_trace_message(where, m) for m in messages)
        role, content = history[-1]
        if role != "user":
            raise WorkloadError(f"{where}: the last message must be the user's")
        return float(ts), Script(0.0, (Turn(content, max_tokens),), history[:-1])
    raise WorkloadError(f"{where}: give either a prompt string or a non-empty messages list")


def _trace_message(where: str, message: Any) -> Message:
    if (
        not isinstance(message, dict)
        or not isinstance(message.get("role"), str)
        or not isinstance(message.get("content"), str)
    ):
        raise WorkloadError(f"{where}: each message needs a string role and string content")
    return message["role"], message["content"]


def poisson_offsets(rng: random.Random, count: int, rate: float) -> list[float]:
    """Arrival offsets of a Poisson process of `rate` per second (the first one after a gap)."""
    return list(itertools.accumulate(rng.expovariate(rate) for _ in range(count)))


def build_workload(
    config: BenchConfig, codec: Codec | None = None, trace_lines: Iterable[str] = ()
) -> list[Script]:
    """The scripts `config` asks for (trace lines are read by the caller)."""
    rng = random.Random(config.seed)
    scripts = _scripts(config, rng, codec, trace_lines)
    if config.request_rate is not None and config.request_rate != float("inf"):
        offsets = poisson_offsets(rng, len(scripts), config.request_rate)
        scripts = [Script(at, s.turns, s.history, s.raw) for at, s in zip(offsets, scripts)]
    return scripts


def _scripts(
    config: BenchConfig, rng: random.Random, codec: Codec | None, trace_lines: Iterable[str]
) -> list[Script]:
    if config.workload == "shared-prefix":
        return shared_prefix(
            rng,
            num_groups=config.num_groups,
            prompts_per_group=config.prompts_per_group,
            system_prompt_len=config.system_prompt_len,
            question_len=config.question_tokens,
            output_len=config.output_len,
            distribution=config.group_distribution,
            zipf_s=config.zipf_s,
            codec=codec,
        )
    if config.workload == "multi-turn":
        return multi_turn(
            rng,
            num_conversations=config.num_conversations,
            turns=config.turns,
            system_prompt_len=config.system_prompt_len,
            question_len=config.question_tokens,
            answer_len=config.answer_len,
            codec=codec,
        )
    if config.workload == "random":
        count = config.num_requests or RANDOM_NUM_REQUESTS
        return random_prompts(
            rng, count=count, input_len=config.input_len, output_len=config.output_len, codec=codec
        )
    return parse_trace(trace_lines, default_max_tokens=config.output_len, speed=config.trace_speed)


def planned_requests(scripts: Sequence[Script], limit: int | None) -> int:
    """How many requests a run of `scripts` sends if nothing fails, at most `limit`."""
    total = sum(s.requests for s in scripts)
    return total if limit is None else min(total, limit)


# ------------------------------------------------------------------- the oracle


class _Node:
    __slots__ = ("children", "label")

    def __init__(self, label: tuple[Hashable, ...]) -> None:
        self.label = label
        self.children: dict[Hashable, _Node] = {}


def _common_length(label: tuple[Hashable, ...], seq: tuple[Hashable, ...], start: int) -> int:
    """Length of the common prefix of `label` and `seq[start:]`."""
    limit = min(len(label), len(seq) - start)
    k, step = 0, 64
    # Slice comparisons run in C: whole blocks first, then token by token inside the last one.
    while k + step <= limit and label[k : k + step] == seq[start + k : start + k + step]:
        k += step
    while k < limit and label[k] == seq[start + k]:
        k += 1
    return k


class PrefixTrie:
    """Every sequence inserted so far, as a radix trie (edges are tuples of tokens).

        insert(a b c d), then insert(a b x):    root ─ (a b) ┬ (c d)
                                                              └ (x)

    The second insert returns 2: its first two tokens were there already.
    """

    def __init__(self) -> None:
        self._root = _Node(())

    def insert(self, tokens: Sequence[Hashable]) -> int:
        """Insert `tokens`; return the length of the longest prefix that was already there."""
        seq = tuple(tokens)
        node, i = self._root, 0
        while i < len(seq):
            child = node.children.get(seq[i])
            if child is None:
                node.children[seq[i]] = _Node(seq[i:])
                return i
            k = _common_length(child.label, seq, i)
            if k < len(child.label):
                middle = _Node(child.label[:k])
                child.label = child.label[k:]
                middle.children[child.label[0]] = child
                node.children[seq[i]] = middle
                if i + k < len(seq):
                    middle.children[seq[i + k]] = _Node(seq[i + k :])
                return i + k
            node, i = child, i + k
        return i


@dataclass(frozen=True)
class OracleRate:
    hit_tokens: int
    prompt_tokens: int

    @property
    def rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def oracle_rate(sent: Iterable[tuple[Sequence[Hashable], Sequence[Hashable]]]) -> OracleRate:
    """The oracle over (prompt tokens, answer tokens) pairs in the order they were sent."""
    trie = PrefixTrie()
    hits = total = 0
    for prompt, answer in sent:
        matched = trie.insert([*prompt, *answer])
        hits += max(0, min(matched, len(prompt) - 1))
        total += len(prompt)
    return OracleRate(hits, total)
