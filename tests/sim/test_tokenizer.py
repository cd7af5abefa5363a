"""Tokenizers and the deterministic output text."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_dp.sim.tokenizer import HFTokenizer, OutputText, WordTokenizer, tokenizer_folder
from tests.processes import make_hf_tokenizer


def test_word_tokenizer_is_deterministic_and_word_level() -> None:
    tok = WordTokenizer()
    ids = tok.encode("Hello, world! Hello again.")
    assert len(ids) == 7  # Hello , world ! Hello again .
    assert ids[0] == ids[4]
    assert WordTokenizer().encode("Hello, world!") == ids[:4]


def test_word_tokenizer_prefix_property() -> None:
    tok = WordTokenizer()
    history = "<|user|>\nhi there\n<|assistant|>\n"
    assert tok.encode(history + " an answer\n")[: len(tok.encode(history))] == tok.encode(history)


def test_output_is_deterministic_and_reencodes_to_its_ids() -> None:
    tok = WordTokenizer()
    prompt = tok.encode("What is the capital of France?")
    a = OutputText(tok).generate(prompt, 40, [], [])
    b = OutputText(tok).generate(prompt, 40, [], [])
    assert a == b
    assert len(a.ids) == 40 and a.finish_reason == {"type": "length", "length": 40}
    assert tok.encode(a.text) == a.ids


def test_cumulative_text_slices() -> None:
    tok = WordTokenizer()
    out = OutputText(tok)
    full = out.generate([1, 2, 3], 10, [], [])
    assert out.text(full.start, 10) == full.text
    assert full.text.startswith(out.text(full.start, 3))
    assert len(tok.encode(out.text(full.start, 3))) == 3


def test_long_outputs_grow_the_buffer() -> None:
    out = OutputText(WordTokenizer())
    assert len(out.generate([5], 10_000, [], []).ids) == 10_000


def test_stop_string_truncates() -> None:
    tok = WordTokenizer()
    out = OutputText(tok)
    full = out.generate([1], 30, [], [])
    words = full.text.split()
    stop = " " + words[5]
    cut = out.generate([1], 30, [stop], [])
    assert cut.finish_reason == {"type": "stop", "matched": stop}
    assert cut.text == full.text[: full.text.index(stop)]
    assert len(cut.ids) == 6  # the token that completed the stop string was generated


def test_stop_token_id() -> None:
    out = OutputText(WordTokenizer())
    full = out.generate([1], 30, [], [])
    cut = out.generate([1], 30, [], [full.ids[3]])
    assert len(cut.ids) == 4 and cut.finish_reason["type"] == "stop"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_tokenizer(tmp_path_factory.mktemp("tok"))


def test_hf_tokenizer_from_local_folder(hf_folder: Path) -> None:
    tok = HFTokenizer(str(hf_folder))
    assert tok.encode("hello world")[-2:] == [2, 3]
    ids, pieces = tok.output_vocab()
    assert ids and ids == [tok.encode(p)[-1] for p in pieces]
    out = OutputText(tok).generate(tok.encode("hello"), 5, [], [])
    assert len(out.ids) == 5 and set(out.ids) <= set(ids)


def test_long_texts_tokenize_the_same_through_the_piece_memo() -> None:
    tok = WordTokenizer()
    text = " ".join(f"word{i}, and; more!" for i in range(800))
    expected = list(map(tok._memo.__getitem__, __import__("re").findall(r"\w+|[^\w\s]", text)))
    assert tok.encode(text) == expected
    assert tok.encode(text) == expected  # from the memo
    assert tok.encode(text + " tail") == [*expected, tok.encode("tail")[0]]


def test_tokenizer_folder_prefers_local_folders(hf_folder: Path, tmp_path: Path) -> None:
    assert tokenizer_folder(str(hf_folder), "org/model") == str(hf_folder)
    assert tokenizer_folder(None, str(hf_folder)) == str(hf_folder)  # SGLang: the model's own
    assert tokenizer_folder("org/tok", str(tmp_path)) is None  # empty folder, hub name
    assert tokenizer_folder(None, None) is None
