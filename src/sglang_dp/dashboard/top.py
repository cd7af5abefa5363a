"""`sglang-dp top`: poll a router's `/debug/stats` and draw the dashboard until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from rich.console import Console

from sglang_dp.admin import AdminClient, AdminError, print_error
from sglang_dp.dashboard.live import FrameSource, run_dashboard


async def _top(url: str, api_key: str | None, plain: bool, console: Console) -> None:
    async with AdminClient(url, api_key, timeout_s=5) as router:
        await router.call("GET", "/debug/stats")  # fail fast with a clear message

        async def stats() -> Mapping[str, Any]:
            data: Mapping[str, Any] = await router.call("GET", "/debug/stats")
            return data

        source = FrameSource(stats, title="remote router", url=url)
        await run_dashboard(source, console, live=not plain and console.is_terminal)


def run_top(url: str, api_key: str | None, plain: bool) -> int:
    console = Console()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_top(url, api_key, plain, console))
    except AdminError as exc:
        print_error(Console(stderr=True), str(exc))
        return 1
    return 0
