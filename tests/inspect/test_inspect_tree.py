"""`sglang-dp inspect-tree` against a router with simulated workers after known traffic."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sglang_dp.inspect.render import explain
from tests.processes import SGLANG_DP, free_port, sim_worker
from tests.router.cluster import Cluster, cluster, router_process

SYSTEMS = {g: f"System prompt {g}: " + "be concise and kind. " * 60 for g in "ABC"}


def inspect(c: Cluster | str, *args: str) -> subprocess.CompletedProcess[str]:
    url = c if isinstance(c, str) else c.router.url
    return subprocess.run(
        [SGLANG_DP, "inspect-tree", "--url", url, *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def traffic() -> Iterator[tuple[Cluster, dict[str, str]]]:
    with cluster(3) as c:
        holders = {}
        for group, system in SYSTEMS.items():
            for q in range(3):
                reply = c.router.post(
                    "/generate",
                    {"text": system + f"question {q}", "sampling_params": {"max_new_tokens": 2}},
                )
                holders[group] = reply.headers["x-sglang-dp-worker"]
        yield c, holders


def as_json(c: Cluster, *args: str) -> Any:
    result = inspect(c, "--json", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_the_tree_shows_which_worker_holds_which_system_prompt(traffic: Any) -> None:
    c, holders = traffic
    data = as_json(c, "--depth", "2", "--top", "10")
    found = {}
    for branch in data["tree"]["branches"]:
        for sub in [branch, *branch["children"]]:
            for group in SYSTEMS:
                if f"System prompt {group}" in branch["text"] + sub["text"]:
                    found[group] = {w["url"] for w in sub["workers"]}
    assert {g: {holders[g]} for g in SYSTEMS} == found
    text = inspect(c).stdout
    assert "what the router believes each worker holds" in text and "System prompt" in text


def test_a_prompt_is_explained_without_changing_the_tree(traffic: Any) -> None:
    c, holders = traffic
    before = as_json(c)["tree"]["total_size"]
    data = as_json(c, "--prompt", SYSTEMS["B"] + "a new question")
    assert data["route"]["decision"]["worker"] == holders["B"]
    assert data["route"]["decision"]["reason"] == "cache_hit"
    assert as_json(c)["tree"]["total_size"] == before
    text = inspect(c, "--prompt", SYSTEMS["B"] + "another").stdout
    assert "soonest first token (est." in text


def test_a_chat_conversation_file_is_explained(traffic: Any, tmp_path: Path) -> None:
    c, _ = traffic
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "hello there"}]))
    data = as_json(c, "--messages-file", str(chat))
    assert data["route"]["path"] == "/v1/chat/completions"
    assert len(data["route"]["workers"]) == 3


def test_clear_errors() -> None:
    unreachable = inspect(f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1 and "cannot reach a router" in unreachable.stdout
    with sim_worker("--instant") as w, router_process([w.url], "--admin-api-key", "k") as r:
        wrong = inspect(r.url, "--api-key", "nope")
        assert wrong.returncode == 1 and "refused the API key" in wrong.stdout
        assert inspect(r.url, "--api-key", "k").returncode == 0
    with router_process([], ready_workers=0) as empty:
        none = inspect(empty.url)
        assert none.returncode == 1 and "has no workers" in none.stdout


def test_reasons_in_plain_words() -> None:
    stats = {"workers": [{"url": "a"}, {"url": "b"}]}
    route = {
        "key_length": 200,
        "decision": {"worker": "b", "reason": "below_threshold", "policy": "cache_aware",
                     "matched": 10, "match_rate": 0.05},
        "workers": [{"url": "a", "matched": 20, "load": 4, "pending": 900},
                    {"url": "b", "matched": 10, "load": 5, "pending": 300}],
        "settings": {"cache_threshold": 0.3, "balance_abs_threshold": 64,
                     "balance_rel_threshold": 1.5},
    }  # fmt: skip
    assert explain(route, stats) == (
        "the best match is 20 of 200 characters (10 %) ≤ threshold 30 %: the worker with the "
        "least pending prefill, w1 (300 uncached characters, 5 in flight), takes it"
    )
    route["decision"] |= {"policy": "threshold"}
    assert explain(route, stats).endswith("the least loaded worker, w1 (5 in flight), takes it")
    route["decision"] |= {"reason": "imbalanced"}
    assert "max 5 − min 4 > 64" in explain(route, stats)
    assert explain(route, stats).endswith("the least loaded worker, w1, takes it")
    route["decision"] |= {"reason": "imbalanced_hit"}
    assert explain(route, stats).endswith(
        "w1 holds 10 of 200 characters (5 %) and is not overloaded, so it takes it"
    )
    route["decision"] |= {"reason": "round_robin", "policy": "round_robin"}
    assert explain(route, stats) == "w1, by the round_robin policy (it does not look at the cache)"
