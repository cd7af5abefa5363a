"""Harness of the launcher tests: event loops, polling, specs, and a leak check.

Every test runs under `no_leftover_children`: a child process of the test run that is still alive
after the test fails it (and is killed by its process group, found by pid, never by name).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from sglang_dp.launcher.plan import WorkerSpec, WorkerTemplate, plan_workers
from sglang_dp.launcher.ports import EPHEMERAL_START, busy_ports
from tests.processes import Scenario, run_on

Runner = Callable[[Scenario], Any]
SIM_ARGS = ("--time-scale", "1000", "--log-level", "warning")


@pytest.fixture
def run() -> Runner:
    """The default asyncio loop."""
    return lambda scenario: run_on("asyncio", scenario)


@pytest.fixture(params=["asyncio", "uvloop"])
def run_both(request: pytest.FixtureRequest) -> Runner:
    """Both loops the launcher may run on."""
    kind: str = request.param
    return lambda scenario: run_on(kind, scenario)


def gone(pid: int) -> bool:
    """No such process, or a zombie (this container's init may not reap orphans)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def spec_for(
    tmp_path: Path, argv: Sequence[str], index: int = 0, port: int = 1, **env: str
) -> WorkerSpec:
    """A spec that runs any command (port is only used by with_ports / url)."""
    return WorkerSpec(
        index=index,
        gpus=(),
        port=port,
        nccl_port=None,
        argv=tuple(argv),
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        log_path=tmp_path / f"worker-{index}.log",
        simulated=True,
    )


def python_spec(tmp_path: Path, code: str, index: int = 0, port: int = 1) -> WorkerSpec:
    return spec_for(tmp_path, [sys.executable, "-c", code], index, port)


def free_base(dp: int, stride: int = 10) -> int:
    """A base port whose next dp bands (and a few spare ones) are free right now.

    Drawn below the kernel's ephemeral range, where outgoing connections (the supervisor's own
    health checks among them) take their local ports, so the bands stay free afterwards too.
    """
    draw = random.Random()
    span = (dp + 4) * stride
    for _ in range(100):
        base = draw.randrange(EPHEMERAL_START - 12000, EPHEMERAL_START - span)
        if not busy_ports(range(base, base + span)):
            return base
    raise AssertionError("no free port band")


def sim_specs(tmp_path: Path, dp: int, *extra: str) -> list[WorkerSpec]:
    """Simulated workers planned as the launcher plans them, on free loopback ports."""
    template = WorkerTemplate(
        model_path="sim-model",
        tp=1,
        worker_args=(*SIM_ARGS, *extra),
        simulate=True,
        python=sys.executable,
        environ=os.environ,
    )
    return plan_workers(
        template, dp=dp, gpus=None, base_port=free_base(dp), log_dir=tmp_path,
        accepts_nccl_port=True,
    )  # fmt: skip


def _live_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if not gone(p.pid)}


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    before = _live_children()
    yield
    left = set()
    deadline = time.monotonic() + 2  # a process killed at the very end may take a moment
    while time.monotonic() < deadline:
        left = _live_children() - before
        if not left:
            return
        time.sleep(0.02)
    for pid in left:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)
    pytest.fail(f"processes left running: {sorted(left)}")
