"""Discovered pods on the dashboard (`sglang-dp top` draws the router's /debug/stats)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from sglang_dp.dashboard.render import frame, render


def worker(url: str, state: str = "healthy") -> dict[str, Any]:
    return {"url": url, "state": state, "in_flight": 1, "routed": 5, "tree_size": 100}


def pod(name: str, worker: str | None, routed: bool = True, ready: bool = True) -> dict[str, Any]:
    return {"name": name, "namespace": "llm", "ip": "10.0.0.1", "phase": "Running",
            "ready": ready, "terminating": False, "routed": routed, "worker": worker}  # fmt: skip


def stats(state: str = "synced", error: str = "") -> dict[str, Any]:
    return {
        "policy": "cache_aware",
        "now": 10.0,
        "workers": [
            worker("http://10.0.0.1:30000"),
            worker("http://10.0.0.2:30000"),
            worker("http://127.0.0.1:31000"),
        ],
        "discovery": {
            "state": state,
            "last_error": error,
            "pods": [
                pod("sglang-a", "http://10.0.0.1:30000"),
                pod("sglang-b", "http://10.0.0.2:30000", routed=False, ready=False),
                pod("sglang-c", None, routed=False, ready=False),  # starting: no worker yet
            ],
        },
    }


def text(payload: dict[str, Any]) -> str:
    console = Console(record=True, width=200, color_system=None)
    console.print(render(frame(payload, None, title="m", url="http://r")))
    return console.export_text()


def test_discovered_workers_name_their_pods_and_held_ones_say_unready() -> None:
    rows = frame(stats(), None, title="m", url="http://r").workers
    assert [(r.pod, r.state) for r in rows] == [
        ("llm/sglang-a", "healthy"),
        ("llm/sglang-b", "unready"),
        ("", "healthy"),
    ]
    drawn = text(stats())
    assert "llm/sglang-a" in drawn and "(added by hand)" in drawn
    assert "pods 1/3 Ready · discovery synced" in drawn


def test_stale_discovery_is_shown_with_its_error() -> None:
    drawn = text(stats("stale", "cannot reach the API server"))
    assert "discovery stale: cannot reach the API server" in drawn


def test_without_discovery_nothing_changes() -> None:
    payload = stats()
    del payload["discovery"]
    assert "pod" not in text(payload).split("\n", 4)[3]
    assert all(r.pod == "" for r in frame(payload, None, title="m", url="http://r").workers)
