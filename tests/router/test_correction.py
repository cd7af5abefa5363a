"""Correction of every kind of traffic, through a real router in front of real simulated workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.processes import make_chat_tokenizer
from tests.router.cluster import Cluster, cluster

SYSTEM = " ".join(f"rule{i}" for i in range(300))


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
    assert total("agreed_tokens") >= 0.9 * total("cached_tokens")  # answers included
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
    assert total("agreed_tokens") >= 0.9 * total("cached_tokens")  # answers included
    assert total("corrections") == 0


def test_token_keyed_chat_agrees_with_a_worker_using_the_same_chat_template(
    tmp_path: Path,
) -> None:
    folder = str(make_chat_tokenizer(tmp_path / "tok"))
    worker_args = ("--time-scale", "1000", "--enable-cache-report", "--tokenizer-path", folder)
    router_args = ("--routing-key", "tokens", "--tokenizer-path", folder)
    with cluster(2, *router_args, worker_args=worker_args) as c:
        system = "conversation {n}: the capital of France is Paris"
        chat_conversations(c.router.url, system, "hello world {turn}")
        workers = c.stats()["workers"]
    cached = sum(w["cached_tokens"] for w in workers)
    assert sum(w["completed"] for w in workers) == 9 and cached > 0
    assert sum(w["agreed_tokens"] for w in workers) >= 0.9 * cached
    assert sum(w["corrections"] for w in workers) == 0
