"""`sglang-dp launch`: the cluster (`cluster.Cluster`) with a screen and signal handling.

    leftovers of an earlier launch? → make_plan → start workers → progress table until healthy
      → router → dashboard … Ctrl-C / SIGTERM / SIGHUP
      → router drains for --shutdown-grace-secs → workers SIGTERM → SIGKILL what remains

The launcher is the child subreaper of everything it starts (each worker's shim already is of its
worker's tree; should a shim be killed, its orphans come here) and reaps what re-parents to it, so
no zombie stays behind even as PID 1 in a container. Leftovers of an earlier launch with the same
--log-dir (the pids files its shims left: a launcher killed while a shim was killed too) stop the
launch with their pids, unless --kill-stale kills them.

Signal handlers only set events: the first SIGINT, SIGTERM or SIGHUP (the terminal closed) starts
the shutdown, a second one skips what is left of the grace (the drain and the workers' SIGTERM
wait). While the dashboard is drawn, logging goes to `DIR/router.log`, rotated past --log-max-mb
(events also appear on the dashboard). The exit code is 0 after a requested shutdown, 1 when
workers could not start or all failed for good, 2 for a bad plan or leftovers (nothing started).
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from sglang_dp.admin import print_error
from sglang_dp.dashboard.live import FrameSource, run_dashboard
from sglang_dp.dashboard.render import ProcessFacts, StartupRow, startup_table
from sglang_dp.launcher.cluster import Cluster, LaunchError, clear_leftovers, make_plan
from sglang_dp.launcher.config import LaunchConfig
from sglang_dp.launcher.plan import WorkerSpec
from sglang_dp.launcher.process import Reaper, Spawner, become_subreaper
from sglang_dp.launcher.supervisor import AllWorkersFailed, StartupFailed, WorkerStatus


def _gpu_text(status: WorkerStatus) -> str:
    gpus = ",".join(map(str, status.gpus))
    return f"sim {gpus}" if status.simulated else gpus


def _startup_rows(statuses: tuple[WorkerStatus, ...], now: float) -> list[StartupRow]:
    return [
        StartupRow(s.index, _gpu_text(s), s.port, s.state, now - s.started_at, s.last_error, s.node)
        for s in statuses
    ]


def _process_facts(statuses: tuple[WorkerStatus, ...], now: float) -> list[ProcessFacts]:
    return [
        ProcessFacts(
            s.index, s.url, _gpu_text(s), s.state, s.restarts, s.cpu_percent, s.rss_bytes,
            None if s.retry_at is None else s.retry_at - now,
            node=s.node,
        )
        for s in statuses
    ]  # fmt: skip


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Launch:
    """One `launch`: the cluster, the screen, the signals."""

    def __init__(
        self,
        config: LaunchConfig,
        specs: list[WorkerSpec],
        console: Console,
        spawner: Spawner | None = None,
    ) -> None:
        self.config = config
        self.console = console
        self.cluster = Cluster(config, specs, spawner=spawner)
        self.stopping = asyncio.Event()
        self.forced = False

    def _on_signal(self) -> None:
        if self.stopping.is_set():
            self.forced = True
            self.cluster.hurry()
        self.stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal)
        reaping = asyncio.ensure_future(Reaper(self.cluster.supervisor.owns).run())
        try:
            await self.cluster.start_workers()
            await self.cluster.start_router()
            if not await self._wait_ready():
                return 1
            self._announce()
            return await self._serve()
        except StartupFailed as failure:  # e.g. a worker program that cannot be executed
            self._show_failure(failure)
            return 1
        finally:
            self.console.print(
                "stopping: draining requests in flight, then the workers (Ctrl-C again: now)"
            )
            await self.cluster.stop(0.0 if self.forced else self.config.shutdown_grace_secs)
            reaping.cancel()
            await asyncio.gather(reaping, return_exceptions=True)

    async def _wait_ready(self) -> bool:
        supervisor = self.cluster.supervisor
        waiting = asyncio.ensure_future(self.cluster.wait_ready(self.config.allow_partial))
        interrupted = asyncio.ensure_future(self.stopping.wait())
        with Live(console=self.console, auto_refresh=False) as screen:
            while True:
                rows = _startup_rows(supervisor.snapshot(), time.monotonic())
                screen.update(startup_table(rows, self.config.model), refresh=True)
                if waiting.done() or interrupted.done():
                    break
                await asyncio.wait({waiting, interrupted}, timeout=0.25)
        interrupted.cancel()
        if not waiting.done():
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            self.console.print("interrupted while the workers were starting")
            return False
        try:
            waiting.result()
        except StartupFailed as failure:
            self._show_failure(failure)
            return False
        return True

    def _show_failure(self, failure: StartupFailed) -> None:
        self.console.print(
            f"[bold red]worker {failure.index} failed to start:[/] {failure.reason}",
            highlight=False,
        )
        for line in failure.log_tail:
            self.console.print(f"  {line}", highlight=False, markup=False, style="dim")
        if failure.index >= 0:
            path = Path(self.config.log_dir) / f"worker-{failure.index}.log"
            self.console.print(f"full log: {path}", highlight=False)

    def _announce(self) -> None:
        if not self.cluster.has_router:
            target = self.config.register_with or "no router (--no-router)"
            self.console.print(
                f"\n[bold green]ready[/]: {self.config.dp} workers on {self.config.worker_host}, "
                f"registered with {target}   (logs in {self.config.log_dir}/)\n",
                highlight=False,
                soft_wrap=True,
            )
            return
        router = self.cluster.router
        self.console.print(
            f"\n[bold green]ready[/]: {len(router.engine.healthy_workers())} workers behind "
            f"{router.url}   (logs in {self.config.log_dir}/)\n"
            f"  curl {router.url}/v1/chat/completions -H 'content-type: application/json' \\\n"
            f'    -d \'{{"model": "{self.config.model}", "messages": '
            f'[{{"role": "user", "content": "Hello"}}]}}\'\n',
            highlight=False,
            soft_wrap=True,
        )

    def _frames(self) -> FrameSource:
        supervisor = self.cluster.supervisor
        processes = lambda: _process_facts(supervisor.snapshot(), time.monotonic())  # noqa: E731
        if not self.cluster.has_router:

            async def node_only() -> Mapping[str, Any]:
                return {"policy": "no router", "now": time.monotonic(),
                        "events": self.cluster.events.recent()}  # fmt: skip

            target = self.config.register_with or "-"
            return FrameSource(node_only, title=self.config.model, url=target, processes=processes)
        from sglang_dp.router.app import router_stats  # the router runs in this process

        router = self.cluster.router

        async def stats() -> Mapping[str, Any]:
            return router_stats(router.state)

        return FrameSource(stats, title=self.config.model, url=router.url, processes=processes)

    async def _serve(self) -> int:
        source = self._frames()
        live = self.config.dashboard and self.console.is_terminal
        drawing = asyncio.ensure_future(run_dashboard(source, self.console, live=live))
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self.stopping.wait())}
        if self.cluster.supervising is not None:
            waits.add(self.cluster.supervising)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        drawing.cancel()
        await asyncio.gather(drawing, return_exceptions=True)
        return self._exit_code()

    def _exit_code(self) -> int:
        supervising = self.cluster.supervising
        if supervising is not None and supervising.done() and not supervising.cancelled():
            error = supervising.exception()
            if isinstance(error, AllWorkersFailed):
                print_error(self.console, str(error), "every worker failed")
                return 1
        return 0


def setup_logging(config: LaunchConfig) -> None:
    Path(config.log_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        Path(config.log_dir) / "router.log",
        maxBytes=config.log_rotation_bytes,
        backupCount=config.log_keep,
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(config.router.log_level.upper())


def run_launch(config: LaunchConfig) -> int:
    """The `launch` command: returns the process exit code."""
    console = Console()
    if config.ray is not None:
        from sglang_dp.launcher.ray_cluster import run_ray_launch

        return run_ray_launch(
            config, console, lambda specs, spawner: serve(config, specs, console, spawner)
        )
    become_subreaper()
    try:
        for line in clear_leftovers(config):
            console.print(line, highlight=False)
        specs = make_plan(config)
    except LaunchError as exc:
        print_error(console, str(exc))
        return 2
    return serve(config, specs, console)


def serve(
    config: LaunchConfig, specs: list[WorkerSpec], console: Console, spawner: Spawner | None = None
) -> int:
    """Run the launch of `specs` (spawned by `spawner`, else locally) until it is stopped."""
    import uvloop

    setup_logging(config)
    return uvloop.run(Launch(config, specs, console, spawner=spawner).run())
