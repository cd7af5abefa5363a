"""What several benchmark scripts need: a child process that is always stopped, JSON over HTTP,
polling for a condition while watching the process it depends on, and simulated workers and
a router started as the user would (`sglang-dp sim-worker`, `sglang-dp router`), and the figures
written to the results file and printed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from sglang_dp.launcher.ports import free_port
from sglang_dp.launcher.process import stop_group

SGLANG_DP = str(Path(sys.executable).parent / "sglang-dp")
STARTUP_S = 2.0  # launch benchmarks: each simulated worker's start-up (--startup-seconds)


@contextmanager
def process(
    argv: list[str], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own session; TERM to its process group at the end, KILL if it lingers."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    try:
        yield proc
    finally:
        stop_group(proc)


def get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.loads(reply.read())


def wait_until(
    check: Callable[[], Any], proc: subprocess.Popen[bytes], what: str, timeout: float = 60
) -> None:
    """Poll `check` (connection errors count as not yet) until it is true; an error if `proc`
    exits first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, urllib.error.HTTPError, ValueError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout:.0f} s")
        time.sleep(0.05)


def healthy_workers(url: str) -> int:
    """The router's /readiness count (its 503 when none is healthy included)."""
    try:
        return int(get_json(url + "/readiness")["healthy_workers"])
    except urllib.error.HTTPError as refused:
        return int(json.loads(refused.read())["healthy_workers"])


def launch_healthy_workers(port: int) -> int:
    """What `launch`'s router on 127.0.0.1:`port` counts as healthy (0 while it does not
    answer: the launch benchmarks poll it from the launcher's start)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readiness", timeout=1) as reply:
            return int(json.load(reply)["healthy_workers"])
    except (OSError, ValueError, KeyError):
        return 0


def start_worker(stack: ExitStack, *args: str) -> str:
    port = free_port()
    proc = stack.enter_context(
        process([SGLANG_DP, "sim-worker", "--port", str(port), *args, "--log-level", "error"])
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: get_json(url + "/get_model_info"), proc, f"worker {url}")
    return url


def start_router(
    stack: ExitStack, workers: list[str], *args: str
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    argv = [SGLANG_DP, "router", "--port", str(port), "--worker-urls", *workers, *args]
    proc = stack.enter_context(process([*argv, "--log-level", "error"]))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: healthy_workers(url) == len(workers), proc, "router")
    return url, proc


def publish(figures: dict[str, Any], results: Path, as_json: bool) -> None:
    """Write the figures to their results file, and print them: one JSON object, or a line each."""
    results.write_text(json.dumps(figures, indent=1) + "\n")
    if as_json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key}: {value}")
