"""WorkerProcess with real OS processes, on both event loops, and the pre-flight checks.

Processes are small Python programs; every condition is polled with a deadline. The leak check
in conftest fails a test that leaves any child running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sglang_dp.launcher.process import (
    WorkerProcess,
    busy_ports,
    read_tail,
    sglang_accepts_nccl_port,
    sglang_importable,
)
from tests.launcher.conftest import Runner, gone, python_spec, spec_for
from tests.processes import until, wait_for

SLEEPER = "import sys, time; print('ready', repr(sys.stdin.read()), flush=True); time.sleep(60)"
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)
# The worker exits on SIGTERM; its own child ignores it (what a stuck sglang scheduler does).
FAMILY = (
    "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
    f"{STUBBORN!r}]); print('child', c.pid, flush=True); time.sleep(60)"
)


def logged(proc: WorkerProcess, text: str) -> bool:
    """Whether the process printed `text` (the header line quotes its whole command)."""
    return any(text in line for line in proc.log_tail(50)[1:])


def test_spawn_own_group_log_and_terminate(run_both: Runner, tmp_path: Path) -> None:
    code = f"import os; print(os.environ['MARK']); {SLEEPER}"
    spec = spec_for(tmp_path, [sys.executable, "-c", code], MARK="m-42")

    async def scenario() -> None:
        proc = await WorkerProcess.spawn(spec)
        try:
            await until(lambda: logged(proc, "ready"), what="the worker's output")
            assert os.getpgid(proc.pid) == proc.pid  # its own process group
            assert os.getsid(proc.pid) == proc.pid
            tail = proc.log_tail()
            assert tail[0].startswith("=== sglang-dp ") and "worker 0:" in tail[0]
            assert "m-42" in tail  # the spec's environment
            assert "ready ''" in tail  # stdin is /dev/null: the terminal is the dashboard's
            assert proc.returncode is None
        finally:
            await proc.terminate(grace=5)
        assert proc.returncode == -signal.SIGTERM
        assert gone(proc.pid)

    run_both(scenario)


def test_terminate_escalates_to_sigkill(run_both: Runner, tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await WorkerProcess.spawn(python_spec(tmp_path, STUBBORN))
        await until(lambda: logged(proc, "ready"), what="the worker to ignore SIGTERM")
        started = time.monotonic()
        await proc.terminate(grace=0.3)
        assert proc.returncode == -signal.SIGKILL
        assert 0.3 <= time.monotonic() - started < 5

    run_both(scenario)


def test_terminate_reaches_the_whole_group(run: Runner, tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await WorkerProcess.spawn(python_spec(tmp_path, FAMILY))
        line = await until(
            lambda: next((x for x in proc.log_tail() if x.startswith("child ")), None),
            what="the grandchild's pid",
        )
        child = int(line.split()[1])
        await until(lambda: logged(proc, "ready"), what="the grandchild to ignore SIGTERM")
        await proc.terminate(grace=0.5)
        assert proc.returncode == -signal.SIGTERM  # the worker obeyed ...
        assert gone(child)  # ... its child did not, and was killed with the group

    run(scenario)


def test_terminate_after_exit_and_twice(run: Runner, tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await WorkerProcess.spawn(python_spec(tmp_path, "print('bye')"))
        assert await proc.wait() == 0
        await proc.terminate(grace=1)
        await proc.terminate(grace=1)
        assert proc.returncode == 0
        assert proc.log_tail()[-1] == "bye"

        stubborn = await WorkerProcess.spawn(python_spec(tmp_path, STUBBORN, index=1))
        await until(lambda: logged(stubborn, "ready"))
        # a second, shorter stop (a second Ctrl-C) escalates sooner
        started = time.monotonic()
        await asyncio.gather(stubborn.terminate(grace=30), stubborn.terminate(grace=0.1))
        assert stubborn.returncode == -signal.SIGKILL
        assert time.monotonic() - started < 5

    run(scenario)


def test_log_tail_reads_only_this_run(run: Runner, tmp_path: Path) -> None:
    async def scenario() -> None:
        first = await WorkerProcess.spawn(python_spec(tmp_path, "print('first run')"))
        await first.wait()
        code = "for i in range(30): print('line', i)"
        second = await WorkerProcess.spawn(python_spec(tmp_path, code))
        await second.wait()
        assert second.log_tail(3) == ["line 27", "line 28", "line 29"]
        assert not any("first" in line for line in second.log_tail(100))
        assert second.log_tail(100)[0].startswith("=== sglang-dp")
        assert "first run" in (tmp_path / "worker-0.log").read_text()  # appended
        assert second.log_tail(0) == []

    run(scenario)


def test_port_override(run: Runner, tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "--port", "7", "--x"]
    spec = spec_for(tmp_path, argv, port=7)

    async def scenario() -> None:
        proc = await WorkerProcess.spawn(spec, port_override=9)
        await proc.wait()
        assert proc.spec.port == 9 and proc.spec.url.endswith(":9")
        assert proc.log_tail()[-1] == "['--port', '9', '--x']"

    run(scenario)


def test_missing_program_is_an_oserror(run: Runner, tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(FileNotFoundError):
            await WorkerProcess.spawn(spec_for(tmp_path, [str(tmp_path / "no-such-python")]))

    run(scenario)


def test_cancelled_spawn_leaves_no_process(run_both: Runner, tmp_path: Path) -> None:
    spec = python_spec(tmp_path, "import time; time.sleep(60)")

    async def scenario() -> None:
        for turns in range(6):  # cancel at every point of the spawn
            task = asyncio.ensure_future(WorkerProcess.spawn(spec))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            try:
                proc = await task
            except asyncio.CancelledError:
                continue
            await proc.terminate(grace=0)  # it finished before the cancel arrived

    run_both(scenario)  # the leak check fails the test if one survived


LAUNCHER = """
import asyncio, os, sys
from pathlib import Path
from sglang_dp.launcher.plan import WorkerSpec
from sglang_dp.launcher.process import WorkerProcess

