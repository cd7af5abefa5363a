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

from sglang_dp.admin import AdminClient, AdminError

RETRY_S = 2.0


class Registrar:
    def __init__(
        self, router_url: str, admin_key: str | None, on_event: Callable[[str], None]
    ) -> None:
        self._admin = AdminClient(router_url, admin_key, key_option="--admin-api-key")
        self._router = self._admin.url
        self._on_event = on_event
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.registered: set[str] = set()

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
        while True:
            try:
                await self._admin.call("POST", "/workers", json={"url": url})
            except AdminError as exc:
                self._on_event(f"registering {url} with {self._router} failed ({exc}); retrying")
                await asyncio.sleep(RETRY_S)
                continue
            self.registered.add(url)
            self._tasks.pop(url, None)
            self._on_event(f"{url} registered with {self._router}")
            return

    async def _deregister(self, url: str) -> None:
        self.registered.discard(url)
        self._tasks.pop(url, None)
        with contextlib.suppress(AdminError):
            await self._admin.call("DELETE", "/workers", params={"url": url})
        self._on_event(f"{url} deregistered from {self._router}")

    async def close(self) -> None:
        """Deregister every worker, then close the client."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await asyncio.gather(*(self._deregister(url) for url in list(self.registered)))
        await self._admin.close()
