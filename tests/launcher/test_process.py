"""WorkerProcess with real OS processes, on both event loops, and the pre-flight checks.

Processes are small Python programs; every condition is polled with a deadline. The leak check
in conftest fails a test that leaves any child running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from sglang_dp.launcher import shim
from sglang_dp.launcher.plan import with_ports
from sglang_dp.launcher.process import (
    LogRotation,
    OwnedProcess,
    WorkerProcess,
    find_leftovers,
    kill_leftovers,
    read_tail,
)
from sglang_dp.launcher.shim import RotatingLog
from tests.launcher.conftest import Runner, gone, python_spec, spec_for
from tests.processes import until, wait_for

SLEEPER = "import sys, time; print('ready', repr(sys.stdin.read()), flush=True); time.sleep(60)"
STUBBORN = (
    "import signal, time; "
    "signal.signal(signal.SIGTERM, lambda *_: print('ignored SIGTERM', flush=True)); "
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
        await asyncio.wait_for(proc.terminate(grace=0.3), timeout=15)
        assert proc.returncode == -signal.SIGKILL
        assert logged(proc, "ignored SIGTERM")  # SIGTERM came first, SIGKILL after the grace

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
        both = asyncio.gather(stubborn.terminate(grace=30), stubborn.terminate(grace=0.1))
        await asyncio.wait_for(both, timeout=15)  # a deadline well short of the first grace
        assert stubborn.returncode == -signal.SIGKILL

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


def test_a_moved_worker_runs_on_its_new_port(run: Runner, tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "--port", "7", "--x"]
    spec = spec_for(tmp_path, argv, port=7)

    async def scenario() -> None:
        proc = await WorkerProcess.spawn(with_ports(spec, 9, None))
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


# A worker like SGLang's: two children that ignore SIGTERM and never watch their parent, one
# that obeys, and a daemon (double fork) that re-parents to the shim; then it serves (sleeps).
TREE = """
import os, signal, subprocess, sys, time
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
codes = (stubborn, stubborn, "import time; time.sleep(60)")
kids = [subprocess.Popen([sys.executable, "-c", code]) for code in codes]
if os.fork() == 0:
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(1, f"daemon {os.getpid()}\\n".encode())  # one write: the daemon's and ...
        time.sleep(60)
    os._exit(0)
os.wait()
os.write(1, ("children " + " ".join(str(k.pid) for k in kids) + "\\n").encode())  # ... ours
time.sleep(60)
"""


def tree_pids(proc: OwnedProcess) -> list[int]:
    """The pids the tree printed (once it has printed them all)."""
    lines = proc.log_tail(50)
    daemon = [int(x.split()[1]) for x in lines if x.startswith("daemon ")]
    kids = [int(p) for x in lines if x.startswith("children ") for p in x.split()[1:]]
    return daemon + kids if daemon and kids else []


def test_terminate_leaves_nothing_of_the_tree(run_both: Runner, tmp_path: Path) -> None:
    async def scenario() -> None:
        proc = await WorkerProcess.spawn(python_spec(tmp_path, TREE))
        try:
            pids = await until(lambda: tree_pids(proc), what="the tree's pids")
            assert len(pids) == 4
            assert proc.pids_path.exists()
        finally:
            await proc.terminate(grace=0.5)
        assert proc.returncode == -signal.SIGTERM  # the worker obeyed; the rest were killed
        assert all(gone(pid) for pid in pids)
        assert not proc.pids_path.exists()  # the shim cleaned up: nothing is left to record

    run_both(scenario)


def test_a_crashed_worker_is_reported_only_when_its_tree_is_gone(
    run: Runner, tmp_path: Path
) -> None:
    async def scenario() -> None:
        proc = await WorkerProcess.spawn(python_spec(tmp_path, TREE))
        try:
            pids = await until(lambda: tree_pids(proc), what="the tree's pids")
            worker = psutil.Process(proc.pid).children()[0].pid
            os.kill(worker, signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL  # the worker's status, passed on
        finally:
            await proc.terminate(grace=0)
        assert all(gone(pid) for pid in pids)

    run(scenario)


def test_log_rotation(run: Runner, tmp_path: Path) -> None:
    code = "for i in range(4000): print(f'line {i:5d}', 'x' * 40)"  # ~200 kB
    spec = python_spec(tmp_path, code)

    async def scenario() -> None:
        proc = await WorkerProcess.spawn(spec, rotation=LogRotation(max_bytes=50_000, keep=2))
        assert await proc.wait() == 0
        files = sorted(tmp_path.glob("worker-0.log*"))
        assert [f.name for f in files] == ["worker-0.log", "worker-0.log.1", "worker-0.log.2"]
        assert all(f.stat().st_size < 50_000 + 65_536 for f in files)
        assert proc.log_tail(1)[0].startswith("line  3999")  # the current file, after rotation

    run(scenario)


def test_rotating_log_keeps_n_files(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "w.log", max_bytes=10, keep=2)
    for i in range(5):
        log.write(f"chunk {i:04d}\n".encode())  # 11 bytes: every write rotates
    log.close()
    assert (tmp_path / "w.log").read_text() == ""
    assert (tmp_path / "w.log.1").read_text() == "chunk 0004\n"
    assert (tmp_path / "w.log.2").read_text() == "chunk 0003\n"
    assert not (tmp_path / "w.log.3").exists()
    unkept = RotatingLog(tmp_path / "u.log", max_bytes=10, keep=0)
    unkept.write(b"0123456789ab")
    unkept.close()
    assert (tmp_path / "u.log").read_text() == "" and not (tmp_path / "u.log.1").exists()


LAUNCHER = """
import asyncio, os, sys
from pathlib import Path
from sglang_dp.launcher.plan import WorkerSpec
from sglang_dp.launcher.process import WorkerProcess

