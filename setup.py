"""Compiles the routing core (tree, policies, engine) with mypyc when it is available.

The compiled modules are the same typed Python, about twice as fast on the request path; set
SGLANG_DP_PURE_PYTHON=1 to install the plain Python modules (the code works the same either way).
"""

from __future__ import annotations

import os

from setuptools import setup

COMPILED = [
    "src/sglang_dp/router/tree.py",
    "src/sglang_dp/router/policies.py",
    "src/sglang_dp/router/engine.py",
]


def extensions() -> list:
    if os.environ.get("SGLANG_DP_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    return mypycify(COMPILED, opt_level="3")


setup(ext_modules=extensions())
