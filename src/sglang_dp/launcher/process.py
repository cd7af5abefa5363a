"""Processes the launcher owns whole, with their trees: started, awaited, stopped (shell).

`OwnedProcess.start(argv, env, log_path)` starts `argv` through the per-worker shim
(launcher/shim.py, which see): the shim runs in its own session (its pid is the group id), is the
child subreaper of everything the command starts, receives a signal when the launcher dies (even
by SIGKILL) and then takes the whole tree with it, copies the command's output to `log_path`
(rotated by size), and exits only when nothing of the tree is left, with the command's status. So:
- `wait()` / `returncode`: the exit status of the command (negative: killed by that signal), known
  only once every process it started is gone. It is learnt from the loop's child watcher (no
  polling of /proc).
- `terminate(grace)`: SIGTERM to the shim, which SIGTERMs its group and every descendant; after
  `grace` s SIGUSR1, and the shim SIGKILLs them all; should the shim itself be stuck after
  KILL_WAIT_S more, SIGKILL its group and every process its pids file names. Returns when nothing
  is left. Safe to call twice or concurrently (a second call with a shorter grace escalates
  sooner), and after an exit.
- `pids_path` (`<log>.pids`): the shim's record of the tree (pgid, pids with their start times),
  removed when the tree is gone; `find_leftovers(log_dir)` / `kill_leftovers` read the records a
  killed run left behind.
- stdin is /dev/null (the dashboard owns the terminal); `log_tail()` reads only this run's part of
  the log (after a header line naming the command written at spawn).
- A program that cannot be found or executed is an OSError from spawn(); a spawn that is
  cancelled leaves no process.

`WorkerHandle` is the surface the supervisor uses (spec, pid, returncode, pids_path, wait,
log_tail, terminate); `WorkerProcess` is an OwnedProcess that runs a `WorkerSpec`, and
`spawn_worker` the default `Spawner` of the supervisor (another, e.g. one that starts workers on
Ray actors, may be given).

`become_subreaper()` makes the launcher itself the subreaper of everything below it, and `Reaper`
reaps the orphans that then re-parent to it (only a shim killed by force leaves any), so none
lingers as a zombie where the launcher is PID 1.

`stop_group(proc)`: the same TERM-then-KILL of a group for synchronous callers (tests, benchmarks)
of a child they started with start_new_session.

Ports free on this machine are `ports.py`'s business, what sglang offers `preflight.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sglang_dp.launcher import shim
from sglang_dp.launcher.plan import WorkerSpec

# bench/compare.py imports these from here still (its imports belong to another change)
from sglang_dp.launcher.ports import free_port as free_port  # noqa: PLC0414
from sglang_dp.launcher.ports import free_port_band as free_port_band  # noqa: PLC0414

PR_SET_CHILD_SUBREAPER = shim.PR_SET_CHILD_SUBREAPER
SHIM_PATH = Path(shim.__file__)
KILL_WAIT_S = 5.0  # after SIGKILL the kernel needs only moments; this bounds a stuck D-state
ORPHAN_GRACE_S = 1.0  # launcher gone: the tree gets SIGTERM, then SIGKILL this much later
REAP_INTERVAL_S = 1.0
LEFTOVER_WAIT_S = 5.0
TAIL_READ_BYTES = 64 * 1024  # the last lines of a log are in its last 64 KiB


@dataclass(frozen=True)
class LogRotation:
    """Rotate a log past `max_bytes` (0: never), keeping `keep` old files (log.1 … log.N)."""

    max_bytes: int = 0
    keep: int = 3


class WorkerHandle(Protocol):
    """What the supervisor needs of a running worker, wherever it runs."""

    @property
    def spec(self) -> WorkerSpec: ...  # where this run really listens (a spawner may choose)

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def pids_path(self) -> Path | None: ...  # its shim's record here (None: on another node)

    async def wait(self) -> int: ...

    def log_tail(self, lines: int = 20) -> list[str]: ...

    async def terminate(self, grace: float) -> None: ...


Spawner = Callable[[WorkerSpec], Awaitable[WorkerHandle]]
_Owned = TypeVar("_Owned", bound="OwnedProcess")


class OwnedProcess:
    """A command run through the shim, owned with its whole tree (see the module docstring)."""

    def __init__(
        self, proc: asyncio.subprocess.Process, log_path: Path, log_offset: int, pids_path: Path
    ) -> None:
        self._proc = proc
        self.log_path = log_path
        self.pids_path = pids_path
        self._log_offset = log_offset  # where this run's part of the log file starts
        self._header = b""  # this run's first line: not where it was after a rotation
        self._exited = asyncio.ensure_future(proc.wait())

    @classmethod
    async def start(
        cls: type[_Owned],
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        header: str = "",
        rotation: LogRotation = LogRotation(),
    ) -> _Owned:
        """Start `argv` with `env`, its output appended to `log_path` after `header`."""
        _check_executable(argv, env)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        pids_path = pids_path_of(log_path)
        with open(log_path, "ab") as log:
            offset = log.seek(0, os.SEEK_END)
            log.write(header.encode())
        config = {
            "parent": os.getpid(),
            "log": str(log_path),
            "log_max_bytes": rotation.max_bytes,
            "log_keep": rotation.keep,
            "pids": str(pids_path),
            "orphan_grace": ORPHAN_GRACE_S,
        }
        shim_argv = [sys.executable, "-I", "-S", str(SHIM_PATH), json.dumps(config), "--", *argv]
        proc = await _create_uncancellable(shim_argv, env)
        owned = cls(proc, log_path, offset, pids_path)
        owned._header = header.encode()
        return owned

    @property
    def pid(self) -> int:
        """The shim's pid, which is also the group id of the tree."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        """The exit status, once the command and everything it started are gone."""
        return await asyncio.shield(self._exited)

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last `lines` lines of the log from this run's header on (read it before the
        next run appends to the same file). After a rotation (seen by the header no longer
        being where it was written): the current file's lines, preceded by the previous
        file's if too few."""
        if not self._header or _starts_with(self.log_path, self._log_offset, self._header):
            return read_tail(self.log_path, self._log_offset, lines)
        current = read_tail(self.log_path, 0, lines)
        before = read_tail(self.log_path.with_name(self.log_path.name + ".1"), 0, lines)
        return [*before, *current][-lines:] if lines > 0 else []

    async def terminate(self, grace: float) -> None:
        """Stop the whole tree: SIGTERM, SIGKILL after `grace` s; returns when nothing is left."""
        if self._proc.returncode is None:
            self._signal(signal.SIGTERM)
            if not await self._exits_within(grace):
                self._signal(shim.KILL_NOW)
                if not await self._exits_within(KILL_WAIT_S):
                    _signal_group(self.pid, signal.SIGKILL)  # the shim is stuck
        await self.wait()
        if self.pids_path.exists():  # the shim was killed before it could clean up
            await asyncio.get_running_loop().run_in_executor(None, kill_leftovers, self.pids_path)

    def _signal(self, sig: int) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def _exits_within(self, timeout: float) -> bool:
        done, _ = await asyncio.wait([self._exited], timeout=max(0.0, timeout))
        return bool(done)


