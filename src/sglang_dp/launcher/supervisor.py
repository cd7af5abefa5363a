"""Start the workers, wait until they serve, keep them running, stop them (shell, asyncio).

One task per worker runs its life cycle; the caller sees states, events and two callbacks:

    spawn ─▶ starting ─(HTTP answers)─▶ loading ─(/health 200 and /get_model_info 200)─▶ healthy
                │                          │                                on_up(url)  │  ▲
                └──── exits / startup_timeout ─────┐             /health fails twice ▼  │ ok
                                                   │                               unhealthy
                          exits ◀──────────────────┼─────────────────────────────────┘
                            │  on_down(url, restarted) if it had been up
                            ▼
         restarting: sleep backoff_base × 2^n (cap backoff_cap), n = restarts in a row
                            │ n < max_restarts                   n = max_restarts ─▶ failed
                            └─▶ spawn again (on the next free port band when its log says      │
                                "address already in use": its url changes)   retry_failed s ◀─┘
                                                                             later (0: never)

- Readiness: GET /health == 200 and GET /get_model_info == 200, polled every
  `startup_poll_interval` (0.1 s: readiness is seen at once), with the worker's `--api-key` if
  its argv has one. A worker not ready `startup_timeout` s after its spawn is terminated
  (`kill_grace`, 5 s) and counts as exited. Every probe (timeout `probe_timeout`, 5 s) is
  abandoned the moment the process exits, so an exit is seen at once.
- While it runs: the supervisor does not probe it. One health checker watches each worker, the
  router's (router.health.WorkerMonitor, `health`, read every `health_interval`, 0.5 s); without
  one the supervisor runs its own WorkerMonitor (checks every `check_interval`, 5 s). The state
  shown follows the monitor's (unhealthy / healthy again). A worker unhealthy and failing its
  checks for `unhealthy_restart` s in a row (0: never) is restarted like a crash, without a
  backoff (a hung collective, a wedged scheduler): its tree is stopped (SIGKILL after
  HUNG_KILL_GRACE_S, 1 s) and on_down(url, True) fails its requests over.
- on_up(url) / on_down(url, restarted) come in pairs: on_down only follows an on_up. `restarted`
  is True when the same url will come back (with an empty cache), False when this url is gone
  (failed for good, moved to another port, or stop()). on_up may come before wait_ready returns.
- Every run ends with nothing of it left: its shim reports the exit only once the whole tree is
  gone (terminate() again kills what a killed shim left), and the next run starts only once its
  ports are free (a port still taken after `ports_free_wait` s is another program's: it moves).
- Backoff: `backoff_base` (0.5 s) × 2^n, capped at `backoff_cap` (30 s), n = restarts in a row.
  After `max_restarts` in a row a worker is failed; with `retry_failed` > 0 it is tried again
  every `retry_failed` s (its status says when: `retry_at`), and supervise() never gives up.
  A worker that had been healthy for `stable_after` s (60) when it exited starts a new row: its
  budget of `max_restarts` and its backoff come back. `restarts` in the status counts them all.
- First start: start() spawns every worker; a program that cannot be executed at all is a
  StartupFailed from start() (the others are stopped). Then, without allow_partial, an exit or a
  timeout before the first readiness is final: wait_ready raises StartupFailed with the worker's
  last log lines (the caller stops everything); except "address already in use", a race with
  another program rather than a broken worker: it moves and is restarted. With allow_partial (or
  supervise() without wait_ready) it is restarted like any crash; wait_ready raises only when
  every worker has failed for good.
- `stop(grace)`: on_down for every worker that is up, cancel the life-cycle tasks, then
  SIGTERM every process group at once, wait up to `grace`, SIGKILL what remains. Idempotent; a
  second call with a shorter grace escalates sooner.
- CPU and memory: of each worker's whole process tree (launcher/usage.py), sampled when
  `snapshot()` is called, at most once a second, for a worker whose handle has a `pids_path`.
- Times (`started_at`, `ready_at`, the startup timeout) come from the injected `clock`.
- Every setting named above is a field of `SupervisorSettings` (with the defaults given here;
  `startup_timeout` and `max_restarts` have none: the launch's options decide them).
- `spawner` (default `WorkerProcess.spawn`) starts one run of a worker from its spec and returns
  a `WorkerHandle`; the handle's `spec` (where it really listens) replaces the worker's. With
  `keeps_urls=False` (a spawner that chooses the url itself, as on Ray) on_down always says
  restarted=False: nobody can promise the next run's url.

Exceptions:

    SupervisorError
     ├── StartupFailed      a worker could not start: index, reason, log_tail
     └── AllWorkersFailed   supervise(): every worker has failed for good
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sglang_dp.launcher.plan import WorkerSpec, api_key_from_args, spare_ports, with_ports
from sglang_dp.launcher.ports import busy_ports, is_local_address
from sglang_dp.launcher.process import Spawner, WorkerHandle, spawn_worker
from sglang_dp.launcher.usage import TreeUsage
from sglang_dp.router.auth import bearer_header
from sglang_dp.router.health import WorkerHealth, WorkerMonitor, probe

if TYPE_CHECKING:
    import aiohttp

STATES = ("starting", "loading", "healthy", "unhealthy", "restarting", "stopped", "failed")
TAIL_LINES = 20
ADDRESS_IN_USE = ("address already in use", "eaddrinuse", "errno 98")
SAMPLE_INTERVAL_S = 1.0
HUNG = "failing health checks for"
HUNG_KILL_GRACE_S = 1.0  # a worker unresponsive for long gets little time to obey SIGTERM
PORTS_FREE_WAIT_S = 5.0  # after a worker's tree is gone, how long its ports may stay taken
PORTS_POLL_S = 0.1

# probe results
DOWN, LOADING, READY = "down", "loading", "ready"


class HealthReader(Protocol):
    """Where the supervisor reads a worker's health: the router's WorkerMonitor."""

    def health_of(self, url: str) -> WorkerHealth | None: ...


class SupervisorError(Exception):
    """Base of the supervisor's errors (tree in the module docstring)."""


