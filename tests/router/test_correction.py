"""Correction of every kind of traffic, through a real router in front of real simulated workers.

Agreement is checked on both sides: recall (Σ min(predicted, reported) / Σ reported: the cached
tokens the tree predicted) and precision (the same over Σ predicted: what it predicted that was
really cached), so a router that predicts "everything cached" fails. Router and worker render
chat by code of ours on both sides, so each side is also checked against a reference we did not
write: a literal string for the built-in template, Hugging Face's own
`apply_chat_template(tokenize=True)` for a tokenizer's template.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.processes import make_chat_tokenizer
from tests.router.cluster import Cluster, cluster

SYSTEM = " ".join(f"rule{i}" for i in range(300))
AGREEMENT = 0.9  # least recall and precision over a test's requests (answers included)


def two_sided(before: list[Any], after: list[Any]) -> tuple[float, float]:
    """(recall, precision) of the tree's predictions over the requests between two /debug/stats
    snapshots of the workers."""

    def total(field: str) -> int:
        return sum(w[field] for w in after) - sum(w[field] for w in before)

    agreed, cached = total("agreed_tokens"), total("cached_tokens")
    predicted = total("predicted_tokens")
    return (agreed / cached if cached else 1.0, agreed / predicted if predicted else 1.0)


def assert_agrees(before: list[Any], after: list[Any]) -> None:
    recall, precision = two_sided(before, after)
    assert recall >= AGREEMENT, f"the tree missed cached tokens: recall {recall:.3f}"
    assert precision >= AGREEMENT, f"the tree over-predicted: precision {precision:.3f}"


@pytest.fixture(scope="module")
def two() -> Iterator[Cluster]:
    with cluster(2) as c:
        yield c


def shape(events: list[Any]) -> tuple[str, list[Any]]:
    """A chat stream's text, and the fields of its events but ids, times and text (how the
    text is cut into events depends on the worker's timing)."""
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    fields = {
        (k, str(v if k != "choices" else v[0].get("finish_reason")))
        for e in events[:-1]
        for k, v in e.items()
        if k not in ("id", "created")
    }
    return text, [sorted(fields), events[-1]]


def test_the_client_gets_the_stream_it_would_get_from_the_worker(two: Cluster) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "stream shape " + SYSTEM}],
        "stream": True,
        "max_tokens": 6,
    }
    through_router = two.router.events("/v1/chat/completions", body)
    direct = two.workers[0].events("/v1/chat/completions", body)
    assert shape(through_router) == shape(direct)
    assert all(e == "[DONE]" or e["choices"] for e in through_router)  # no usage-only chunk
    asked = {**body, "stream_options": {"include_usage": True}}
    kept = two.router.events("/v1/chat/completions", asked)
    assert kept[-2]["choices"] == [] and kept[-2]["usage"]["prompt_tokens"] > 300


def chat_conversations(router: str, system: str, question: str) -> None:
    """Three conversations of three streamed turns each through the `openai` client, every
    answer sent back in the next turn (`system` and `question` are formatted with n / turn)."""
    client = openai.OpenAI(base_url=router + "/v1", api_key="x", max_retries=0)
    histories: list[list[Any]] = [
        [{"role": "system", "content": system.format(n=n)}] for n in range(3)
    ]
    for turn in range(3):
        for history in histories:
            history.append({"role": "user", "content": question.format(turn=turn)})
            stream = client.chat.completions.create(
                model="m", messages=history, stream=True, max_tokens=12
            )
            answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            history.append({"role": "assistant", "content": answer})


