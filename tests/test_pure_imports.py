"""The core imports no CLI, HTTP-client or process library: click, aiohttp and psutil belong to
the shell. Pure modules are every module of router/ and sim/ but their shell ones (named below),
the launch planning modules, and the option machinery.

One fresh interpreter imports the pure modules one after another and names the first after
which a forbidden library is loaded (a module loaded earlier cannot hide a later culprit: once a
library is loaded, the check fails).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parent.parent / "src"
FORBIDDEN = ("click", "aiohttp", "psutil")
SHELL = {  # servers, subscribers, health checks, process entries: they may import them
    "router": {"server", "app", "health", "kv_subscriber", "kv_view"},
    "sim": {"server", "asgi", "run", "__main__", "command"},
}
PLANNING = ["sglang_dp.launcher.plan", "sglang_dp.launcher.gpus", "sglang_dp.launcher.ray_plan"]
MACHINERY = ["sglang_dp.options", "sglang_dp.kv_wire"]

CHECK = """
import importlib, sys
forbidden = {forbidden!r}
for name in sys.argv[1:]:
    importlib.import_module(name)
    loaded = sorted(m for m in forbidden if m in sys.modules)
    if loaded:
        print(name, "imports", ", ".join(loaded))
        sys.exit(1)
"""


def pure_modules() -> list[str]:
    names = []
    for package, shell in SHELL.items():
        for path in sorted((SRC / "sglang_dp" / package).glob("*.py")):
            if path.stem not in shell:
                names.append(f"sglang_dp.{package}.{path.stem}".removesuffix(".__init__"))
    return names + PLANNING + MACHINERY


def test_the_shell_list_names_modules_that_exist() -> None:
    for package, shell in SHELL.items():
        for stem in shell:
            assert (SRC / "sglang_dp" / package / f"{stem}.py").is_file(), (package, stem)


def test_pure_modules_import_no_cli_http_client_or_process_library() -> None:
    modules = pure_modules()
    assert "sglang_dp.sim.cost_model" in modules and "sglang_dp.router.tree" in modules
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(forbidden=FORBIDDEN), *modules],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
