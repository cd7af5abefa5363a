"""Refuses to test stale compiled modules: mypyc builds the routing core at install time."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

COMPILED = ["sglang_dp.router.tree", "sglang_dp.router.policies", "sglang_dp.router.engine"]


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
