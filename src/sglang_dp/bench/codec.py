"""The bench's tokenizer: a local Hugging Face tokenizer (`--tokenizer-path`) for the oracle hit
rate and the token counts a server did not report (without one, `workloads.word_tokens`)."""

from __future__ import annotations

from pathlib import Path

from sglang_dp.bench.workloads import Codec
from sglang_dp.tokenizer import load_hf


class HFCodec:
    """A local Hugging Face tokenizer (`sglang_dp.tokenizer.load_hf`: nothing downloaded)."""

    def __init__(self, path: str) -> None:
        if not Path(path).is_dir():
            raise OSError(f"--tokenizer-path {path}: not a folder (a local tokenizer is needed)")
        self._tokenizer = load_hf(path)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids))


def load_codec(path: str | None) -> Codec | None:
    return HFCodec(path) if path else None
