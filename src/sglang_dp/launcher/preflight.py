"""What the Python that will run the workers offers, asked before any worker starts (shell).

Each check costs one start of that interpreter (`python`), never an import of sglang in it (that
takes seconds):
- `sglang_importable(python)`: whether sglang is found (importlib.util.find_spec);
- `sglang_accepts_flag(python, flag)`: whether its `launch_server` has `flag` (`--nccl-port`:
  0.5+; `--kv-events-config`). It reads sglang's srt/server_args.py for the quoted flag; should
  that file have moved, it asks `python -m sglang.launch_server --help` (which imports torch:
  up to HELP_TIMEOUT_S, 300 s). False when unknown. Call once per launch.
A check that cannot start or hangs past CHECK_TIMEOUT_S (60 s: a cold start on a busy node's
network filesystem is slow) answers no.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

CHECK_TIMEOUT_S = 60.0  # a cold Python start on a busy node's network filesystem is slow
HELP_TIMEOUT_S = 300.0  # `launch_server --help` imports torch
NCCL_PORT_FLAG = "--nccl-port"

# Exit status of the server_args.py probe (see _FLAG_PROBE: argv[1] is the flag)
_PROBE_YES, _PROBE_NO = 0, 1
_FLAG_PROBE = """
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("sglang")
for root in (spec.submodule_search_locations or []) if spec else []:
    source = pathlib.Path(root, "srt", "server_args.py")
    if source.is_file():
        sys.exit(0 if f'"{sys.argv[1]}"' in source.read_text(errors="replace") else 1)
sys.exit(2)
"""
_IMPORTABLE_PROBE = (
    "import importlib.util, sys; sys.exit(importlib.util.find_spec('sglang') is None)"
)


def sglang_importable(python: str) -> bool:
    """Whether `python` can import sglang (found without importing it: that takes seconds)."""
    done = _run_quietly([python, "-c", _IMPORTABLE_PROBE], CHECK_TIMEOUT_S)
    return done is not None and done.returncode == 0


def sglang_accepts_nccl_port(python: str) -> bool:
    """Whether the sglang that `python` imports has `--nccl-port` (0.5+); False if unknown."""
    return sglang_accepts_flag(python, NCCL_PORT_FLAG)


def sglang_accepts_flag(python: str, flag: str) -> bool:
    """Whether the sglang that `python` imports has `flag` (`--nccl-port`,
    `--kv-events-config`); False if unknown."""
    probe = _run_quietly([python, "-c", _FLAG_PROBE, flag], CHECK_TIMEOUT_S)
    if probe is not None and probe.returncode in (_PROBE_YES, _PROBE_NO):
        return probe.returncode == _PROBE_YES
    # server_args.py moved: ask the server itself
    done = _run_quietly([python, "-m", "sglang.launch_server", "--help"], HELP_TIMEOUT_S)
    return done is not None and flag in done.stdout


def _run_quietly(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str] | None:
    """Run a short command to completion, output captured; None if it cannot start or hangs."""
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