class StartupFailed(SupervisorError):
    """Worker `index` could not start; `log_tail` holds its last log lines."""

    def __init__(self, index: int, reason: str, log_tail: Sequence[str]) -> None:
        super().__init__(f"worker {index} failed to start: {reason}")
        self.index = index
        self.reason = reason
        self.log_tail = list(log_tail)


class AllWorkersFailed(SupervisorError):
    """Every worker exhausted its restarts."""


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as the dashboard shows it (times are the supervisor's clock)."""

    index: int
    gpus: tuple[int, ...]
    port: int
    url: str
    state: str  # one of STATES
    pid: int | None  # None when no process runs
    restarts: int
    started_at: float  # spawn of the current (or last) process
    ready_at: float | None  # when the current process became healthy
    last_error: str
    cpu_percent: float  # whole process tree; 100 = one core
    rss_bytes: int
    simulated: bool = False
    log_path: Path | None = None
    retry_at: float | None = None  # failed, tried again at this time
    node: str = ""  # the Ray node ("" for a local worker)


@dataclass
class _Worker:
    """The supervisor's mutable record of one worker."""

    spec: WorkerSpec
    proc: WorkerHandle | None = None
    exited: asyncio.Future[int] | None = None  # the current process's wait()
    state: str = "starting"
    restarts: int = 0
    streak: int = 0  # restarts since it was last stable
    started_at: float = 0.0
    ready_at: float | None = None
    ever_ready: bool = False
    up: bool = False  # on_up called, on_down not yet
    last_error: str = ""
    usage: TreeUsage = field(default_factory=TreeUsage)
    retry_at: float | None = None

    @property
    def headers(self) -> dict[str, str]:
        return bearer_header(api_key_from_args(self.spec.argv))


@dataclass(frozen=True)
class _Ended:
    """How one run of a worker ended (its process is gone)."""

    reason: str
    log_tail: list[str]
    port_in_use: bool
    hung: bool = False  # stopped for staying unhealthy: restarted without a backoff


@dataclass(frozen=True)
class SupervisorSettings:
    """The supervisor's settings, times in seconds (the module docstring says what each does)."""

    startup_timeout: float
    max_restarts: int
    unhealthy_restart: float = 0.0  # 0: never
    retry_failed: float = 0.0  # 0: never
    health_interval: float = 0.5  # reading the health checker's view
    check_interval: float = 5.0  # the supervisor's own checker's, when no router's is given
    startup_poll_interval: float = 0.1
    probe_timeout: float = 5.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    stable_after: float = 60.0
    kill_grace: float = 5.0  # for a worker that timed out at start-up
    keeps_urls: bool = True  # False: the spawner picks each run's url (Ray's)
    ports_free_wait: float = PORTS_FREE_WAIT_S


class Supervisor:
    """Runs a fixed set of workers (see the module docstring)."""

    def __init__(
        self,
        specs: list[WorkerSpec],
        settings: SupervisorSettings,
        *,
        on_event: Callable[[str], None],
        on_up: Callable[[str], None],
        on_down: Callable[[str, bool], None],
        spawner: Spawner | None = None,
        health: HealthReader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._workers = [_Worker(spec) for spec in specs]
        self._settings = settings
        self._spawner = spawner or spawn_worker()
        self._on_event = on_event
        self._on_up = on_up
        self._on_down = on_down
        self._clock = clock
        self._own_monitor: WorkerMonitor | None = None
        if health is None:
            self._own_monitor = WorkerMonitor(
                None,
                interval=settings.check_interval,
                timeout=settings.probe_timeout,
                api_key=api_key_from_args(specs[0].argv) if specs else None,
            )
        self._health: HealthReader = health or self._own_monitor  # type: ignore[assignment]
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()  # any state change: wakes wait_ready and supervise
        self._policy_known = asyncio.Event()  # wait_ready or supervise said how to treat a
        self._partial = False  # ... first start that fails: restart it (partial) or give up
        self._failures: list[StartupFailed] = []
        self._crash: BaseException | None = None
        self._stopping = False
        self._sampled_at = float("-inf")

    # ------------------------------------------------------------------ public

    @property
    def specs(self) -> tuple[WorkerSpec, ...]:
        """The workers' current specs (a worker moved off a busy port has a new one)."""
        return tuple(w.spec for w in self._workers)

    async def start(self) -> None:
        """Spawn every worker at once; StartupFailed (nothing left running) if one cannot be."""
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.probe_timeout)
        )
        if self._own_monitor is not None:
            await self._own_monitor.start()
        spawned = await asyncio.gather(
            *(self._spawn(w) for w in self._workers), return_exceptions=True
        )
        for w, outcome in zip(self._workers, spawned):
            if isinstance(outcome, BaseException):
                w.last_error = f"cannot start: {outcome}"
                self._set_state(w, "failed")
                await self.stop(grace=0)
                raise StartupFailed(w.spec.index, w.last_error, [])
        for w in self._workers:
            task = asyncio.get_running_loop().create_task(self._lifecycle(w))
            task.add_done_callback(self._task_done)
            self._tasks.append(task)

    async def wait_ready(self, allow_partial: bool) -> list[str]:
        """Urls of the workers up: all of them, or (allow_partial) at least one.

        StartupFailed: see the module docstring; index -1 if stop() is called meanwhile.
        """
        self._partial = allow_partial
        self._policy_known.set()
        while True:
            self._changed.clear()
            self._raise_if_crashed()
            if self._stopping:
                raise StartupFailed(-1, "stopped before the workers were ready", [])
            up = [w.spec.url for w in self._workers if w.up]
            if allow_partial:
                if up:
                    return up
                if self._all_failed():
                    raise self._failures[-1]
            else:
                if self._failures:
                    raise self._failures[0]
                if all(w.ever_ready for w in self._workers):
                    return up
            await self._changed.wait()

    async def supervise(self) -> None:
        """Keep the workers running until stop(); AllWorkersFailed if every one fails."""
        if not self._policy_known.is_set():
            self._partial = True
            self._policy_known.set()
        while True:
            self._changed.clear()
            self._raise_if_crashed()
            if self._stopping:
                return
            if self._all_failed() and not self._settings.retry_failed:
                raise AllWorkersFailed(f"all {len(self._workers)} workers have failed")
            await self._changed.wait()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop every worker: TERM the groups, wait up to `grace` s, KILL what remains."""
        self._stopping = True
        self._policy_known.set()
        self._notify()
        for w in self._workers:
            self._down(w, restarted=False)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop_worker(w, grace) for w in self._workers))
        if self._session is not None:
            await self._session.close()
        if self._own_monitor is not None:
            await self._own_monitor.stop()

    def owns(self, pid: int) -> bool:
        """Whether `pid` is one of the worker processes (whose exit the supervisor awaits)."""
        return any(w.proc is not None and w.proc.pid == pid for w in self._workers)

    def snapshot(self) -> tuple[WorkerStatus, ...]:
        """Every worker's status (CPU and memory refreshed at most once a second)."""
        now = self._clock()
        if now - self._sampled_at >= SAMPLE_INTERVAL_S:
            self._sampled_at = now
            for w in self._workers:
                _sample_usage(w, now)
        return tuple(_status(w) for w in self._workers)

    # ------------------------------------------------------------------ life cycle

    async def _lifecycle(self, w: _Worker) -> None:
        while True:
            ended = await self._run(w)
            ended = await self._nothing_left(w, ended)
            if await self._restart_decided(w, ended):
                await self._backoff(w, ended)
            elif (
                self._settings.retry_failed
                and (w.ever_ready or self._partial)
                and not self._stopping
            ):
                await self._retry_later(w)
            else:
                return
            if ended.port_in_use:
                self._move(w)
            w.restarts += 1
            w.streak += 1
            w.proc, w.ready_at = None, None  # a spawn that fails must not look like a stable run

    async def _run(self, w: _Worker) -> _Ended:
        """One run: spawn (unless start() did), wait until ready, watch until it exits."""
        if w.proc is None:
            try:
                await self._spawn(w)
            except OSError as exc:
                return _Ended(f"cannot start: {exc}", [], port_in_use=False)
        reason = await self._until_ready(w)
        served = reason is None
        if reason is None:
            self._became_ready(w)
            reason = await self._watch(w)
        assert w.proc is not None
        tail = w.proc.log_tail(TAIL_LINES)
        w.last_error = reason
        # Ports are bound while starting: a worker that served had its ports.
        in_use = not served and any(m in line.lower() for line in tail for m in ADDRESS_IN_USE)
        return _Ended(reason, tail, port_in_use=in_use, hung=reason.startswith(HUNG))

    async def _nothing_left(self, w: _Worker, ended: _Ended) -> _Ended:
        """Make sure nothing of the run is left and its ports are free before anything else:
        a port still taken after that is another program's, so the worker moves."""
        if w.proc is not None:
            await w.proc.terminate(
                self._settings.kill_grace
            )  # at once: it has exited; kills leftovers
        if ended.port_in_use or await self._ports_freed(w.spec):
            return ended
        return dataclasses.replace(ended, port_in_use=True)

    async def _ports_freed(self, spec: WorkerSpec) -> bool:
        ports = [p for p in (spec.port, spec.nccl_port) if p]
        if not ports or not is_local_address(spec.host):
            return True  # another node's ports (a remote spawner's): its own business
        deadline = self._clock() + self._settings.ports_free_wait
        while busy_ports(ports, spec.host):
            if self._clock() >= deadline:
                return False
            await asyncio.sleep(PORTS_POLL_S)
        return True

    async def _spawn(self, w: _Worker) -> None:
        w.proc = await self._spawner(w.spec)
        w.spec = w.proc.spec
        w.exited = asyncio.ensure_future(w.proc.wait())
        w.started_at, w.ready_at = self._clock(), None
        w.usage.forget_tree()
        self._set_state(w, "starting")

    async def _until_ready(self, w: _Worker) -> str | None:
        """None once the worker is ready, else why it never will be (it is gone then)."""
        assert w.proc is not None and w.exited is not None
        while not w.exited.done():
            if self._clock() - w.started_at > self._settings.startup_timeout:
                await w.proc.terminate(self._settings.kill_grace)
                return f"not ready after {self._settings.startup_timeout:g} s (still {w.state})"
            probed = await self._probe_while_alive(w)
            if probed is None:
                break
            if probed[0] == READY:
                return None
            self._set_state(w, "loading" if probed[0] == LOADING else "starting")
            await asyncio.wait([w.exited], timeout=self._settings.startup_poll_interval)
        return f"{_describe_exit(w.exited.result())} while {w.state}"

    async def _watch(self, w: _Worker) -> str:
        """Follow a ready worker's health (the monitor's) until its process exits, or until it
        has been unhealthy for `unhealthy_restart` s (it is stopped then); why it ended."""
        assert w.exited is not None and w.proc is not None and w.ready_at is not None
        wait = self._settings.health_interval
        while True:
            await asyncio.wait([w.exited], timeout=wait)
            wait = self._settings.health_interval
            if w.exited.done():
                return _describe_exit(w.exited.result())
            view = self._health.health_of(w.spec.url)
            if view is None or view.since < w.ready_at:
                continue  # not checked since this run became ready: it says nothing of it
            if view.state == "healthy" and w.state == "unhealthy":
                self._event(w, "healthy again")
                self._set_state(w, "healthy")
            elif view.state == "unhealthy":
                if w.state != "unhealthy":
                    w.last_error = view.last_error
                    self._set_state(w, "unhealthy")
                    self._event(w, f"unhealthy: {view.last_error}")
                for_s = self._clock() - max(view.failing_since or view.since, w.ready_at)
                if self._settings.unhealthy_restart and for_s >= self._settings.unhealthy_restart:
                    reason = f"{HUNG} {for_s:.0f} s ({view.last_error})"
                    self._event(w, f"{reason}: stopping it to restart it")
                    await w.proc.terminate(min(self._settings.kill_grace, HUNG_KILL_GRACE_S))
                    return reason
                if self._settings.unhealthy_restart:  # look again when its time is up, not later
                    wait = min(wait, max(0.01, self._settings.unhealthy_restart - for_s))

    def _became_ready(self, w: _Worker) -> None:
        w.ready_at = self._clock()
        w.ever_ready = w.up = True
        self._set_state(w, "healthy")
        self._event(w, f"healthy on {w.spec.url} after {w.ready_at - w.started_at:.1f} s")
        if self._own_monitor is not None:
            self._own_monitor.add(w.spec.url)
        self._on_up(w.spec.url)

    async def _restart_decided(self, w: _Worker, ended: _Ended) -> bool:
        """Report the exit; True if the worker is to be restarted."""
        if w.ready_at is not None and self._clock() - w.ready_at >= self._settings.stable_after:
            w.streak = 0  # it ran stably: the restart budget and the backoff start over
        if not w.ever_ready and not ended.port_in_use:
            await self._policy_known.wait()  # restart a failed first start only if partial
            if not self._partial:
                self._fail(w, ended, ended.reason)
                return False
        again = w.streak < self._settings.max_restarts and not self._stopping
        self._down(w, restarted=again and not ended.port_in_use and self._settings.keeps_urls)
        if not again:
            self._fail(w, ended, f"{ended.reason}; gave up after {w.streak} restarts in a row")
        return again

    async def _retry_later(self, w: _Worker) -> None:
        """A failed worker waits `retry_failed` s, then is tried once more."""
        w.retry_at = self._clock() + self._settings.retry_failed
        self._event(w, f"trying it again in {self._settings.retry_failed:g} s")
        self._notify()
        try:
            await asyncio.sleep(self._settings.retry_failed)
        finally:
            w.retry_at = None

    def _fail(self, w: _Worker, ended: _Ended, reason: str) -> None:
        w.last_error = reason
        self._failures.append(StartupFailed(w.spec.index, reason, ended.log_tail))
        self._set_state(w, "failed")
        self._event(w, f"failed: {reason}")

    async def _backoff(self, w: _Worker, ended: _Ended) -> None:
        # A hung worker was given `unhealthy_restart` s already: no crash loop to slow down.
        delay = (
            0.0
            if ended.hung
            else min(self._settings.backoff_base * 2**w.streak, self._settings.backoff_cap)
        )
        self._set_state(w, "restarting")
        self._event(
            w,
            f"{ended.reason}; restarting in {delay:.3g} s "
            f"(restart {w.streak + 1} of {self._settings.max_restarts})",
        )
        await asyncio.sleep(delay)

    def _move(self, w: _Worker) -> None:
        """Give a worker whose port was taken the first free band after everyone's."""
        taken = {p for x in self._workers for p in (x.spec.port, x.spec.nccl_port) if p}
        for port, nccl_port in spare_ports(self.specs):
            wanted = [p for p in (port, nccl_port) if p is not None]
            if not taken.intersection(wanted) and not busy_ports(wanted):
                self._event(w, f"port {w.spec.port} is in use: moving to port {port}")
                w.spec = with_ports(w.spec, port, nccl_port)
                return
        self._event(w, f"port {w.spec.port} is in use and no other is free: trying it again")

    def _down(self, w: _Worker, restarted: bool) -> None:
        if w.up:
            w.up = False
            if self._own_monitor is not None:
                self._own_monitor.remove(w.spec.url)
            self._on_down(w.spec.url, restarted)

    async def _stop_worker(self, w: _Worker, grace: float) -> None:
        if w.proc is not None:
            await w.proc.terminate(grace)
        if w.state != "failed":
            self._set_state(w, "stopped")

    # ------------------------------------------------------------------ helpers

    async def _probe_while_alive(self, w: _Worker) -> tuple[str, str] | None:
        """The probe's result, or None if the process exits first (a dying worker, or another
        program on its port that accepts but never answers, must not hold us for the timeout).
        """
        assert w.exited is not None
        probe = asyncio.ensure_future(self._probe(w))
        either: list[asyncio.Future[Any]] = [probe, w.exited]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not probe.done():
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)
        return None if w.exited.done() or probe.cancelled() else probe.result()

    async def _probe(self, w: _Worker) -> tuple[str, str]:
        """(DOWN | LOADING | READY, what went wrong): /health, then /get_model_info."""
        assert self._session is not None
        for path in ("/health", "/get_model_info"):
            result = await probe(self._session, w.spec.url, path, w.headers)
            if not result.ok:
                return (DOWN if result.refused else LOADING), result.error
        return READY, ""

    def _set_state(self, w: _Worker, state: str) -> None:
        if w.state != state:
            w.state = state
            self._notify()

    def _event(self, w: _Worker, message: str) -> None:
        self._on_event(f"worker {w.spec.index}: {message}")

    def _notify(self) -> None:
        self._changed.set()

    def _all_failed(self) -> bool:
        return all(w.state == "failed" for w in self._workers)

    def _raise_if_crashed(self) -> None:
        if self._crash is not None:
            raise self._crash

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # A life-cycle task ends by returning (failed for good) or being cancelled (stop);
        # anything else is a bug (or a callback's): surface it through wait_ready/supervise.
        if not task.cancelled() and task.exception() is not None:
            self._crash = task.exception()
            self._notify()


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _status(w: _Worker) -> WorkerStatus:
    running = w.proc is not None and w.proc.returncode is None
    return WorkerStatus(
        index=w.spec.index,
        gpus=w.spec.gpus,
        port=w.spec.port,
        url=w.spec.url,
        state=w.state,
        pid=w.proc.pid if running and w.proc is not None else None,
        restarts=w.restarts,
        started_at=w.started_at,
        ready_at=w.ready_at,
        last_error=w.last_error,
        cpu_percent=w.usage.cpu_percent if running else 0.0,
        rss_bytes=w.usage.rss_bytes if running else 0,
        simulated=w.spec.simulated,
        log_path=w.spec.log_path,
        retry_at=w.retry_at,
        node=w.spec.node,
    )


def _sample_usage(w: _Worker, now: float) -> None:
    """CPU and memory of a running worker whose tree its shim records on this machine; a worker
    without such a record (another node's) is not sampled."""
    if w.proc is None or w.proc.returncode is not None or w.proc.pids_path is None:
        return
    w.usage.sample(w.proc.pids_path, w.proc.pid, now)
