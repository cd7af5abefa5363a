"""What SGLang does to a prompt, written once: a local Hugging Face tokenizer and its encodings.

- `load_hf(path)`: the `transformers.AutoTokenizer` in a local folder (never downloaded;
  transformers is imported only then), for the router, the simulator and the benchmark alike;
- `HFEncoder`: ids of a text (special tokens as SGLang adds them, or none) and a conversation
  through the tokenizer's chat template, with a thread-safe memo of encoded pieces (see the
  class); the router's `keys.Encoder`, and what the simulator encodes prompts with;
- `load_encoder(path)`: the router's `--tokenizer-path` encoder (and its objects frozen out of
  the garbage collector's way).
"""

from __future__ import annotations

import re
import threading
from array import array
from collections.abc import Sequence
from typing import Any

from sglang_dp.sglang_api import ChatError


def load_hf(path: str) -> Any:
    """The Hugging Face tokenizer in the local folder `path` (never downloads)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_encoder(tokenizer_path: str) -> HFEncoder:
    """Token-level routing: a local Hugging Face tokenizer (never downloaded)."""
    import gc

    encoder = HFEncoder(load_hf(tokenizer_path))
    # transformers and the tokenizer bring ~60,000 objects that live as long as the router:
    # out of the collector's way, or every full collection walks them (16 ms measured)
    gc.freeze()
    return encoder


class HFEncoder:
    """An `Encoder` over a Hugging Face tokenizer (`load_hf`).

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
            raise ChatError(f"the chat template rejects these messages: {exc}") from None
        return str(text)


def _find(haystack: list[int], needle: list[int]) -> int:
    for at in range(len(haystack) - len(needle) + 1):
        if haystack[at : at + len(needle)] == needle:
            return at
    return -1
