"""Workers and the router wired together, with no screen: what `launch` and `bench --compare`
both run.

    plan (make_plan: GPUs, ports, argv; LaunchError before anything starts)
    Supervisor.start → wait_ready → RouterServer.start → supervise … → router.stop → supervisor.stop

Workers are spawned before the router is even imported (its imports take a few hundred ms that
the workers' own start-up hides), and the router listens while they load — `/readiness` says 503
until the first one is healthy. The supervisor tells the router when a worker is up
(`add_worker`) or down (`on_down(url, restarting)`: a worker that will come back at the same URL
leaves routing at once and loses its tree share; one that is gone for good — failed, moved to
another port, stopped — is removed). The router's health monitor is the one health checker: the
supervisor reads it (`health_of`) to restart a worker unhealthy for --unhealthy-restart-secs.
The cluster's `events` (an `EventLog`) is the router's too: one log from the first spawn on.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from sglang_dp.eventlog import EventLog
from sglang_dp.launcher.config import LaunchConfig
from sglang_dp.launcher.gpus import assign_gpus, detect_gpus, run_nvidia_smi
from sglang_dp.launcher.plan import KV_EVENTS_FLAG, WorkerSpec, WorkerTemplate, plan_workers
from sglang_dp.launcher.ports import busy_ports
from sglang_dp.launcher.preflight import (
    sglang_accepts_flag,
    sglang_accepts_nccl_port,
    sglang_importable,
)
from sglang_dp.launcher.process import (
    LogRotation,
    Spawner,
    find_leftovers,
    kill_leftovers,
    spawn_worker,
)
from sglang_dp.launcher.register import Registrar
from sglang_dp.launcher.supervisor import Supervisor, SupervisorSettings

if TYPE_CHECKING:
    from sglang_dp.router.health import WorkerHealth
    from sglang_dp.router.server import RouterServer


class LaunchError(Exception):
    """A problem found before anything started; the message says what to change."""


def make_plan(config: LaunchConfig) -> list[WorkerSpec]:
    """The workers to start, or a LaunchError naming the problem."""
    python = sys.executable
    try:
        gpus = None
        if not config.simulate:
            available = detect_gpus(config.gpus, os.environ, run_nvidia_smi)
            gpus = assign_gpus(available, config.dp, config.tp)
            if not sglang_importable(python):
                raise LaunchError(
                    f"sglang is not importable by {python}: install it (pip install sglang) "
                    "or use --simulate"
                )
        kv_events = config.kv_events and (
            config.simulate or sglang_accepts_flag(python, KV_EVENTS_FLAG)
        )
        specs = plan_workers(
            worker_template(config, python, os.environ, kv_events),
            dp=config.dp,
            gpus=gpus,
            base_port=config.base_port,
            log_dir=Path(config.log_dir),
            accepts_nccl_port=config.simulate or sglang_accepts_nccl_port(python),
            reserved_ports=[] if config.no_router else [config.router.port],
        )
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    _check_ports(config, specs)
    return specs


def worker_template(
    config: LaunchConfig, python: str, environ: Mapping[str, str], kv_events: bool
) -> WorkerTemplate:
    """What every worker of this launch shares, `python` and `kv_events` as found where the
    workers run (here, or on a Ray node)."""
    return WorkerTemplate(
        model_path=config.model,
        tp=config.tp,
        worker_args=config.all_worker_args,
        simulate=config.simulate,
        python=python,
        environ=environ,
        host=config.worker_host,
        kv_events=kv_events,
    )


def clear_leftovers(config: LaunchConfig) -> list[str]:
    """Processes an earlier launch with this log folder left running (its pids files say
    which): a LaunchError naming them, or with --kill-stale, killed (the lines say so)."""
    found = find_leftovers(Path(config.log_dir))
    if not found:
        return []
    pids = [pid for leftover in found for pid in leftover.pids]
    launchers = sorted({f.launcher for f in found if f.launcher and psutil.pid_exists(f.launcher)})
    running = (
        f" (its launcher, pid {', '.join(map(str, launchers))}, still runs)" if launchers else ""
    )
    files = ", ".join(str(f.pids_path) for f in found)
    if not config.kill_stale:
        raise LaunchError(
            f"{len(pids)} process(es) of an earlier launch with --log-dir {config.log_dir} still "
            f"run{running}: pid(s) {' '.join(map(str, pids))} (recorded in {files}). They may hold "
            "GPU memory and ports: stop them, or add --kill-stale to kill them."
        )
    survivors = [pid for f in found for pid in kill_leftovers(f.pids_path)]
    if survivors:
        raise LaunchError(
            f"could not kill pid(s) {' '.join(map(str, survivors))} of an earlier launch"
        )
    return [f"killed {len(pids)} process(es) left by an earlier launch: {' '.join(map(str, pids))}"]


def _check_ports(config: LaunchConfig, specs: list[WorkerSpec]) -> None:
    wanted = [] if config.no_router else [config.router.port]
    for spec in specs:
        wanted += [spec.port] + ([spec.nccl_port] if spec.nccl_port else [])
    busy = busy_ports(wanted, config.worker_host)
    if busy:
        raise LaunchError(
            f"port(s) {', '.join(map(str, busy))} already in use: choose another --port or "
            "--worker-base-port"
        )


class Cluster:
    """A supervisor and a router that follow each other; see the module docstring."""

    def __init__(
        self, config: LaunchConfig, specs: list[WorkerSpec], spawner: Spawner | None = None
    ) -> None:
        self.config = config
        self._router: RouterServer | None = None
        self.events = EventLog()  # the router's too, once it runs
        self._up_before_router: list[str] = []
        settings = SupervisorSettings(
            startup_timeout=config.startup_timeout_secs,
            max_restarts=config.max_restarts,
            unhealthy_restart=config.unhealthy_restart_secs,
            retry_failed=config.retry_failed_secs,
            keeps_urls=spawner is None,  # a given spawner (Ray's) picks each run's url
        )
        self.supervisor = Supervisor(
            specs,
            settings,
            on_event=self.events.record,
            on_up=self._worker_up,
            on_down=self._worker_down,
            spawner=spawner
            or spawn_worker(LogRotation(config.log_rotation_bytes, config.log_keep)),
            health=None if config.no_router else self,
        )
        self._supervising: asyncio.Task[None] | None = None
        self.registrar: Registrar | None = None
        if config.register_with:
            admin = config.router.admin_key
            self.registrar = Registrar(config.register_with, admin, self.events.record)
        self._hurry = asyncio.Event()

    @property
    def has_router(self) -> bool:
        return not self.config.no_router

    @property
    def router(self) -> RouterServer:
        assert self._router is not None, "start_router() first"
        return self._router

    def health_of(self, url: str) -> WorkerHealth | None:
        """The router's health record of a worker: the supervisor's one source of health."""
        return None if self._router is None else self._router.monitor.health_of(url)

    def _worker_up(self, url: str) -> None:
        if self.registrar is not None:
            self.registrar.up(url)
        if self._router is None:
            self._up_before_router.append(url)
        else:
            self._router.add_worker(url)

    def _worker_down(self, url: str, restarting: bool) -> None:
        if self.registrar is not None:
            self.registrar.down(url, restarting)
        if self._router is None:
            if url in self._up_before_router:
                self._up_before_router.remove(url)
        elif restarting:
            self._router.worker_down(url, "worker process exited")
        else:
            self._router.remove_worker(url)

    async def start_workers(self) -> None:
        """Spawn every worker (all at once)."""
        await self.supervisor.start()

    async def start_router(self) -> None:
        """Import, build and start the router; workers already up join it at once."""
        if not self.has_router:
            return
        from sglang_dp.router.server import RouterServer

        self._router = self._make_router(RouterServer)
        for url in self._up_before_router:
            self._router.add_worker(url)
        await self._router.start()

    def _make_router(self, server: type[RouterServer]) -> RouterServer:
        """The router, keyed on the workers' tokens when they publish KV events (its tokenizer
        failing to load — say, a hub name not in the local cache — falls back to characters,
        with the reason in the event log)."""
        config = self.config
        specs = self.supervisor.specs
        publishing = any(KV_EVENTS_FLAG in spec.argv for spec in specs)
        if config.kv_events and not publishing and specs:
            message = "this SGLang has no --kv-events-config: routing on the approximate tree"
            self.events.record(message)
        settings = config.router_settings(publishing)
        try:
            return server(settings, events=self.events)
        except (OSError, ValueError, ImportError) as exc:
            if settings == config.router_settings(False):
                raise
            self.events.record(f"KV events not used: the tokenizer did not load ({exc})")
            return server(config.router_settings(False), events=self.events)

    async def wait_ready(self, allow_partial: bool) -> list[str]:
        """Raises StartupFailed (with the log tail) when a worker cannot start."""
        ready = await self.supervisor.wait_ready(allow_partial)
        if self._router is not None:
            await self._router.monitor.check_now()  # routing starts with every worker up
        self._supervising = asyncio.ensure_future(self.supervisor.supervise())
        return ready

    @property
    def supervising(self) -> asyncio.Task[None] | None:
        """Ends (with AllWorkersFailed) if every worker has failed for good."""
        return self._supervising

    async def stop(self, grace: float) -> None:
        """Drain the router for up to `grace` s, then stop every worker. Idempotent.

        After hurry(), what is left of the grace is skipped (the drain, the workers' SIGTERM)."""
        if self._supervising is not None:
            self._supervising.cancel()
            await asyncio.gather(self._supervising, return_exceptions=True)
        router = self._router
        if router is not None:
            await self._unless_hurried(router.stop(grace), lambda: router.stop(0.0))
        if self.registrar is not None:
            await self.registrar.close()  # before the workers stop: no request is sent to them
        supervisor = self.supervisor
        await self._unless_hurried(supervisor.stop(min(grace, 10.0)), lambda: supervisor.stop(0))

    def hurry(self) -> None:
        """Skip what is left of the shutdown's grace (a second Ctrl-C)."""
        self._hurry.set()

    async def _unless_hurried(
        self, slow: Coroutine[Any, Any, None], fast: Callable[[], Awaitable[None]]
    ) -> None:
        task = asyncio.ensure_future(slow)
        hurried = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({task, hurried}, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await fast()
        else:
            task.result()
