"""Background health checks: workers join routing when healthy and leave it when they are not.

This monitor is the one health checker of a worker: the router routes by it, and the launcher's
supervisor reads it (`health_of(url)`: state, since when, last error) to restart a worker that
stays unhealthy. `probe()` is the one HTTP health probe, also used by the supervisor while a
worker starts (/health, then /get_model_info).

Every `health_check_interval_secs` (5 s) each registered worker gets `GET /health` (timeout
`health_check_timeout_secs`), as SGLang's own router does. On SGLang an idle worker answers
/health by generating one token: at one check per 5 s that costs nothing worth counting
(`/health_generate`, which always generates, is not used). States:

    starting ──ok──▶ healthy ──fail×2 / refused──▶ unhealthy ──ok──▶ healthy
                                                     (was refused: restarted → empty tree share)

- One failed check is tolerated (a busy worker can be slow); a refused connection is not: the
  process is gone. The proxy reports connect errors at once (`report_failure`), so a dead worker
  leaves routing before the next round.
- A worker that comes back after refusing connections has restarted: its cache is empty, so its
  share of the tree is dropped (`engine.reset_worker`).
- On becoming healthy the worker's KV capacity is read from `/get_server_info`
  (`max_total_num_tokens`) and bounds its share of the tree; the whole answer goes to
  `on_server_info` (the router follows the worker's KV events from there: `kv_view`).
Load counters are never touched by health checks (sgl-router reset them there, and leaked).
`since` is the time (the injected `clock`) of a worker's last change of state, `failing_since`
that of the first of the failed checks in a row (None while it passes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sglang_dp.router.auth import bearer_header
from sglang_dp.router.engine import RoutingEngine

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("sglang_dp.router")

FAILURES_BEFORE_DOWN = 2


@dataclass
class WorkerHealth:
    url: str
    state: str = "starting"  # starting | healthy | unhealthy
    failures: int = 0
    refused: bool = False  # the last failure was a refused connection: the process is gone
    last_error: str = ""
    capacity_known: bool = False
    since: float = 0.0  # when it entered its state
    failing_since: float | None = None  # the first of the failures in a row; None when passing
    held: bool = False  # kept out of routing whatever its health (service discovery: pod unready)


@dataclass(frozen=True)
class Probe:
    """One probe's outcome: `refused` means nothing listens (the process is gone or not yet up);
    `status` is the HTTP status, 0 when none came back."""

    ok: bool
    refused: bool
    status: int
    error: str


async def probe(
    session: aiohttp.ClientSession, base: str, path: str, headers: Mapping[str, str] | None = None
) -> Probe:
    """GET `base + path`: ok on 200 (the session's timeout bounds it)."""
    import aiohttp

    try:
        async with session.get(base + path, headers=dict(headers or {})) as reply:
            await reply.read()
            status = reply.status
    except aiohttp.ClientConnectorError as exc:
        return Probe(False, True, 0, f"connection refused ({exc.os_error})")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return Probe(False, False, 0, f"{path} failed: {type(exc).__name__} {exc}".strip())
    return Probe(status == 200, False, status, "" if status == 200 else f"{path} answered {status}")


class WorkerMonitor:
    """Checks workers' health and tells the engine who may take requests (with no engine, as
    the launcher's supervisor runs it without a router: health only, capacity never read)."""

    def __init__(
        self,
        engine: RoutingEngine | None,
        *,
        interval: float,
        timeout: float,
        api_key: str | None = None,
        on_event: Callable[[str], None] = lambda message: None,
        clock: Callable[[], float] = time.monotonic,
        on_server_info: Callable[[str, dict[str, Any]], None] = lambda url, info: None,
    ) -> None:
        self._engine = engine
        self._on_server_info = on_server_info
        self._clock = clock
        self._interval = interval
        self._timeout = timeout
        self._headers = bearer_header(api_key)
        self._on_event = on_event
        self.workers: dict[str, WorkerHealth] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        """Start checking in the background (the first round: `check_now`, or within a tick)."""
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def add(self, url: str) -> None:
        """Register a worker; it takes requests once a health check passes."""
        if url not in self.workers:
            self.workers[url] = WorkerHealth(url, since=self._clock())
            if self._engine is not None:
                self._engine.add_worker(url, healthy=False)
            self._wake.set()

    def remove(self, url: str) -> None:
        if self.workers.pop(url, None) is not None and self._engine is not None:
            self._engine.remove_worker(url)

    def hold(self, url: str, held: bool) -> None:
        """Keep a worker out of routing (its tree share kept) whatever its health checks say,
        or let it back in (when healthy): service discovery's pod that is not Ready."""
        health = self.workers.get(url)
        if health is not None and health.held != held:
            health.held = held
            if self._engine is not None:
                self._engine.set_healthy(url, not held and health.state == "healthy")

    def report_failure(self, url: str, error: str, refused: bool) -> None:
        """The proxy could not reach a worker: take it out of routing now."""
        health = self.workers.get(url)
        if health is not None:
            self._fail(health, error, refused, immediately=True)
            self._wake.set()

    def health_of(self, url: str) -> WorkerHealth | None:
        """The worker's health record (None if not registered); do not modify it."""
        return self.workers.get(url)

    async def check_now(self) -> None:
        """One round of checks (also what the background task runs every interval)."""
        await asyncio.gather(*(self._check(h) for h in list(self.workers.values())))

    async def _run(self) -> None:
        """A round every interval, or at once when a worker is added or reported down."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self.check_now()

    async def _check(self, health: WorkerHealth) -> None:
        assert self._session is not None
        asked = self._clock()
        result = await probe(self._session, health.url, "/health", self._headers)
        if health.url not in self.workers:
            return  # removed while checking
        if result.ok:
            await self._succeed(health)
        else:  # unresponsive since it was asked, not since the probe gave up on it
            self._fail(health, result.error, refused=result.refused, at=asked)

    async def _succeed(self, health: WorkerHealth) -> None:
        if health.state != "healthy":
            if health.refused and health.state == "unhealthy":
                if self._engine is not None:
                    self._engine.reset_worker(health.url)
                self._on_event(f"{health.url} is back after a restart: its cache is empty")
            else:
                self._on_event(f"{health.url} is healthy")
            health.state, health.failures, health.refused = "healthy", 0, False
            health.since = self._clock()
            if self._engine is not None and not health.held:
                self._engine.set_healthy(health.url, True)
        health.failures = 0
        health.failing_since = None
        if self._engine is not None and not health.capacity_known:
            await self._read_capacity(health)

    def _fail(
        self,
        health: WorkerHealth,
        error: str,
        refused: bool,
        immediately: bool = False,
        at: float | None = None,
    ) -> None:
        health.failures += 1
        if health.failing_since is None:
            health.failing_since = self._clock() if at is None else at
        health.last_error = error
        health.refused = health.refused or refused
        down = refused or immediately or health.failures >= FAILURES_BEFORE_DOWN
        if down and health.state == "healthy":
            self._on_event(f"{health.url} left routing: {error}")
        if down and health.state != "unhealthy":
            health.state = "unhealthy"
            health.since = self._clock()
            health.capacity_known = False
            if self._engine is not None:
                self._engine.set_healthy(health.url, False)

    async def _read_capacity(self, health: WorkerHealth) -> None:
        import aiohttp

        assert self._session is not None and self._engine is not None
        try:
            async with self._session.get(
                health.url + "/get_server_info", headers=self._headers
            ) as reply:
                info = await reply.json(content_type=None) if reply.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError):
            return
        if not isinstance(info, dict):
            info = {}
        tokens = info.get("max_total_num_tokens")
        if isinstance(tokens, int) and tokens > 0:
            self._engine.set_capacity(health.url, tokens)
        health.capacity_known = True
        self._on_server_info(health.url, info)
