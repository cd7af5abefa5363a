"""Run the installed `sglang-dp launch --simulate` as a user would (test helper)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.processes import SGLANG_DP, Worker, free_port, free_port_band, wait_for


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    router: Worker
    log_dir: Path

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def ready(self, count: int) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"launch exited with {self.proc.returncode}")
        try:
            reply = self.router.get("/readiness", timeout=1)
        except OSError:
            return False
        return reply.status == 200 and reply.json()["healthy_workers"] == count


def launch_argv(dp: int, port: int, log_dir: Path, *extra: str) -> list[str]:
    return [
        SGLANG_DP, "launch", "--simulate", "--dp", str(dp), "--port", str(port),
        "--worker-base-port", str(free_port_band(dp * 10)), "--log-dir", str(log_dir),
        "--health-check-interval-secs", "0.2", *extra,
    ]  # fmt: skip


def gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


def kill_tree(proc: subprocess.Popen[bytes], children: list[psutil.Process]) -> None:
    """Last-resort cleanup by pid (the launcher's group and every child seen)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for child in children:
        with suppress(psutil.NoSuchProcess):
            child.kill()


@contextmanager
def launched(dp: int, tmp_path: Path, *extra: str, wait_ready: bool = True) -> Iterator[Launched]:
    port = free_port()
    log_dir = tmp_path / "logs"
    proc = subprocess.Popen(
        [*launch_argv(dp, port, log_dir, "--no-dashboard", *extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    run = Launched(proc, Worker(proc, port), log_dir)
    seen: list[psutil.Process] = []
    try:
        if wait_ready:
            wait_for(lambda: run.ready(dp), timeout=60, what="launch ready")
            seen = run.children()
        yield run
    finally:
        kill_tree(proc, seen + run.children())
