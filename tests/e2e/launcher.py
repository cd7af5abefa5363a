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


FAKE_SGLANG = Path(__file__).parents[1] / "fake_sglang"  # a stand-in SGLang with its tree


def fake_sglang_env() -> dict[str, str]:
    """The environment in which `python -m sglang.launch_server` is the stand-in."""
    return {**os.environ, "PYTHONPATH": str(FAKE_SGLANG)}


def launch_argv(
    dp: int, port: int, log_dir: Path, *extra: str, fake_sglang: bool = False
) -> list[str]:
    what = ["--model-path", "fake", "--gpus", ",".join(map(str, range(dp)))]
    return [
        SGLANG_DP, "launch", *(what if fake_sglang else ["--simulate"]), "--dp", str(dp),
        "--port", str(port),
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
def launched(
    dp: int, tmp_path: Path, *extra: str, wait_ready: bool = True, fake_sglang: bool = False
) -> Iterator[Launched]:
    port = free_port()
    log_dir = tmp_path / "logs"
    proc = subprocess.Popen(
        [*launch_argv(dp, port, log_dir, "--no-dashboard", *extra, fake_sglang=fake_sglang)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=fake_sglang_env() if fake_sglang else None,
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


def fake_children(log: Path) -> list[int]:
    """The pids the stand-in SGLang printed in `log` for its latest run."""
    lines = [x for x in log.read_text().splitlines() if x.startswith("fake-sglang children")]
    return [int(pid) for pid in lines[-1].split()[2:]] if lines else []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
