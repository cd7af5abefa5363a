"""How fast `launch` gets out of the way, and how well it owns and supervises what it starts.

- `ready_overhead_s`: `sglang-dp launch --simulate --dp 8 -- --startup-seconds 2` (every simulated
  worker takes 2 s from its process start to be ready): the time until the router reports 8
  healthy workers minus those 2 s (the launcher's start, spawning, health checks, router start).
- `shutdown_s`: then SIGINT at idle, until the launcher and every descendant are gone.
- `orphans_after_sigkill`: `launch --dp 2` of a stand-in SGLang whose workers each start three
  children, two of which ignore SIGTERM and none watches its parent (tests/fake_sglang); SIGKILL
  of the launcher once while the workers start and once at steady state; how many of the
  launcher's descendants are still alive 5 s later (both runs summed; target 0).
- `ctrl_c_exit_s_under_load`: `launch --simulate --dp 4 -- --time-scale 5` (what `make demo` runs)
  under examples/steady_load.py (8 clients, which keep sending); SIGINT to the launcher only;
  until the launcher and every descendant are gone (target ≤ 1.5 s).
- `hung_worker_replaced_s`: `launch --simulate --dp 2 --unhealthy-restart-secs 2` with health
  checks every 0.5 s (timeout 0.5 s); SIGSTOP of worker 0's process; until a new worker 0 is
  healthy in the router (target ≤ 2 s + its start-up + 2 s). `hung_worker_left_routing_s`: until
  the router stopped sending it requests.

- With Ray installed, the Ray figures of `bench_ray.py` too (`ray_ready_overhead_s`,
  `ray_replace_s`, `ray_teardown_s`, over `--ray-dp` workers; `--ray-dp 0` skips them).

    python benchmarks/bench_launch.py [--json] [--dp 8] [--runs 3] [--ray-dp 4]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from sglang_dp.launcher.ports import free_port, free_port_band
from support import SGLANG_DP, STARTUP_S, launch_healthy_workers


def one_run(dp: int, log_dir: str) -> tuple[float, float]:
    port = free_port()
    argv = [
        SGLANG_DP, "launch", "--simulate", "--dp", str(dp), "--port", str(port),
        "--worker-base-port", str(free_port_band(dp * 10)), "--log-dir", log_dir, "--no-dashboard",
        "--", "--startup-seconds", str(STARTUP_S),
    ]  # fmt: skip
    start = time.monotonic()
    output = Path(log_dir) / "launch.out"
    proc = subprocess.Popen(
        argv, stdout=output.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = start + 60
        while launch_healthy_workers(port) < dp:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"launch did not become ready: {output.read_text()[-2000:]}")
            time.sleep(0.01)
        ready = time.monotonic() - start
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        stop_at = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        while any(psutil.pid_exists(pid) and _alive(pid) for pid in tree):
            proc.poll()
            time.sleep(0.005)
        return ready - STARTUP_S, time.monotonic() - stop_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


FAKE_SGLANG = Path(__file__).parents[1] / "tests" / "fake_sglang"
STEADY_LOAD = Path(__file__).parents[1] / "examples" / "steady_load.py"
HUNG_RESTART_S = 2.0


def start_launch(
    log_dir: str, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [SGLANG_DP, "launch", "--port", str(port), "--log-dir", log_dir, "--no-dashboard",
            "--worker-base-port", str(free_port_band(100)), *args]  # fmt: skip
    output = Path(log_dir) / "launch.out"
    proc = subprocess.Popen(argv, stdout=output.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)  # fmt: skip
    return proc, port


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `condition`; the time it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


def wait_healthy(proc: subprocess.Popen[bytes], port: int, count: int, log_dir: str) -> None:
    """Until the router reports `count` healthy workers; the launch's output if it never does."""
    deadline = time.monotonic() + 120
    while launch_healthy_workers(port) != count:
        if proc.poll() is not None or time.monotonic() > deadline:
            output = (Path(log_dir) / "launch.out").read_text()[-3000:]
            raise SystemExit(f"launch never had {count} healthy workers:\n{output}")
        time.sleep(0.01)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_everything(proc: subprocess.Popen[bytes], seen: list[psutil.Process]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for p in seen:
        with contextlib.suppress(psutil.Error):
            p.kill()


def orphans_after_sigkill(log_dir: str, while_starting: bool) -> int:
    """Descendants of a SIGKILLed launcher (stand-in SGLang trees) still alive 5 s later."""
    env = {**os.environ, "PYTHONPATH": str(FAKE_SGLANG)}
    slow = ["--startup-seconds", "30"] if while_starting else []
    proc, port = start_launch(log_dir, "--model-path", "fake", "--gpus", "0,1", "--dp", "2",
                              "--", "--time-scale", "1000", *slow, env=env)  # fmt: skip
    seen: list[psutil.Process] = []
    try:
        if while_starting:  # every worker has started its three children
            wait_until(lambda: len(descendants(proc.pid)) >= 10, 60, "the trees")
        else:
            wait_healthy(proc, port, 2, log_dir)
        seen = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with contextlib.suppress(SystemExit):
            wait_until(lambda: not any(_alive(p.pid) for p in seen), 5.0, "orphans gone")
        return sum(_alive(p.pid) for p in seen)
    finally:
        kill_everything(proc, seen)


def ctrl_c_under_load(log_dir: str) -> float:
    proc, port = start_launch(log_dir, "--simulate", "--dp", "4", "--", "--time-scale", "5")
    load = subprocess.Popen([sys.executable, str(STEADY_LOAD), "--url", f"http://127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    seen: list[psutil.Process] = []
    try:
        wait_healthy(proc, port, 4, log_dir)
        time.sleep(3.0)  # the load is steady: every client has requests in flight
        seen = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGINT)
        return wait_until(
            lambda: proc.poll() is not None and not any(_alive(p.pid) for p in seen), 30, "exit"
        )
    finally:
        kill_everything(proc, seen)
        load.kill()
        load.wait()


def hung_worker_replaced(log_dir: str) -> tuple[float, float]:
    proc, port = start_launch(
        log_dir, "--simulate", "--dp", "2", "--unhealthy-restart-secs", str(HUNG_RESTART_S),
        "--health-check-interval-secs", "0.5", "--health-check-timeout-secs", "0.5",
        "--", "--time-scale", "100",
    )  # fmt: skip
    seen: list[psutil.Process] = []
    try:
        wait_healthy(proc, port, 2, log_dir)
        seen = descendants(proc.pid)
        shim = min((p for p in seen if p.ppid() == proc.pid), key=lambda p: p.pid)
        worker = shim.children()[0]
        worker.suspend()
        left = wait_until(lambda: launch_healthy_workers(port) == 1, 60, "the hung worker out")
        back = wait_until(lambda: launch_healthy_workers(port) == 2, 60, "its replacement")
        return left + back, left
    finally:
        kill_everything(proc, seen + descendants(proc.pid))


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ray-dp", type=int, default=4, help="Ray figures' workers (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as log_dir:
        runs = [one_run(args.dp, log_dir) for _ in range(args.runs)]
    with tempfile.TemporaryDirectory() as log_dir:
        orphans = [orphans_after_sigkill(log_dir, starting) for starting in (True, False)]
    with tempfile.TemporaryDirectory() as log_dir:
        ctrl_c = ctrl_c_under_load(log_dir)
    with tempfile.TemporaryDirectory() as log_dir:
        replaced, left = hung_worker_replaced(log_dir)
    result = {
        "dp": args.dp,
        "runs": args.runs,
        "ready_overhead_s": round(statistics.median(r[0] for r in runs), 3),
        "shutdown_s": round(statistics.median(r[1] for r in runs), 3),
        "ready_overhead_s_all": [round(r[0], 3) for r in runs],
        "shutdown_s_all": [round(r[1], 3) for r in runs],
        "orphans_after_sigkill": sum(orphans),
        "orphans_after_sigkill_starting_steady": orphans,
        "ctrl_c_exit_s_under_load": round(ctrl_c, 3),
        "hung_worker_replaced_s": round(replaced, 3),
        "hung_worker_left_routing_s": round(left, 3),
        "unhealthy_restart_secs": HUNG_RESTART_S,
    }
    if args.ray_dp and importlib.util.find_spec("ray") is not None:
        import bench_ray  # the Ray figures (bench_ray.py beside this file)

        result.update(bench_ray.figures(args.ray_dp, args.runs))
    Path(__file__).with_name("results_launch.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>20}  {value}")


if __name__ == "__main__":
    main()