async def main() -> None:
    code = "import time; print('ready', flush=True); time.sleep(60)"
    argv = (sys.executable, "-c", code)
    spec = WorkerSpec(0, (), 1, None, argv, dict(os.environ), Path(sys.argv[1]), True)
    proc = await WorkerProcess.spawn(spec)
    Path(sys.argv[2]).write_text(str(proc.pid))
    await asyncio.sleep(60)

if sys.argv[3] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_worker_dies_when_the_launcher_is_sigkilled(tmp_path: Path, loop: str) -> None:
    log, pid_file = tmp_path / "worker.log", tmp_path / "worker.pid"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(log), str(pid_file), loop],
        start_new_session=True,
    )
    worker = 0
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the worker's pid")
        worker = int(pid_file.read_text())
        wait_for(lambda: "ready" in log.read_text(), what="the worker to start")
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        wait_for(lambda: gone(worker), what="the worker to die with its launcher")
    finally:
        for pid in (launcher.pid, worker):
            if pid and not gone(pid):
                os.killpg(pid, signal.SIGKILL)
        launcher.wait(timeout=10)


# --- pre-flight checks -----------------------------------------------------------------------


def fake_python(tmp_path: Path, files: dict[str, str]) -> str:
    """An interpreter that sees a fake `sglang` package made of `files`."""
    site = tmp_path / "site"
    for name, text in {"sglang/__init__.py": "", **files}.items():
        path = site / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return str(python)


def test_sglang_importable(tmp_path: Path) -> None:
    assert not sglang_importable(sys.executable)  # not a dependency of sglang-dp
    assert sglang_importable(fake_python(tmp_path, {}))
    assert not sglang_importable(str(tmp_path / "missing-python"))


@pytest.mark.parametrize(
    ("files", "accepts"),
    [
        ({"sglang/srt/server_args.py": 'p.add_argument("--nccl-port", type=int)'}, True),
        ({"sglang/srt/server_args.py": 'p.add_argument("--port", type=int)'}, False),
        # server_args.py elsewhere: the server's --help decides
        ({"sglang/launch_server.py": "print('usage: ... [--nccl-port NCCL_PORT]')"}, True),
        ({"sglang/launch_server.py": "print('usage: ... [--port PORT]')"}, False),
        ({}, False),  # no launch_server at all
    ],
)
def test_sglang_accepts_nccl_port(tmp_path: Path, files: dict[str, str], accepts: bool) -> None:
    assert sglang_accepts_nccl_port(fake_python(tmp_path, files)) is accepts


def test_busy_ports() -> None:
    with socket.socket() as taken, socket.socket() as bound_only:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        bound_only.bind(("127.0.0.1", 0))
        held = bound_only.getsockname()[1]
        free = next(p for p in range(busy + 1, 65535) if p != held and not busy_ports([p]))
        assert busy_ports([busy, free, held]) == [busy, held]
    assert busy_ports([]) == []


def test_read_tail(tmp_path: Path) -> None:
    path = tmp_path / "log"
    assert read_tail(path, 0, 5) == []  # no file yet
    path.write_bytes(b"old\nnew 1\nnew 2\n\xff\n")
    assert read_tail(path, 4, 10) == ["new 1", "new 2", "\ufffd"]
    assert read_tail(path, 0, 2) == ["new 2", "\ufffd"]
    path.write_bytes(b"x" * 100_000 + b"\nlast\n")
    assert read_tail(path, 0, 1) == ["last"]
