"""What several benchmark scripts need: a child process that is always stopped, JSON over HTTP,
and polling for a condition while watching the process it depends on."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sglang_dp.launcher.process import stop_group


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
