"""Workload generators (seeded, lengths as asked), conversation rendering, and the oracle."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.bench.config import BenchConfig
from sglang_dp.bench.workloads import (
    VOCABULARY,
    OracleRate,
    PrefixTrie,
    Script,
    Turn,
    WorkloadError,
    build_workload,
    make_text,
    messages_for,
    oracle_rate,
    parse_trace,
    planned_requests,
    prompt_text,
    word_tokens,
)

SMALL = {
    "num_groups": 4,
    "prompts_per_group": 5,
    "system_prompt_len": 50,
    "question_len": 7,
    "output_len": 9,
}


class CharCodec:
    """A tokenizer with one token per character (lengths are then exact and easy to check)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


@given(st.text(alphabet=st.sampled_from("ab_1 ,.:\n\t²½éÅ-<|>"), max_size=60))
def test_word_tokens_split_like_the_simulated_worker(text: str) -> None:
    assert word_tokens(text) == re.findall(r"\w+|[^\w\s]", text)


def test_vocabulary_words_are_one_word_token_each() -> None:
    assert len(set(VOCABULARY)) == len(VOCABULARY) >= 4000
    assert all(word_tokens(w) == [w] for w in VOCABULARY)


@pytest.mark.parametrize("workload", ["shared-prefix", "multi-turn", "random"])
def test_same_seed_same_requests(workload: str) -> None:
    config = BenchConfig(workload=workload, num_requests=20, num_conversations=3, **SMALL)
    assert build_workload(config) == build_workload(config)
    other = BenchConfig(workload=workload, num_requests=20, num_conversations=3, seed=1, **SMALL)
    assert build_workload(other) != build_workload(config)


def test_shared_prefix_lengths_groups_and_shuffle() -> None:
    scripts = build_workload(BenchConfig(**SMALL))
    assert len(scripts) == 20
    systems = Counter(s.history for s in scripts)
    assert sorted(systems.values()) == [5, 5, 5, 5]
    for script in scripts:
        ((role, system),) = script.history
        assert role == "system" and len(word_tokens(system)) == 50
        (turn,) = script.turns
        assert len(word_tokens(turn.content)) == 7 and turn.max_tokens == 9
    order = [list(systems).index(s.history) for s in scripts]
    assert order != sorted(order)  # shuffled, not group after group


def test_shared_prefix_zipf_favours_the_first_groups() -> None:
    config = BenchConfig(
        num_groups=8,
        prompts_per_group=100,
        system_prompt_len=3,
        question_len=1,
        group_distribution="zipf",
        zipf_s=1.5,
    )
    scripts = build_workload(config)
    counts = Counter(s.history for s in scripts).most_common()
    assert len(scripts) == 800
    assert counts[0][1] > 3 * counts[-1][1]


def test_multi_turn_scripts() -> None:
    config = BenchConfig(
        workload="multi-turn",
        num_conversations=3,
        turns=4,
        system_prompt_len=20,
        question_len=None,
        answer_len=11,
    )
    scripts = build_workload(config)
    assert len(scripts) == 3 and len({s.history for s in scripts}) == 3
    assert planned_requests(scripts, None) == 12 and planned_requests(scripts, 5) == 5
    for script in scripts:
        assert len(script.turns) == 4
        assert all(len(word_tokens(t.content)) == 32 and t.max_tokens == 11 for t in script.turns)


def test_random_prompts_share_nothing() -> None:
    config = BenchConfig(workload="random", num_requests=30, input_len=40, output_len=3)
    scripts = build_workload(config)
    assert len(scripts) == 30
    assert all(s.raw and len(word_tokens(s.turns[0].content)) == 40 for s in scripts)
    sent = [(word_tokens(prompt_text(s, 0, [])), []) for s in scripts]
    assert oracle_rate(sent).rate < 0.01


def test_lengths_in_a_tokenizers_tokens() -> None:
    rng = random.Random(0)
    for n in (1, 5, 100):
        text = make_text(rng, n, CharCodec())
        assert len(CharCodec().encode(text)) == n
    assert make_text(rng, 0, CharCodec()) == ""


def test_poisson_arrivals_are_seeded_and_about_the_rate() -> None:
    config = BenchConfig(workload="random", num_requests=2000, input_len=1, request_rate=50.0)
    scripts = build_workload(config)
    offsets = [s.at for s in scripts]
    assert offsets == sorted(offsets) and offsets[0] > 0
    assert 2000 / offsets[-1] == pytest.approx(50, rel=0.1)
    assert [s.at for s in build_workload(config)] == offsets
    assert {s.at for s in build_workload(BenchConfig(workload="random", input_len=1))} == {0.0}


