"""The per-worker shim: the one process between the launcher and a worker, owning its whole tree.

    python -I -S shim.py CONFIG_JSON -- ARGV...          (started by launcher.process.OwnedProcess)

A real SGLang worker is a tree (launch_server → a scheduler per TP rank, a detokenizer), and the
processes that hold the GPU are the grandchildren. A SIGKILLed launcher can clean nothing up, so
this small program of ours (standard library only: it starts in a few tens of ms) sits between
the launcher and the worker, outlives the launcher for a moment, and takes the tree with it:

1. It runs in its own session (the launcher starts it so: pgid = its pid), asks for
   PR_SET_PDEATHSIG = SIGUSR2 (the launcher died, even by SIGKILL) and PR_SET_CHILD_SUBREAPER
   (every orphan of the worker's tree re-parents to the shim: the tree stays findable and every
   process in it is reaped, so no zombie is left even where the launcher is PID 1).
2. It forks the worker (PR_SET_PDEATHSIG = SIGKILL in it too, default signal dispositions) with
   stdout and stderr on a pipe, and copies that pipe to the log file (`log`), rotating it by size:
   past `log_max_bytes` (0 = never) the file becomes `log.1` (`log.1` → `log.2` …, `log_keep`
   kept).
3. It stops the tree (signal every process in its group and every descendant, found in /proc):
   - SIGTERM, SIGINT or SIGHUP (the launcher stops the worker): SIGTERM to all, then wait as long
     as it takes (the launcher escalates);
   - SIGUSR1 (the launcher escalates): SIGKILL to all, repeated until none is left;
   - SIGUSR2, or its parent is no longer the launcher (checked every second: the launcher died):
     SIGTERM to all, SIGKILL `orphan_grace` s later;
   - the worker exits by itself (a crash): SIGTERM to what it left, SIGKILL `orphan_grace` later.
4. It exits once it has no child left (as a subreaper: once no descendant is left), with the
   worker's status: killed by signal S → the shim kills itself with S (without a core dump), so
   the launcher sees what the worker did, and sees it only when nothing of the worker is left.

It records the tree in `pids` (JSON: the launcher's pid, the pgid, and [pid, start time] of itself
and every descendant), looked at again after 0.25 s, then at intervals doubling up to 5 s while
the tree stays the same (one scan of /proc each; back to 0.25 s when it changed), and removes the
file when it exits normally: a file left behind means the shim was killed, and a later launch
checks whether the processes it names still run (`leftovers`).

The /proc helpers here are also what the launcher uses to find and kill leftovers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
KILL_NOW = signal.SIGUSR1  # the launcher's escalation
PARENT_DIED = signal.SIGUSR2  # PR_SET_PDEATHSIG
WATCHED = (*STOP_SIGNALS, KILL_NOW, PARENT_DIED, signal.SIGCHLD)
PARENT_CHECK_S = 1.0
KILL_REPEAT_S = 0.1  # SIGKILL again for processes forked meanwhile
PIDS_REFRESH_S = (0.25, 5.0)  # from, to: doubled while the tree stays the same
READ_BYTES = 64 * 1024
CANNOT_EXEC = 127


# ---------------------------------------------------------------------------------- /proc


def proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, start time in clock ticks) of every live process (zombies left out)."""
    table: dict[int, tuple[int, int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            continue
        table[int(name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def start_time(pid: int) -> int | None:
    """The start time of a live `pid` (clock ticks since boot), None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def descendants(root: int, table: dict[int, tuple[int, int, int]]) -> list[int]:
    """Every live descendant of `root` in `table` (breadth first)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    frontier = [root]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, ())]
        found += frontier
    return found


def tree_of(root: int, pgid: int, table: dict[int, tuple[int, int, int]]) -> list[int]:
    """`root`'s descendants and every other member of group `pgid`, `root` left out."""
    members = {pid for pid, (_, group, _) in table.items() if group == pgid}
    return sorted((members | set(descendants(root, table))) - {root})


def signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def write_pids(path: Path, record: dict[str, Any]) -> None:
    """Replace `path` with `record` atomically (a reader never sees half a file)."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


def leftovers(record: dict[str, Any], table: dict[int, tuple[int, int, int]]) -> list[int]:
    """The processes of a pids record that still run: recorded ones with the same start time
    (a reused pid is someone else), and members of its group started after its shim."""
    recorded = {int(pid): int(start) for pid, start in record.get("processes", [])}
    alive = {pid for pid, start in recorded.items() if pid in table and table[pid][2] == start}
    pgid = int(record.get("pgid", 0))
    born = recorded.get(pgid, 0)
    alive |= {p for p, (_, group, start) in table.items() if group == pgid and start >= born}
    return sorted(alive)


# ---------------------------------------------------------------------------------- log


class RotatingLog:
    """Appends bytes to `path`; past `max_bytes` (0: never) it becomes path.1 (… up to `keep`)."""

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)
        if self.max_bytes and self._size >= self.max_bytes:
            self.rotate()

    def rotate(self) -> None:
        os.close(self._fd)
        if self.keep > 0:
            for i in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            os.truncate(self.path, 0)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = 0

    def close(self) -> None:
        os.close(self._fd)


# ---------------------------------------------------------------------------------- the shim


def _prctl(option: int, value: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


class Shim:
    """One worker's shim (see the module docstring)."""

    def __init__(self, config: dict[str, Any], argv: list[str]) -> None:
        self.parent = int(config["parent"])
        self.argv = argv
        self.log = RotatingLog(
            Path(config["log"]), int(config.get("log_max_bytes", 0)), int(config.get("log_keep", 3))
        )
        self.pids_path = Path(config["pids"]) if config.get("pids") else None
        self.orphan_grace = float(config.get("orphan_grace", 1.0))
        self.me = os.getpid()
        self.worker = 0
        self.status: int | None = None  # the worker's wait status once reaped
        self.kill_at: float | None = None  # SIGKILL everything at this time
        self.stopping = False
        self.recorded: list[int] = []
        self.refresh_at = 0.0
        self.refresh_every = PIDS_REFRESH_S[0]

    def run(self) -> None:
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        for sig in WATCHED:
            signal.signal(sig, lambda *_: None)
        if sys.platform.startswith("linux"):
            _prctl(PR_SET_PDEATHSIG, PARENT_DIED)
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
        if os.getppid() != self.parent:  # the launcher died before prctl took effect
            self._exit()
        out_r, out_w = os.pipe()
        self.worker = self._fork_worker(out_w)
        os.close(out_w)
        self._refresh_pids(time.monotonic())
        self._loop(wake_r, out_r)

    def _fork_worker(self, out_w: int) -> int:
        pid = os.fork()
        if pid:
            return pid
        try:  # the worker, before exec
            signal.set_wakeup_fd(-1)
            for sig in (*WATCHED, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)  # Python ignores SIGPIPE; exec keeps SIG_IGN
            if sys.platform.startswith("linux"):
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != self.me:
                os._exit(CANNOT_EXEC)
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            os.closerange(3, 1 << 16)
            os.execvp(self.argv[0], self.argv)
        except OSError as exc:
            os.write(2, f"sglang-dp shim: cannot run {self.argv[0]}: {exc}\n".encode())
        os._exit(CANNOT_EXEC)

    def _loop(self, wake_r: int, out_r: int) -> None:
        output_open = True
        while True:
            now = time.monotonic()
            if self.kill_at is not None and now >= self.kill_at:
                signal_all(self._tree(), signal.SIGKILL)
                self.kill_at = now + KILL_REPEAT_S
            waits = [wake_r] + ([out_r] if output_open else [])
            timeout = PARENT_CHECK_S if self.kill_at is None else max(0.0, self.kill_at - now)
            try:
                ready, _, _ = select.select(waits, [], [], timeout)
            except InterruptedError:
                ready = []
            if out_r in ready and output_open:
                output_open = self._copy_output(out_r)
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    for sig in os.read(wake_r, 1024):
                        self._on_signal(sig)
            if os.getppid() != self.parent:
                self._stop(self.orphan_grace)
            if not self._reap():
                break
            if self.pids_path is not None and time.monotonic() >= self.refresh_at:
                self._refresh_pids(time.monotonic())
        while output_open:  # the tree is gone: what it wrote is all in the pipe
            output_open = self._copy_output(out_r)
        self._exit()

    def _copy_output(self, out_r: int) -> bool:
        try:
            data = os.read(out_r, READ_BYTES)
        except OSError:
            data = b""
        if not data:
            os.close(out_r)
            return False
        with contextlib.suppress(OSError):  # a full disk must not stop the shim
            self.log.write(data)
        return True

    def _on_signal(self, sig: int) -> None:
        if sig in STOP_SIGNALS:
            self._stop(None)
        elif sig == KILL_NOW:
            self._stop(0.0)
        elif sig == PARENT_DIED:
            self._stop(self.orphan_grace)

    def _stop(self, kill_after: float | None) -> None:
        """SIGTERM the tree (once); SIGKILL it `kill_after` s from now (None: when told)."""
        if not self.stopping:
            self.stopping = True
            signal_all(self._tree(), signal.SIGTERM)
        if kill_after is not None:
            at = time.monotonic() + kill_after
            self.kill_at = at if self.kill_at is None else min(self.kill_at, at)

    def _reap(self) -> bool:
        """Reap every child that has exited; False once no child is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.worker:
                self.status = status
                self._stop(self.orphan_grace)  # whatever the worker left behind goes too

    def _tree(self) -> list[int]:
        return tree_of(self.me, self.me, proc_table())

    def _refresh_pids(self, now: float) -> None:
        if self.pids_path is None:
            return
        table = proc_table()
        pids = [self.me, *tree_of(self.me, self.me, table)]
        same = pids == self.recorded
        self.refresh_every = (
            min(self.refresh_every * 2, PIDS_REFRESH_S[1]) if same else PIDS_REFRESH_S[0]
        )
        self.refresh_at = now + self.refresh_every
        if same:
            return
        self.recorded = pids
        record = {
            "launcher": self.parent,
            "pgid": self.me,
            "worker": self.worker,
            "processes": [[p, table[p][2]] for p in pids if p in table],
        }
        with contextlib.suppress(OSError):
            write_pids(self.pids_path, record)

    def _exit(self) -> None:
        if self.pids_path is not None:
            with contextlib.suppress(OSError):
                self.pids_path.unlink()
        self.log.close()
        status = self.status
        if status is not None and os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.set_wakeup_fd(-1)
            if sig != signal.SIGKILL:
                signal.signal(sig, signal.SIG_DFL)
            os.kill(self.me, sig)
            os._exit(128 + sig)  # a signal that does not end a process
        os._exit(os.WEXITSTATUS(status) if status is not None else 1)


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: shim.py CONFIG_JSON -- ARGV...\n")
        os._exit(2)
    try:
        config = json.loads(argv[1])
    except ValueError as exc:
        sys.stderr.write(f"shim.py: bad CONFIG_JSON: {exc}\n")
        os._exit(2)
    try:
        Shim(config, argv[3:]).run()
    except OSError as exc:
        if exc.errno != errno.EINTR:
            sys.stderr.write(f"sglang-dp shim: {exc}\n")
        os._exit(1)


if __name__ == "__main__":
    main(sys.argv)
