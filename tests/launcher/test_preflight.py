"""The pre-flight checks against fake interpreters that see a fake `sglang` package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sglang_dp.launcher.preflight import sglang_accepts_nccl_port, sglang_importable


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
