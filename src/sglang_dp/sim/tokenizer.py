"""Tokenizers of the simulated worker, and the deterministic output they "generate".

Two tokenizers with one interface (`Tokenizer`):

- `WordTokenizer` (default): one token per word or punctuation mark (regex `\\w+|[^\\w\\s]`); a
  word's id is a stable CRC-32 of the word, memoised in a dict, so encoding is one regex scan
  plus one C-level `map` over a dict — cheap enough for 2,000-token prompts at router load.
- `HFTokenizer`: a Hugging Face tokenizer loaded from a local folder (`--tokenizer-path`),
  encoding through `sglang_dp.tokenizer` as the router does (transformers imported only then).

`WordEncoder` is the word tokenizer as the router's `Encoder` (`--routing-key words`).

`OutputText` builds what a request generates: a fixed cycle of words, entered at an offset that
is a hash of the prompt's tail, so outputs are deterministic per prompt and seed. The cycle is
materialised once as one long string with a prefix sum of character offsets: the cumulative
text after k tokens is then a single string slice, whatever k is (streaming costs O(1) Python
work per event). Each output word is one token that re-encodes to the same id, so a client that
sends the answer back in the next turn gets a prefix-cache hit on it.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Protocol

from sglang_dp.sglang_api import ChatError
from sglang_dp.sim.api import BadRequest
from sglang_dp.tokenizer import HFEncoder, load_hf

_WORD = re.compile(r"\w+|[^\w\s]")
_MAX_MEMO = 1 << 20  # words remembered by the word tokenizer (bounded memory on random text)
_PIECE = 256  # characters per memoised piece of a prompt
_MAX_PIECES = 1 << 14  # memoised pieces (≈ 16 MiB of prompt text)

# Output vocabulary: common English words, each one token in word-level and BPE vocabularies.
OUTPUT_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "been",
    "has",
    "would",
    "when",
    "who",
    "will",
    "more",
    "no",
    "if",
    "out",
    "so",
    "said",
    "what",
    "up",
    "its",
    "about",
    "into",
    "than",
    "them",
    "can",
    "only",
    "other",
    "new",
    "some",
    "could",
    "time",
    "these",
    "two",
    "may",
    "then",
    "do",
    "first",
]


class Tokenizer(Protocol):
    """What the simulator needs from a tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt."""
        ...

    def encode_chat(self, messages: list[dict[str, Any]], rendered: str) -> list[int]:
        """Token ids of a chat prompt: the conversation through the tokenizer's own chat
        template if it has one, else `rendered` (the built-in template's text)."""
        ...

    def output_vocab(self) -> tuple[list[int], list[str]]:
        """Ids and text pieces of the output word cycle (`OUTPUT_WORDS`)."""
        ...


class _Memo(dict[str, int]):
    """word -> id, computing a missing id from a CRC-32 of the word."""

    def __missing__(self, word: str) -> int:
        token = zlib.crc32(word.encode()) & 0x7FFFFFFF
        if len(self) < _MAX_MEMO:
            self[word] = token
        return token


class WordTokenizer:
    """Built-in deterministic tokenizer: about one token per word or punctuation mark.

    Prompts at router load share long prefixes (system prompts, conversation history), so the
    text is cut into ~256-character pieces at spaces at fixed offsets, and each piece's ids are
    memoised: a shared prefix yields identical pieces, and only the new tail is scanned. Tokens
    never contain a space, so cutting there changes nothing.
    """

    def __init__(self) -> None:
        self._memo = _Memo()
        self._pieces: dict[str, list[int]] = {}

    def _scan(self, text: str) -> list[int]:
        return list(map(self._memo.__getitem__, _WORD.findall(text)))

    def encode(self, text: str) -> list[int]:
        """Ids of the words and punctuation marks of `text`, in order."""
        if len(text) <= _PIECE:
            return self._scan(text)
        ids: list[int] = []
        pieces = self._pieces
        start = 0
        while start < len(text):
            cut = text.find(" ", start + _PIECE)
            end = len(text) if cut < 0 else cut + 1
            piece = text[start:end]
            found = pieces.get(piece)
            if found is None:
                found = self._scan(piece)
                if len(pieces) >= _MAX_PIECES:
                    del pieces[next(iter(pieces))]  # oldest first
                pieces[piece] = found
            ids += found
            start = end
        return ids

    def encode_chat(self, messages: list[dict[str, Any]], rendered: str) -> list[int]:
        return self.encode(rendered)

    def output_vocab(self) -> tuple[list[int], list[str]]:
        """Ids and text pieces of the output words (each piece is a space and the word)."""
        return [self._memo[w] for w in OUTPUT_WORDS], [" " + w for w in OUTPUT_WORDS]


class WordEncoder:
    """The word tokenizer as the router's `keys.Encoder` (`--routing-key words`): the router
    keys prompts on the very token ids the workers cache and publish. The simulator adds no
    special tokens and renders chats with the built-in template, as `keys` does."""

    def __init__(self) -> None:
        self._tokenizer = WordTokenizer()

    def encode(self, text: str, special: bool) -> Sequence[int]:
        return self._tokenizer.encode(text)

    def render_chat(self, messages: list[dict[str, Any]]) -> str | None:
        return None


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder (never downloads), encoding as the router's
    `--tokenizer-path` encoder does (`sglang_dp.tokenizer.HFEncoder`)."""

    def __init__(self, path: str) -> None:
        self._tok: Any = load_hf(path)
        self._encoder = HFEncoder(self._tok)

    def encode(self, text: str) -> list[int]:
        """Ids as SGLang computes them (special tokens such as BOS included)."""
        return list(self._encoder.encode(text, True))

    def encode_chat(self, messages: list[dict[str, Any]], rendered: str) -> list[int]:
        """As SGLang's chat route: `apply_chat_template(tokenize=True)`, which adds no special
        tokens beyond the template's own (nor to the built-in template's text)."""
        try:
            templated = self._encoder.render_chat(messages)
        except ChatError as exc:  # a template may refuse a conversation (roles out of order)
            raise BadRequest(str(exc)) from None
        return list(self._encoder.encode(rendered if templated is None else templated, False))

    def output_vocab(self) -> tuple[list[int], list[str]]:
        """Output words that are one token with a leading space in this vocabulary."""
        ids: list[int] = []
        pieces: list[str] = []
        for word in OUTPUT_WORDS:
            encoded = self._tok.encode(" " + word, add_special_tokens=False)
            if len(encoded) == 1:
                ids.append(encoded[0])
                pieces.append(" " + word)
        if not ids:  # an unusual vocabulary: fall back to its first non-special tokens
            special = set(self._tok.all_special_ids)
            for token in range(self._tok.vocab_size):
                if token not in special:
                    ids.append(token)
                    pieces.append(self._tok.decode([token]))
                if len(ids) == len(OUTPUT_WORDS):
                    break
        return ids, pieces


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_folder(tokenizer_path: str | None, model_path: str | None) -> str | None:
    """Where to load a tokenizer from, as SGLang does (tokenizer path, else model path), but
    only local folders holding tokenizer files: the simulator never downloads."""
    for candidate in (tokenizer_path, model_path):
        if candidate and any((Path(candidate) / f).is_file() for f in TOKENIZER_FILES):
            return candidate
    return None


def load_tokenizer(path: str | None) -> Tokenizer:
    """The HF tokenizer in a local folder `path`, or the built-in word tokenizer."""
    return HFTokenizer(path) if path else WordTokenizer()


@dataclass(frozen=True)
class Output:
    """What one request generates: token ids and how its text is cut from `OutputText`."""

    ids: list[int]
    start: int  # index into the output cycle
    text: str  # final text (stop string removed)
    finish_reason: dict[str, Any]


class OutputText:
    """Deterministic generated text with O(1) cumulative-text slices (see module docstring)."""

    def __init__(self, tokenizer: Tokenizer, seed: int = 0) -> None:
        self._cycle_ids, self._cycle_pieces = tokenizer.output_vocab()
        self._seed = seed
        self._ids: list[int] = []
        self._text = ""
        self._char_at: list[int] = [0]
        self._grow(4096)

    def _grow(self, tokens: int) -> None:
        """Materialise at least one full cycle plus `tokens` tokens."""
        n = len(self._cycle_ids)
        want = tokens + n
        if len(self._ids) >= want:
            return
        reps = -(-want // n)
        pieces = self._cycle_pieces * reps
        self._ids = self._cycle_ids * reps
        self._text = "".join(pieces)
        self._char_at = [0, *accumulate(map(len, pieces))]

    def generate(
        self, prompt: list[int], max_new_tokens: int, stop: list[str], stop_token_ids: list[int]
    ) -> Output:
        """The output of a request: `max_new_tokens` tokens, or fewer up to a stop."""
        self._grow(max_new_tokens)
        start = hash((self._seed, len(prompt), *prompt[-16:])) % len(self._cycle_ids)
        count = max_new_tokens
        finish: dict[str, Any] = {"type": "length", "length": max_new_tokens}
        end_char: int | None = None
        if stop_token_ids:
            window = self._ids[start : start + count]
            hits = [window.index(t) for t in set(stop_token_ids) if t in window]
            if hits:
                count = min(hits) + 1
                finish = {"type": "stop", "matched": window[count - 1]}
        if stop:
            text = self.text(start, count)
            found = [(text.find(s), s) for s in stop if s and s in text]
            if found:
                pos, matched = min(found)
                base = self._char_at[start]
                # the stop string ends inside this token: generation stopped there
                count = next(
                    k
                    for k in range(1, count + 1)
                    if self._char_at[start + k] - base >= pos + len(matched)
                )
                finish = {"type": "stop", "matched": matched}
                end_char = pos
        full = self.text(start, count)
        return Output(
            self._ids[start : start + count],
            start,
            full if end_char is None else full[:end_char],
            finish,
        )

    def text(self, start: int, tokens: int) -> str:
        """Cumulative text of the first `tokens` output tokens from cycle index `start`."""
        return self._text[self._char_at[start] : self._char_at[start + tokens]]
