"""The package builds as a wheel and an sdist, and the wheel works in a fresh environment.

The wheel is built in pure-Python mode here (mypyc is exercised by `make install` already) and
installed without dependencies into a new virtual environment that borrows this one's
site-packages for them, so the test needs no network and takes seconds, not minutes.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run(*argv: str | Path, **kw: object) -> str:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=False, timeout=300, **kw
    )  # type: ignore[call-overload]
    assert result.returncode == 0, result.stdout + result.stderr
    return str(result.stdout)


def test_wheel_and_sdist_build_and_the_wheel_runs(tmp_path: Path) -> None:
    env = os.environ | {"SGLANG_DP_PURE_PYTHON": "1"}
    run(sys.executable, "-m", "build", "--outdir", tmp_path / "dist", ROOT, env=env)
    wheels = list((tmp_path / "dist").glob("sglang_dp-*.whl"))
    [sdist] = (tmp_path / "dist").glob("sglang_dp-*.tar.gz")
    assert len(wheels) == 1
    with tarfile.open(sdist) as archive:  # setup.py compiles what it lists, from the sdist too
        assert any(name.endswith("/compiled.txt") for name in archive.getnames())
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    purelib = run(
        venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
    )
    Path(purelib.strip(), "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--quiet", wheels[0])
    where = run(
        venv / "bin" / "python", "-c", "import sglang_dp.router.server as s; print(s.__file__)"
    )
    assert where.startswith(str(venv)), where  # the wheel's copy, not this checkout's
    help_text = run(venv / "bin" / "sglang-dp", "--help")
    for name in ("launch", "router", "sim-worker", "inspect-tree", "top"):
        assert name in help_text
        run(venv / "bin" / "sglang-dp", name, "--help")
