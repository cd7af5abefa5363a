"""`sglang-dp top`: poll a router's `/debug/stats` and draw the dashboard until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console

from sglang_dp.dashboard.live import FrameSource, run_dashboard

if TYPE_CHECKING:
    import aiohttp


class RouterUnreachable(Exception):
    """The router did not answer, or refused the key; the message says which."""


async def fetch_stats(
    session: aiohttp.ClientSession, url: str, api_key: str | None
) -> Mapping[str, Any]:
    import aiohttp

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with session.get(url + "/debug/stats", headers=headers) as reply:
            if reply.status == 401:
                raise RouterUnreachable(f"{url} refused the API key (pass --api-key)")
            if reply.status != 200:
                raise RouterUnreachable(f"{url}/debug/stats answered {reply.status}")
            data: Mapping[str, Any] = await reply.json(content_type=None)
            return data
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise RouterUnreachable(f"cannot reach a router at {url}: {reason}") from None


async def _top(url: str, api_key: str | None, plain: bool, console: Console) -> None:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        await fetch_stats(session, url, api_key)  # fail fast with a clear message

        async def stats() -> Mapping[str, Any]:
            return await fetch_stats(session, url, api_key)

        source = FrameSource(stats, title="remote router", url=url)
        await run_dashboard(source, console, live=not plain and console.is_terminal)


def run_top(url: str, api_key: str | None, plain: bool) -> int:
    console = Console()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_top(url, api_key, plain, console))
    except RouterUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