class WorkerProcess(OwnedProcess):
    """An OwnedProcess running a worker's spec."""

    spec: WorkerSpec

    @classmethod
    async def spawn(cls, spec: WorkerSpec, rotation: LogRotation = LogRotation()) -> WorkerProcess:
        """Start the worker its spec describes."""
        worker = await cls.start(spec.argv, spec.env, spec.log_path, _header(spec), rotation)
        worker.spec = spec
        return worker


def pids_path_of(log_path: Path) -> Path:
    """Where the shim of the command logging to `log_path` records its tree."""
    return log_path.with_name(log_path.name + ".pids")


def spawn_worker(rotation: LogRotation = LogRotation()) -> Spawner:
    """The supervisor's default spawner: a local WorkerProcess per spec."""

    async def spawn(spec: WorkerSpec) -> WorkerHandle:
        return await WorkerProcess.spawn(spec, rotation=rotation)

    return spawn


def _header(spec: WorkerSpec) -> str:
    now = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    return f"=== sglang-dp {now} worker {spec.index}: {shlex.join(spec.argv)}\n"


def _check_executable(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """FileNotFoundError / PermissionError now, rather than an exit of the shim later."""
    if not argv:
        raise ValueError("empty command")
    program = argv[0]
    if os.sep in program:
        if not os.path.isfile(program):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if not os.access(program, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(errno.ENOENT, f"{os.strerror(errno.ENOENT)} in PATH", program)


async def _create_uncancellable(
    argv: Sequence[str], env: Mapping[str, str]
) -> asyncio.subprocess.Process:
    # Shielded: a cancellation arriving while the process is being created must not leave it
    # running unseen; it is killed and the cancellation goes on.
    creating = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    )
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:
        proc = await creating
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, shim.KILL_NOW)
        await proc.wait()
        raise


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # Gone already, or (pid reused by another user's group) not ours: nothing to signal.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# ------------------------------------------------------------------ leftovers of earlier runs


