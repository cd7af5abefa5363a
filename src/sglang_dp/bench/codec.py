"""The bench's tokenizer: a local Hugging Face tokenizer (`--tokenizer-path`) for the oracle hit
rate and the token counts a server did not report (without one, `workloads.word_tokens`)."""

from __future__ import annotations

from pathlib import Path

from sglang_dp.bench.workloads import Codec


class HFCodec:
    """A local Hugging Face tokenizer (transformers imported only here; nothing downloaded)."""

    def __init__(self, path: str) -> None:
        if not Path(path).is_dir():
            raise OSError(f"--tokenizer-path {path}: not a folder (a local tokenizer is needed)")
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids))


def load_codec(path: str | None) -> Codec | None:
    return HFCodec(path) if path else None
