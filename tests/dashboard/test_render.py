"""Dashboard rendering: records from stats payloads, rates, bars, and the drawn table."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from sglang_dp.dashboard.render import (
    ProcessFacts,
    StartupRow,
    bar,
    duration,
    frame,
    human,
    render,
    startup_table,
    state_text,
    status_line,
)


def stats(now: float, completed: int, tokens: int, **worker: Any) -> dict[str, Any]:
    base = {
        "url": "http://127.0.0.1:31000",
        "state": "healthy",
        "in_flight": 3,
        "routed": completed,
        "completed": completed,
        "completion_tokens": tokens,
        "prompt_tokens": 1000,
        "predicted_tokens": 700,
        "cached_tokens": 750,
        "predicted_rate": 0.7,
        "hit_rate": 0.75,
        "tree_size": 12_345,
        "resets": 0,
    }
    return {
        "policy": "cache_aware",
        "now": now,
        "uptime_s": 3725.0,
        "hit_rate": 0.75,
        "tree_size": 12_345,
        "workers": [base | worker],
        "events": ["w0 is healthy"],
    }


def test_rates_come_from_the_change_between_payloads() -> None:
    f = frame(stats(12.0, 60, 6000), stats(10.0, 20, 2000), title="m", url="u")
    assert f.requests_per_s == 20.0 and f.tokens_per_s == 2000.0
    assert f.predicted_rate == 0.7 and f.hit_rate == 0.75
    first = frame(stats(10.0, 20, 2000), None, title="m", url="u")
    assert first.requests_per_s == 0.0


def test_process_facts_fill_in_gpu_state_and_resources() -> None:
    facts = [
        ProcessFacts(0, "http://127.0.0.1:31000", "0,1", "healthy", 2, 55.0, 3 * 2**30),
        ProcessFacts(1, "http://127.0.0.1:31010", "2,3", "starting", 0, 5.0, 2**20),
    ]
    f = frame(stats(1, 0, 0), None, title="m", url="u", processes=facts)
    assert [(w.index, w.gpus, w.state, w.restarts) for w in f.workers] == [
        (0, "0,1", "healthy", 2),
        (1, "2,3", "starting", 0),
    ]


def test_a_failed_worker_shows_when_it_is_tried_again() -> None:
    facts = [ProcessFacts(0, "http://127.0.0.1:31000", "0", "failed", 5, 0.0, 0, 245.2)]
    f = frame(stats(1, 0, 0), None, title="m", url="u", processes=facts)
    console = Console(record=True, width=160, color_system=None)
    console.print(render(f))
    assert "failed, retry in 4:05" in console.export_text()
    assert state_text("healthy", None) == "healthy"


def test_helpers() -> None:
    assert human(999) == "999" and human(12_345) == "12.3 k" and human(5_600_000) == "5.6 M"
    assert duration(3725) == "1:02:05"
    assert bar(0, 8) == " " * 10 and bar(8, 8) == "█" * 10 and bar(4, 8) == "█" * 5 + " " * 5
    assert bar(100, 8) == "█" * 10


def test_render_draws_every_worker_and_the_header() -> None:
    payload = stats(1, 5, 50)
    payload["workers"].append(payload["workers"][0] | {"url": "http://127.0.0.1:31010"})
    f = frame(payload, None, title="Llama-3.1-8B", url="http://127.0.0.1:30000")
    console = Console(record=True, width=120, color_system=None)
    console.print(render(f))
    text = console.export_text()
    assert "Llama-3.1-8B" in text and "cache_aware" in text and "up 1:02:05" in text
    assert "31000" in text and "31010" in text and "75 %" in text and "12.3 k" in text
    assert "w0 is healthy" in text
    assert "1/1" not in status_line(f) and "2/2 workers healthy" in status_line(f)


def test_workers_on_ray_nodes_show_their_node_and_local_ones_no_node_column() -> None:
    facts = [
        ProcessFacts(
            0, "http://10.0.0.2:31000", "3", "healthy", 0, 1.0, 1, node="10.0.0.2 ab12cd34"
        )
    ]
    console = Console(record=True, width=160, color_system=None)
    console.print(render(frame(stats(1, 5, 50), None, title="m", url="u", processes=facts)))
    on_ray = console.export_text()
    assert "node" in on_ray and "10.0.0.2 ab12cd34" in on_ray
    console.print(render(frame(stats(1, 5, 50), None, title="m", url="u")))
    assert "node" not in console.export_text()
    rows = [StartupRow(0, "3", 31000, "starting", 1.0, node="10.0.0.2 ab12cd34")]
    console.print(startup_table(rows, "m"))
    assert "10.0.0.2 ab12cd34" in console.export_text()


def test_admission_control_and_open_breakers_show_in_the_header() -> None:
    payload = stats(1, 5, 50)
    payload["admission"] = {
        "in_flight": 32,
        "cap": 32,
        "waiting": 4,
        "queue_size": 16,
        "refused_full": 100,
        "refused_overloaded": 20,
        "timed_out": 3,
        "breakers": {"http://127.0.0.1:31000": "closed", "http://127.0.0.1:31010": "open"},
    }
    console = Console(record=True, width=160, color_system=None)
    console.print(render(frame(payload, None, title="m", url="u")))
    text = console.export_text()
    assert "admitted 32/32 · queue 4/16 · shed 123 (429 120 · 408 3)" in text
    assert "breakers open: 31010 (open)" in text
    console.print(render(frame(stats(1, 5, 50), None, title="m", url="u")))
    assert "admitted" not in console.export_text()  # a router without it: no line


def test_each_worker_says_whether_it_is_matched_on_events_or_the_tree() -> None:
    payload = stats(1, 5, 50, cache_view="events")
    second = payload["workers"][0] | {"url": "http://127.0.0.1:31010", "cache_view": "tree"}
    payload["workers"].append(second)
    payload["kv_events"] = {
        "mode": "auto",
        "workers": {
            "http://127.0.0.1:31000": {"trusted": True, "events_per_s": 12.4},
            "http://127.0.0.1:31010": {"trusted": False, "reason": "events 3..7 lost"},
        },
    }
    console = Console(record=True, width=200, color_system=None)
    console.print(render(frame(payload, None, title="m", url="u")))
    text = console.export_text()
    assert "events 12/s" in text and "tree: events 3..7 lost" in text
    del payload["kv_events"]
    console.print(render(frame(payload, None, title="m", url="u")))
    assert "view" not in console.export_text().split("events 12/s")[-1]
