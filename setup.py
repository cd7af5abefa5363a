"""Compiles the request path with mypyc when it is available: the routing core (tree, policies,
engine) and the lean HTTP data path (the server front, the upstream client, the proxy).

The compiled modules are the same typed Python, about twice as fast on the request path; set
SGLANG_DP_PURE_PYTHON=1 to install the plain Python modules (the code works the same either way).
mypyc type-checks what the compiled modules import, in the isolated build environment: the
typed packages they import are build requirements too (pyproject.toml).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

# one source path a line; the Makefile (reinstall when one changes) and tests/conftest.py (refuse a
# stale build) read the same file
COMPILED = Path(__file__).parent / "compiled.txt"


def extensions() -> list:
    if os.environ.get("SGLANG_DP_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    return mypycify(COMPILED.read_text(encoding="utf-8").split(), opt_level="3")


setup(ext_modules=extensions())
