"""A stand-in for `python -m sglang.launch_server` with the process tree of a real one.

SGLang's launch_server starts a scheduler per TP rank and a detokenizer, and those hold the GPU.
This one starts two scheduler-like children that ignore SIGTERM and never watch their parent, and
a detokenizer-like child that obeys SIGTERM (FAKE_SGLANG_CHILDREN=N changes the number of
schedulers), prints `fake-sglang children PID ...`, then serves as the simulated worker
(`python -m sglang_dp.sim` with the same flags). Killing it leaves its children running, as a real
worker killed before its children noticed would.
"""

from __future__ import annotations

import os
import subprocess
import sys

SCHEDULER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1e6)"
DETOKENIZER = "import time; time.sleep(1e6)"


def main() -> None:
    schedulers = int(os.environ.get("FAKE_SGLANG_CHILDREN", "2"))
    codes = [SCHEDULER] * schedulers + [DETOKENIZER]
    children = [subprocess.Popen([sys.executable, "-c", code]) for code in codes]
    os.write(1, ("fake-sglang children " + " ".join(str(c.pid) for c in children) + "\n").encode())
    from sglang_dp.sim.__main__ import main as serve

    sys.argv[0] = "sglang.launch_server"
    serve()


if __name__ == "__main__":
    main()
