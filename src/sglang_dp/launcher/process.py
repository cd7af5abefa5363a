"""One worker OS process, and the checks made before any is started (shell).

`WorkerProcess.spawn(spec)` starts `spec.argv` with `spec.env`:
- in its own session, hence its own process group (pgid = pid), so signals to the group reach
  the worker's own children (sglang's scheduler and detokenizer processes) too;
- stdin from /dev/null (the dashboard owns the terminal); stdout and stderr appended to
  `spec.log_path` after a header line naming the command; `log_tail()` reads only this run's part;
- on Linux with PR_SET_PDEATHSIG = SIGKILL (prctl via ctypes, in the child between fork and
  exec), so the worker dies with the launcher even when the launcher is SIGKILLed. The kernel
  sends it when the *thread* that forked the worker ends: spawn from the event loop's thread and
  keep that thread alive as long as the workers. (sglang's own children die with the worker:
  they set the same signal on themselves.) A spawn that is cancelled leaves no process.

`terminate(grace)`: SIGTERM to the group, wait up to `grace` seconds for the whole group to be
gone, then SIGKILL the group and wait for it. Gone means dead: a zombie (an orphan that init has
not reaped yet, which in a container can take seconds or forever) counts as gone. Safe to call
twice or concurrently (a second call with a shorter grace escalates sooner).

Pre-flight checks, each costing one Python start of the target interpreter:
`sglang_importable(python)`, `sglang_accepts_nccl_port(python)` (reads sglang's server_args.py
without importing sglang, which takes seconds; falls back to `launch_server --help`; call once
per launch), `busy_ports(ports)` (a port is busy when a socket with SO_REUSEADDR, as servers
use, cannot bind it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import psutil

from sglang_dp.launcher.plan import WORKER_HOST, WorkerSpec, with_ports

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
GROUP_POLL_S = 0.02  # how often terminate() looks whether the group is gone
KILL_WAIT_S = 5.0  # after SIGKILL the kernel needs only moments; this bounds a stuck D-state
TAIL_READ_BYTES = 64 * 1024  # the last lines of a log are in its last 64 KiB
CHECK_TIMEOUT_S = 60.0  # a cold Python start on a busy node's network filesystem is slow
HELP_TIMEOUT_S = 300.0  # `launch_server --help` imports torch

# Exit status of the server_args.py probe (see _NCCL_PORT_PROBE)
_PROBE_YES, _PROBE_NO = 0, 1
_NCCL_PORT_PROBE = """
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("sglang")
for root in (spec.submodule_search_locations or []) if spec else []:
    source = pathlib.Path(root, "srt", "server_args.py")
    if source.is_file():
        sys.exit(0 if '"--nccl-port"' in source.read_text(errors="replace") else 1)
sys.exit(2)
"""
_IMPORTABLE_PROBE = (
    "import importlib.util, sys; sys.exit(importlib.util.find_spec('sglang') is None)"
)


class WorkerProcess:
    """A started worker process (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, proc: asyncio.subprocess.Process, log_offset: int):
        self.spec = spec
        self._proc = proc
        self._log_offset = log_offset  # where this run's part of the log file starts

    @classmethod
    async def spawn(cls, spec: WorkerSpec, port_override: int | None = None) -> WorkerProcess:
        """Start the worker (on `port_override` instead of `spec.port` if given)."""
        if port_override is not None:
            spec = with_ports(spec, port_override, spec.nccl_port)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as log:
            offset = log.seek(0, os.SEEK_END)
            log.write(_header(spec).encode())
            log.flush()
            proc = await _create_uncancellable(spec, log.fileno())
        return cls(spec, proc, offset)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        """The exit status, once the process has exited (negative: killed by that signal)."""
        return await self._proc.wait()

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last `lines` lines of the log from this run's header on (read it before the
        next run of the worker appends to the same file)."""
        return read_tail(self.spec.log_path, self._log_offset, lines)

    async def terminate(self, grace: float) -> None:
        """SIGTERM the group, wait up to `grace` s for it to be gone, then SIGKILL it."""
        deadline = time.monotonic() + grace
        _signal_group(self.pid, signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._proc.wait(), grace)
        if not await _group_gone(self.pid, deadline):
            _signal_group(self.pid, signal.SIGKILL)
            await _group_gone(self.pid, time.monotonic() + KILL_WAIT_S)
        await self._proc.wait()  # reaped, so returncode is set


def _header(spec: WorkerSpec) -> str:
    now = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    return f"=== sglang-dp {now} worker {spec.index}: {shlex.join(spec.argv)}\n"


async def _create_uncancellable(spec: WorkerSpec, log_fd: int) -> asyncio.subprocess.Process:
    # Shielded: a cancellation arriving while the process is being created must not leave it
    # running unseen; it is killed and the cancellation goes on.
    creating = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *spec.argv,
            env=dict(spec.env),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent_hook(),
        )
    )
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:
        proc = await creating
        _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise


def die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive SIGKILL when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # Gone already, or (pid reused by another user's group) not ours: nothing to signal.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _group_gone(pgid: int, deadline: float) -> bool:
    """Poll until no live process is left in the group; False if some are at `deadline`."""
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(GROUP_POLL_S)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # Someone is in the group, but dead members linger as zombies until their parent (init,
    # for orphans; a container's init may take seconds, or never) reaps them: look closer.
    for pid in psutil.pids():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
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


def sglang_importable(python: str) -> bool:
    """Whether `python` can import sglang (found without importing it: that takes seconds)."""
    done = _run_quietly([python, "-c", _IMPORTABLE_PROBE], CHECK_TIMEOUT_S)
    return done is not None and done.returncode == 0


def sglang_accepts_nccl_port(python: str) -> bool:
    """Whether the sglang that `python` imports has `--nccl-port` (0.5+); False if unknown."""
    probe = _run_quietly([python, "-c", _NCCL_PORT_PROBE], CHECK_TIMEOUT_S)
    if probe is not None and probe.returncode in (_PROBE_YES, _PROBE_NO):
        return probe.returncode == _PROBE_YES
    # server_args.py moved: ask the server itself
    done = _run_quietly([python, "-m", "sglang.launch_server", "--help"], HELP_TIMEOUT_S)
    return done is not None and "--nccl-port" in done.stdout


def _run_quietly(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str] | None:
    """Run a short command to completion, output captured; None if it cannot start or hangs."""
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None


EPHEMERAL_START = 32768  # Linux's default ip_local_port_range starts here


def free_port(host: str = WORKER_HOST) -> int:
    """A port nobody listens on right now (from the ephemeral range: for a single server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


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


def free_port_band(size: int, rng: random.Random | None = None, host: str = WORKER_HOST) -> int:
    """The first of `size` consecutive free ports, below the ephemeral range.

    Worker port bands avoid the ephemeral range: on a busy machine outgoing connections take
    random local ports there, and a band of tens of ports would often collide with one. With
    `rng`, bases are tried at random (tests running side by side), else scanned from 21000.
    """
    low, high = 21000, EPHEMERAL_START - size
    bases = (rng.randrange(low, high) for _ in range(500)) if rng else range(low, high, size)
    for base in bases:
        if not busy_ports(range(base, base + size), host):
            return base
    raise RuntimeError(f"no {size} consecutive free ports below {EPHEMERAL_START}")


def busy_ports(ports: Iterable[int], host: str = WORKER_HOST) -> list[int]:
    """The ports among `ports` that a server could not bind on `host` right now."""
    return [port for port in ports if not _can_bind(host, port)]


def _can_bind(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As servers do: a port whose old connections linger in TIME_WAIT is free to them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