def test_each_turn_extends_the_previous_prompt_with_its_answer() -> None:
    script = Script(0.0, (Turn("q one", 5), Turn("q two", 5)), (("system", "be brief"),))
    first = prompt_text(script, 0, [])
    second = prompt_text(script, 1, [" an answer"])
    assert first == "be brief\nUser: q one\nAssistant:"
    assert second.startswith(first + " an answer\n")
    assert second.endswith("User: q two\nAssistant:")
    assert messages_for(script, 1, ["a"]) == [
        ("system", "be brief"),
        ("user", "q one"),
        ("assistant", "a"),
        ("user", "q two"),
    ]


def test_trace_replay() -> None:
    lines = [
        '{"timestamp": 12.5, "prompt": "hello there", "max_tokens": 4}',
        "",
        '{"timestamp": 10, "messages": [{"role": "system", "content": "s"},'
        ' {"role": "user", "content": "hi"}]}',
    ]
    scripts = parse_trace(lines, default_max_tokens=7, speed=2.0)
    assert [s.at for s in scripts] == [0.0, 1.25]
    assert scripts[0].history == (("system", "s"),) and scripts[0].turns == (Turn("hi", 7),)
    assert scripts[1].raw and scripts[1].turns == (Turn("hello there", 4),)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"prompt": "a", "max_tokens": 0}', "max_tokens"),
        ('{"prompt": "a", "timestamp": "x"}', "timestamp"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "user"),
        ('{"messages": [{"role": "user"}]}', "string content"),
        ('{"prompt": "a", "messages": []}', "either"),
    ],
)
def test_bad_trace_lines_are_named(line: str, message: str) -> None:
    with pytest.raises(WorkloadError, match=f"trace line 2: .*{message}"):
        parse_trace(['{"prompt": "ok"}', line], default_max_tokens=1)


def test_empty_trace() -> None:
    with pytest.raises(WorkloadError, match="no requests"):
        parse_trace(["", " "], default_max_tokens=1)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="trace-path"):
        BenchConfig(workload="trace")
    with pytest.raises(ValueError, match="concurrency"):
        BenchConfig(concurrency=0)
    with pytest.raises(ValueError, match="request-rate"):
        BenchConfig(request_rate=-1.0)
    with pytest.raises(ValueError, match="aiohttp"):
        BenchConfig(url="https://example.com")
    assert BenchConfig(url="https://example.com", client="aiohttp").url.startswith("https")


# ------------------------------------------------------------------- the oracle


def test_oracle_on_hand_made_examples() -> None:
    a = list("abcdefgh")
    # The first prompt finds nothing; a repeat finds all but its last token (as SGLang caps it).
    assert oracle_rate([(a, []), (a, [])]) == OracleRate(7, 16)
    # Shared 4-token prefix, then different.
    result = oracle_rate([(list("abcdXXXX"), []), (list("abcdYYYY"), [])])
    assert (result.hit_tokens, result.prompt_tokens) == (4, 16)
    # A second turn repeats the first prompt and its answer, then adds a question.
    first, answer = list("sysq1"), list("ans")
    second = [*first, *answer, *"q2"]
    result = oracle_rate([(first, answer), (second, list("zz"))])
    assert (result.hit_tokens, result.prompt_tokens) == (8, 15)
    assert result.rate == pytest.approx(8 / 15)
    # Only earlier requests count: a later prompt does not help an earlier one.
    result = oracle_rate([(list("ab"), []), (list("abcdef"), [])])
    assert result.hit_tokens == 2
    assert oracle_rate([]).rate == 0.0


def _brute_force_match(seen: list[tuple[str, ...]], seq: tuple[str, ...]) -> int:
    best = 0
    for other in seen:
        k = 0
        while k < min(len(other), len(seq)) and other[k] == seq[k]:
            k += 1
        best = max(best, k)
    return best


@given(st.lists(st.lists(st.sampled_from("abc"), max_size=150), max_size=30))
def test_prefix_trie_matches_brute_force(sequences: list[list[str]]) -> None:
    trie = PrefixTrie()
    seen: list[tuple[str, ...]] = []
    for seq in sequences:
        assert trie.insert(seq) == _brute_force_match(seen, tuple(seq))
        seen.append(tuple(seq))


@given(
    st.lists(
        st.tuples(st.integers(0, 300), st.lists(st.sampled_from("ab"), max_size=5)), max_size=20
    )
)
def test_prefix_trie_on_long_shared_prefixes(cuts: list[tuple[int, list[str]]]) -> None:
    base = [str(i % 7) for i in range(300)]  # long common runs exercise the block compare
    trie = PrefixTrie()
    seen: list[tuple[str, ...]] = []
    for cut, tail in cuts:
        seq = (*base[:cut], *tail)
        assert trie.insert(seq) == _brute_force_match(seen, seq)
        seen.append(seq)
