"""Refuses to test stale compiled modules: mypyc builds the request path at install time.

Hypothesis runs without its per-example deadline (profile `no-deadline`, loaded unless
HYPOTHESIS_PROFILE names another): a property is about results, and a slow or shared CI machine
must not fail one for taking 200 ms on an example.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("no-deadline", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "no-deadline"))

COMPILED = Path(__file__).parent.parent / "compiled.txt"  # setup.py's list, and the Makefile's


def compiled_modules() -> list[str]:
    """The module names of compiled.txt's source paths."""
    paths = COMPILED.read_text(encoding="utf-8").split()
    return [path.removeprefix("src/").removesuffix(".py").replace("/", ".") for path in paths]


def pytest_sessionstart(session: pytest.Session) -> None:
    for name in compiled_modules():
        module_file = Path(importlib.import_module(name).__file__ or "")
        if module_file.suffix != ".so":
            continue
        source = module_file.parent / (name.rsplit(".", 1)[1] + ".py")
        if source.stat().st_mtime > module_file.stat().st_mtime:
            raise pytest.UsageError(
                f"{module_file.name} is older than {source.name}: run `make install` to rebuild"
            )
