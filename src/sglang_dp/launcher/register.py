"""Registration of this node's workers with a router elsewhere (`launch --no-router
--register-with URL`), so that one router can front several nodes.

A worker that becomes healthy is added with `POST {router}/workers {"url": ...}` (retried every
2 s while the router is unreachable or refuses); a worker whose URL is gone for good (failed,
moved to another port) is removed with `DELETE /workers?url=`; on shutdown every registered
worker is removed. A worker restarting on the same URL stays registered: the router's own health
checks take it out of routing and back. The admin key is sent as a Bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

RETRY_S = 2.0


class Registrar:
    def __init__(
        self, router_url: str, admin_key: str | None, on_event: Callable[[str], None]
    ) -> None:
        self._router = router_url.rstrip("/")
        self._headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._on_event = on_event
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.registered: set[str] = set()

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    def up(self, url: str) -> None:
        """Register `url` (in the background, retried until the router accepts it)."""
        if url not in self.registered and url not in self._tasks:
            self._tasks[url] = asyncio.ensure_future(self._register(url))

    def down(self, url: str, restarting: bool) -> None:
        if restarting:
            return  # same URL comes back: the router's health checks handle the gap
        task = self._tasks.pop(url, None)
        if task is not None:
            task.cancel()
        if url in self.registered:
            self._tasks[url] = asyncio.ensure_future(self._deregister(url))

    async def _register(self, url: str) -> None:
        import aiohttp

        while True:
            try:
                async with self._client().post(
                    self._router + "/workers", json={"url": url}, headers=self._headers
                ) as reply:
                    if reply.status in (200, 201):
                        self.registered.add(url)
                        self._tasks.pop(url, None)
                        self._on_event(f"{url} registered with {self._router}")
                        return
                    error = f"{reply.status} {(await reply.text())[:200]}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            self._on_event(f"registering {url} with {self._router} failed ({error}); retrying")
            await asyncio.sleep(RETRY_S)

    async def _deregister(self, url: str) -> None:
        import aiohttp

        self.registered.discard(url)
        self._tasks.pop(url, None)
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with self._client().delete(
                self._router + "/workers", params={"url": url}, headers=self._headers
            ) as reply:
                await reply.read()
        self._on_event(f"{url} deregistered from {self._router}")

    async def close(self) -> None:
        """Deregister every worker, then close the client."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await asyncio.gather(*(self._deregister(url) for url in list(self.registered)))
        if self._session is not None:
            await self._session.close()
