"""Routing on KV events end to end: a router process in front of simulated workers that publish."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from tests.inspect.test_inspect_tree import inspect
from tests.processes import SGLANG_DP, Worker, free_port_band, sim_worker, wait_for
from tests.router.cluster import Cluster, router_process

pytestmark = pytest.mark.slow
PAGE = 4
SYSTEM = " ".join(f"rule{i}" for i in range(40))  # 40 word tokens: 10 pages


def publishing(base: int, *extra: str) -> tuple[str, ...]:
    config = {
        "publisher": "zmq",
        "endpoint": f"tcp://*:{base}",
        "replay_endpoint": f"tcp://*:{base + 1}",
        "topic": "kv",
    }
    return ("--kv-events-config", json.dumps(config), "--page-size", str(PAGE), *extra)


@contextmanager
def events_cluster(
    *router_args: str, publishers: tuple[bool, ...] = (True, True)
) -> Iterator[Cluster]:
    common = ("--time-scale", "1000", "--enable-cache-report", "--max-total-tokens", "4000")
    with ExitStack() as stack:
        workers = [
            stack.enter_context(
                sim_worker(*common, *(publishing(free_port_band(2)) if publishes else ()))
            )
            for publishes in publishers
        ]
        router = stack.enter_context(
            router_process([w.url for w in workers], "--routing-key", "words", *router_args)
        )
        yield Cluster(router, workers)


def generate(router: Worker, text: str) -> dict[str, Any]:
    reply = router.post("/generate", {"text": text, "sampling_params": {"max_new_tokens": 4}})
    assert reply.status == 200, reply.body
    return reply.json()  # type: ignore[no-any-return]


def explain(router: Worker, text: str) -> dict[str, Any]:
    reply = router.post("/debug/route?path=/generate", {"text": text})
    assert reply.status == 200, reply.body
    return reply.json()  # type: ignore[no-any-return]


def streams(c: Cluster) -> dict[str, Any]:
    return c.stats()["kv_events"]["workers"]  # type: ignore[no-any-return]


def test_routes_on_exact_cache_state_and_says_so() -> None:
    with events_cluster() as c:
        wait_for(lambda: len(streams(c)) == 2, timeout=20, what="both streams followed")
        first = generate(c.router, SYSTEM + " first question")
        assert first["meta_info"]["cached_tokens"] == 0
        wait_for(lambda: any(s["trusted"] for s in streams(c).values()), timeout=20, what="trusted")
        route = wait_for(
            lambda: (r := explain(c.router, SYSTEM + " second"))["decision"]["matched"] >= 40 and r,
            timeout=20,
            what="the stored prefix in the index",
        )
        assert route["decision"]["view"] == "events"
        assert route["decision"]["reason"] == "cache_hit"
        held = route["decision"]["worker"]
        assert streams(c)[held]["blocks"] >= 10
        answer = generate(c.router, SYSTEM + " second")
        assert answer["meta_info"]["cached_tokens"] == route["decision"]["matched"]  # exact
        stats = {w["url"]: w for w in c.stats()["workers"]}
        assert stats[held]["cache_view"] == "events"
        metrics = c.router.get("/metrics").body.decode()
        assert f'sglang_dp_kv_events_trusted{{worker="{held}"}} 1.0' in metrics
        shown = inspect(c, "--prompt", SYSTEM + " third")
        assert shown.returncode == 0, shown.stderr
        words = " ".join(shown.stdout.split())  # as wrapped to the terminal's width
        assert "40 of 41 tokens" in words and "its match is exact" in words
        summary = subprocess.run(
            [SGLANG_DP, "inspect-tree", "--url", c.router.url],
            capture_output=True, text=True, timeout=30, check=False,
            env={**os.environ, "COLUMNS": "250"},
        )  # fmt: skip
        assert "blocks, exact" in summary.stdout, summary.stdout + summary.stderr


def test_a_worker_without_events_is_routed_on_the_tree_and_reported() -> None:
    with events_cluster("--cache-view", "events", publishers=(True, False)) as c:
        silent = c.workers[1].url
        wait_for(lambda: silent in streams(c), timeout=20, what="the report")
        assert streams(c)[silent]["followed"] is False
        assert "does not publish" in streams(c)[silent]["reason"]
        route = explain(c.router, SYSTEM)
        views = {w["url"]: w["view"] for w in route["workers"]}
        assert views[silent] == "tree"


def test_character_keys_never_follow_events() -> None:
    with events_cluster("--routing-key", "chars") as c:
        wait_for(lambda: len(streams(c)) == 2, timeout=20, what="both workers reported")
        assert all("characters" in s["reason"] for s in streams(c).values())
        generate(c.router, SYSTEM)
        assert {w["view"] for w in explain(c.router, SYSTEM)["workers"]} == {"tree"}


def test_without_replay_a_lossy_worker_goes_to_the_tree_and_no_request_fails() -> None:
    common = ("--time-scale", "1000", "--enable-cache-report", "--page-size", str(PAGE))
    base = free_port_band(2)
    lossy = json.dumps({"publisher": "zmq", "endpoint": f"tcp://*:{base}", "topic": "kv"})
    with ExitStack() as stack:
        worker = stack.enter_context(
            sim_worker(*common, "--kv-events-config", lossy, "--kv-events-drop-rate", "0.5")
        )
        router = stack.enter_context(
            router_process([worker.url], "--routing-key", "words", "--cache-view", "events")
        )
        c = Cluster(router, [worker])
        wait_for(lambda: worker.url in streams(c), timeout=20, what="the stream followed")
        for i in range(30):
            generate(router, f"{SYSTEM} question {i}")  # each answer asserts a 200
            if "lost" in streams(c)[worker.url]["reason"]:
                break
        assert "lost (not replayed)" in streams(c)[worker.url]["reason"]
        assert {w["view"] for w in explain(router, SYSTEM)["workers"]} == {"tree"}
        generate(router, SYSTEM + " after")
