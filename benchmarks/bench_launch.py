"""How fast `launch` gets out of the way: start-up overhead and shutdown time.

Runs `sglang-dp launch --simulate --dp 8 -- --startup-seconds 2` (every simulated worker takes
2 s from its process start to be ready), measures the time until the router reports 8 healthy
workers minus those 2 s (`ready_overhead_s`: the launcher's start, spawning, health checks,
router start), then sends SIGINT at idle and measures until the launcher and every worker are
gone (`shutdown_s`).

    python benchmarks/bench_launch.py [--json] [--dp 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from sglang_dp.launcher.process import free_port, free_port_band

STARTUP_S = 2.0
SGLANG_DP = str(Path(sys.executable).parent / "sglang-dp")


def healthy_workers(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readiness", timeout=1) as reply:
            return int(json.load(reply)["healthy_workers"])
    except (OSError, ValueError, KeyError):
        return 0


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
        while healthy_workers(port) < dp:
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as log_dir:
        runs = [one_run(args.dp, log_dir) for _ in range(args.runs)]
    result = {
        "dp": args.dp,
        "runs": args.runs,
        "ready_overhead_s": round(statistics.median(r[0] for r in runs), 3),
        "shutdown_s": round(statistics.median(r[1] for r in runs), 3),
        "ready_overhead_s_all": [round(r[0], 3) for r in runs],
        "shutdown_s_all": [round(r[1], 3) for r in runs],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>20}  {value}")


if __name__ == "__main__":
    main()
