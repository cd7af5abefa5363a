"""Refuses to test stale compiled modules: mypyc builds the request path at install time."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

COMPILED = [  # setup.py's list
    "sglang_dp.router.tree",
    "sglang_dp.router.policies",
    "sglang_dp.router.prices",
    "sglang_dp.router.kv_index",
    "sglang_dp.router.engine",
    "sglang_dp.httpserver",
    "sglang_dp.router.upstream",
    "sglang_dp.router.proxy",
]


def pytest_sessionstart(session: pytest.Session) -> None:
    for name in COMPILED:
        module_file = Path(importlib.import_module(name).__file__ or "")
        if module_file.suffix != ".so":
            continue
        source = module_file.parent / (name.rsplit(".", 1)[1] + ".py")
        if source.stat().st_mtime > module_file.stat().st_mtime:
            raise pytest.UsageError(
                f"{module_file.name} is older than {source.name}: run `make install` to rebuild"
            )