def test_streamed_chat_through_the_openai_client_is_corrected(two: Cluster) -> None:
    before = two.stats()["workers"]
    chat_conversations(two.router.url, "conversation {n} " + SYSTEM, "question {turn}")
    after = two.stats()["workers"]

    def total(field: str) -> int:
        return sum(w[field] for w in after) - sum(w[field] for w in before)

    assert total("completed") == 9  # every streamed request was observed
    assert total("cached_tokens") > 0
    assert_agrees(before, after)
    assert total("corrections") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_token_id_conversations_are_corrected_with_the_output_ids(
    two: Cluster, stream: bool
) -> None:
    before = two.stats()["workers"]
    # short prompts, long answers: a router blind to the output would predict half the hits
    histories = [[5000 + 10 * stream + n, *range(20)] for n in range(3)]
    for turn in range(3):
        for history in histories:
            history.extend([9000 + turn] * 4)  # the user's next question
            body = {"input_ids": history, "sampling_params": {"max_new_tokens": 32}}
            if stream:
                history.extend(
                    two.router.events("/generate", {**body, "stream": True})[-2]["output_ids"]
                )
            else:
                history.extend(two.router.post("/generate", body).json()["output_ids"])
    after = two.stats()["workers"]

    def total(field: str) -> int:
        return sum(w[field] for w in after) - sum(w[field] for w in before)

    assert total("completed") == 9
    assert total("cached_tokens") > 0
    assert_agrees(before, after)
    assert total("corrections") == 0


# The built-in template (no tokenizer template): one `<|role|>\ncontent\n` block a message and
# the generation prompt, written out by hand; the default word tokenizer makes one token of each
# word and each punctuation mark: < | system | > Be brief . < | user | > hello < | assistant | >
BUILT_IN_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello"},
]
BUILT_IN_TEXT = "<|system|>\nBe brief.\n<|user|>\nhello\n<|assistant|>\n"
BUILT_IN_TOKENS = 19


def test_both_sides_render_the_built_in_chat_template_as_written(two: Cluster) -> None:
    route = two.router.post("/debug/route", {"messages": BUILT_IN_MESSAGES}).json()
    assert route["key_length"] == len(BUILT_IN_TEXT)  # the router's character key
    body = {"messages": BUILT_IN_MESSAGES, "max_tokens": 1}
    reply = two.workers[0].post("/v1/chat/completions", body).json()
    assert reply["usage"]["prompt_tokens"] == BUILT_IN_TOKENS  # what the worker computed


def test_token_keyed_chat_agrees_with_a_worker_using_the_same_chat_template(
    tmp_path: Path,
) -> None:
    from transformers import AutoTokenizer

    folder = str(make_chat_tokenizer(tmp_path / "tok"))
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    worker_args = ("--time-scale", "1000", "--enable-cache-report", "--tokenizer-path", folder)
    router_args = ("--routing-key", "tokens", "--tokenizer-path", folder)
    with cluster(2, *router_args, worker_args=worker_args) as c:
        # both sides against Hugging Face's own rendering of a conversation
        messages = [{"role": "system", "content": "the capital of France"}, *BUILT_IN_MESSAGES]
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected = expected if isinstance(expected, list) else expected["input_ids"]
        route = c.router.post("/debug/route", {"messages": messages}).json()
        assert route["key_length"] == len(expected)
        reply = c.workers[0].post("/v1/chat/completions", {"messages": messages, "max_tokens": 1})
        assert reply.json()["usage"]["prompt_tokens"] == len(expected)
        before = c.stats()["workers"]
        system = "conversation {n}: the capital of France is Paris"
        chat_conversations(c.router.url, system, "hello world {turn}")
        workers = c.stats()["workers"]
    cached = sum(w["cached_tokens"] for w in workers) - sum(w["cached_tokens"] for w in before)
    assert sum(w["completed"] for w in workers) - sum(w["completed"] for w in before) == 9
    assert cached > 0
    assert_agrees(before, workers)
    assert sum(w["corrections"] for w in workers) == 0


def test_over_prediction_fails_the_agreement_check() -> None:
    """A router that believes a worker holds everything (here: the worker's cache flushed
    behind its back) keeps full recall, and only precision catches it."""
    with cluster(1) as c:
        prompt = {"text": "over prediction " + SYSTEM, "sampling_params": {"max_new_tokens": 4}}
        c.router.post("/generate", prompt)  # the tree now holds the prompt for the worker
        before = c.stats()["workers"]
        assert c.workers[0].post("/flush_cache", {}).status == 200  # not through the router
        reply = c.router.post("/generate", prompt).json()
        after = c.stats()["workers"]
    assert reply["meta_info"]["cached_tokens"] == 0
    recall, precision = two_sided(before, after)
    assert recall == 1.0 and precision == 0.0  # recall alone would call this perfect
    with pytest.raises(AssertionError, match="over-predicted"):
        assert_agrees(before, after)
    assert after[0]["mispredicted"] == before[0]["mispredicted"] + 1
