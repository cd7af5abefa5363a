"""The dashboard's refresh loop (shell): a rich Live redrawn about twice a second, or a plain
status line every few seconds when stdout is not a terminal (or the dashboard is off).

Frames come from an async `source()`: in `launch`, the router's stats in process plus the
supervisor's process facts; in `top`, the stats of a router anywhere, over HTTP. Drawing runs on
the event loop between requests and costs about a millisecond per frame for eight workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from rich.console import Console
from rich.live import Live

from sglang_dp.dashboard.render import Frame, ProcessFacts, frame, render, status_line

REFRESH_S = 0.5
PLAIN_EVERY_S = 5.0


class FrameSource:
    """Turns successive stats payloads into frames (keeps the previous one for rates)."""

    def __init__(
        self,
        stats: Callable[[], Awaitable[Mapping[str, Any]]],
        *,
        title: str,
        url: str,
        processes: Callable[[], list[ProcessFacts]] = list,
    ) -> None:
        self._stats = stats
        self._title = title
        self._url = url
        self._processes = processes
        self._previous: Mapping[str, Any] | None = None

    async def __call__(self) -> Frame:
        current = await self._stats()
        result = frame(
            current, self._previous, title=self._title, url=self._url, processes=self._processes()
        )
        if (
            self._previous is None
            or float(current.get("now", 0)) - float(self._previous.get("now", 0)) >= 1.0
        ):  # rates over at least a second: steadier figures
            self._previous = current
        return result


async def run_dashboard(
    source: Callable[[], Awaitable[Frame]], console: Console, *, live: bool
) -> None:
    """Draw until cancelled: a live dashboard, or plain status lines."""
    if not live:
        while True:
            await asyncio.sleep(PLAIN_EVERY_S)
            console.print(status_line(await source()), highlight=False, soft_wrap=True)
    with Live(render(await source()), console=console, auto_refresh=False) as screen:
        while True:
            await asyncio.sleep(REFRESH_S)
            screen.update(render(await source()), refresh=True)
