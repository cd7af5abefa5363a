"""What `/debug/stats` serves is what `launch`'s dashboard draws in the same process."""

from __future__ import annotations

from rich.console import Console

from sglang_dp.dashboard.render import frame, render
from sglang_dp.router.app import router_stats
from sglang_dp.router.config import RouterConfig
from sglang_dp.router.server import RouterServer


def test_the_in_process_dashboard_shows_admission_control() -> None:
    """launch's dashboard used the engine's stats alone, so its header lacked the admission
    line that `sglang-dp top` (over /debug/stats) shows."""
    server = RouterServer(RouterConfig(worker_urls=("http://127.0.0.1:9",)))
    payload = router_stats(server.state)
    assert payload["admission"]["cap"] == 2048
    console = Console(record=True, width=140)
    console.print(render(frame(payload, None, title="m", url=server.url)))
    assert "admitted 0/2,048" in console.export_text()