@dataclass(frozen=True)
class Leftover:
    """Processes recorded in `pids_path` that still run (a shim was killed before cleaning)."""

    pids_path: Path
    launcher: int  # the launcher that started them (may be gone)
    pids: tuple[int, ...]


def find_leftovers(log_dir: Path) -> list[Leftover]:
    """The live processes that the pids files in `log_dir` name; stale files are removed."""
    found: list[Leftover] = []
    paths = sorted(log_dir.glob("*.pids")) if log_dir.is_dir() else []
    table = shim.proc_table() if paths else {}
    for path in paths:
        record = read_record(path)
        alive = shim.leftovers(record, table) if record else []
        if alive:
            found.append(Leftover(path, int(record.get("launcher", 0)), tuple(alive)))
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return found


def kill_leftovers(pids_path: Path, timeout: float = LEFTOVER_WAIT_S) -> list[int]:
    """SIGKILL what `pids_path` names and still runs, wait until it is gone, remove the file.

    Returns the pids that survived `timeout` (stuck in the kernel; [] normally)."""
    record = read_record(pids_path)
    deadline = time.monotonic() + timeout
    alive = shim.leftovers(record, shim.proc_table()) if record else []
    while alive:
        shim.signal_all(alive, signal.SIGKILL)
        if time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)
        alive = shim.leftovers(record, shim.proc_table())
    with contextlib.suppress(OSError):
        pids_path.unlink()
    return []


def read_record(path: Path) -> dict[str, Any]:
    """A shim's pids record ({} if missing or unreadable)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


# ------------------------------------------------------------------ the launcher as subreaper


def become_subreaper() -> bool:
    """Make orphans of everything below this process re-parent to it (Linux); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return bool(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


class Reaper:
    """Reaps children of this process that nobody waits for: orphans re-parented to a subreaper.

    Every `interval` s it peeks (waitid WNOWAIT) at an exited child; one that `is_ours` says is
    awaited elsewhere (a shim: the loop's child watcher reaps it) is left alone, any other is
    reaped. Run it only in a process whose other children are all `is_ours`.
    """

    def __init__(self, is_ours: Callable[[int], bool], interval: float = REAP_INTERVAL_S) -> None:
        self._is_ours = is_ours
        self._interval = interval
        self.reaped = 0

    def reap_once(self) -> int:
        """Reap what can be reaped now; how many."""
        count = 0
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None or self._is_ours(info.si_pid):
                break
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)
            count += 1
        self.reaped += count
        return count

    async def run(self) -> None:
        while True:
            self.reap_once()
            await asyncio.sleep(self._interval)


def _starts_with(path: Path, offset: int, text: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(len(text)) == text
    except OSError:
        return False


def read_tail(path: Path, start: int, lines: int) -> list[str]:
    """The last `lines` lines of `path` after byte offset `start` ([] if unreadable)."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(start, end - TAIL_READ_BYTES))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    return text.splitlines()[-lines:] if lines > 0 else []


def stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """TERM a child's process group, KILL it after `grace` s (by group id, never by name).

    For synchronous callers (tests, benchmarks) of a child started with start_new_session.
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