async def main() -> None:
    argv = (sys.executable, "-c", sys.argv[4])
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


def _launcher(tmp_path: Path, loop: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    log, pid_file = tmp_path / "worker.log", tmp_path / "shim.pid"
    argv = [sys.executable, "-c", LAUNCHER, str(log), str(pid_file), loop, TREE]
    return subprocess.Popen(argv, start_new_session=True), log, pid_file


def _printed_pids(log: Path) -> list[int]:
    text = log.read_text() if log.exists() else ""
    lines = text.splitlines()
    daemon = [int(x.split()[1]) for x in lines if x.startswith("daemon ")]
    kids = [int(p) for x in lines if x.startswith("children ") for p in x.split()[1:]]
    return daemon + kids if daemon and kids else []


@pytest.mark.parametrize(("loop", "moment"), [("asyncio", "steady"), ("uvloop", "starting")])
def test_the_whole_tree_dies_when_the_launcher_is_sigkilled(
    tmp_path: Path, loop: str, moment: str
) -> None:
    launcher, log, pid_file = _launcher(tmp_path, loop)
    seen: set[int] = set()
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the shim's pid")
        seen.add(int(pid_file.read_text()))
        if moment == "steady":
            seen.update(wait_for(lambda: _printed_pids(log), what="the tree"))
        else:  # while the worker starts its children: note every process of the tree there is
            seen.update(p.pid for p in psutil.Process(launcher.pid).children(recursive=True))
        seen.update(p.pid for p in psutil.Process(launcher.pid).children(recursive=True))
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        wait_for(lambda: all(gone(pid) for pid in seen), timeout=5, what="every descendant gone")
        # what started after the look (at start-up) is named in the pids file, removed when gone
        wait_for(lambda: not (tmp_path / "worker.log.pids").exists(), timeout=5, what="cleanup")
        assert all(gone(pid) for pid in _printed_pids(log))
    finally:
        for pid in seen:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)


REAPER = """
import asyncio, os, signal, sys
from pathlib import Path
from sglang_dp.launcher.process import OwnedProcess, Reaper, become_subreaper

async def main() -> None:
    assert become_subreaper()
    proc = await OwnedProcess.start([sys.executable, "-c", sys.argv[2]], os.environ,
                                    Path(sys.argv[1]))
    while "children" not in Path(sys.argv[1]).read_text():
        await asyncio.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the shim dies first: its tree re-parents to us
    await proc.terminate(0)  # kills what its pids file names
    reaper = Reaper(lambda pid: pid == proc.pid)
    while reaper.reap_once() or zombies():
        await asyncio.sleep(0.02)
    print("reaped", reaper.reaped, "zombies", len(zombies()))

def zombies() -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                found.append(int(name))
    return found

asyncio.run(main())
"""


def test_a_subreaper_launcher_kills_and_reaps_the_orphans_of_a_killed_shim(
    tmp_path: Path,
) -> None:
    argv = [sys.executable, "-c", REAPER, str(tmp_path / "w.log"), TREE]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    reaped, zombies = done.stdout.split()[1::2]
    assert int(reaped) >= 4 and zombies == "0"  # worker, 3 children, the daemon: all reaped


def test_leftovers_are_found_by_pid_and_start_time_and_killed(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               start_new_session=True)  # fmt: skip
    try:
        start = shim.start_time(sleeper.pid)
        record = {"launcher": 1, "pgid": sleeper.pid, "processes": [[sleeper.pid, start]]}
        shim.write_pids(tmp_path / "worker-0.log.pids", record)
        reused = {"launcher": 1, "pgid": 1 << 22, "processes": [[sleeper.pid, 1]]}  # pid reused
        shim.write_pids(tmp_path / "worker-1.log.pids", reused)
        found = find_leftovers(tmp_path)
        assert [(f.pids_path.name, f.pids) for f in found] == [
            ("worker-0.log.pids", (sleeper.pid,))
        ]
        assert not (tmp_path / "worker-1.log.pids").exists()  # stale: removed
        assert kill_leftovers(found[0].pids_path) == []
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert find_leftovers(tmp_path) == [] and not list(tmp_path.glob("*.pids"))
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_read_tail(tmp_path: Path) -> None:
    path = tmp_path / "log"
    assert read_tail(path, 0, 5) == []  # no file yet
    path.write_bytes(b"old\nnew 1\nnew 2\n\xff\n")
    assert read_tail(path, 4, 10) == ["new 1", "new 2", "\ufffd"]
    assert read_tail(path, 0, 2) == ["new 2", "\ufffd"]
    path.write_bytes(b"x" * 100_000 + b"\nlast\n")
    assert read_tail(path, 0, 1) == ["last"]
