"""The installed `sglang-dp bench --compare`: one fresh simulated cluster per policy, then gone.

No timing assertions: the figures are checked for consistency (counts, cold caches, ratios
against the last policy), the files for their format, and the machine for leftovers.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.processes import SGLANG_DP

pytestmark = pytest.mark.slow

WORKLOAD = (
    *("--workload", "shared-prefix", "--num-groups", "3", "--prompts-per-group", "4"),
    *("--system-prompt-len", "200", "--question-len", "10", "--output-len", "4"),
)


def compare(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SGLANG_DP, "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )


def listening(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((parts.hostname or "", parts.port or 80)) == 0


def test_each_policy_gets_a_fresh_cluster_and_everything_stops(tmp_path: Path) -> None:
    out, png = tmp_path / "compare.json", tmp_path / "compare.png"
    proc = compare(
        tmp_path,
        *("--compare", "cache_aware,round_robin", "--simulate", "--dp", "2", *WORKLOAD),
        *("--output", str(out), "--plot", str(png), "--", "--time-scale", "1000"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratios against round_robin" in proc.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    assert list(data["policies"]) == ["cache_aware", "round_robin"]  # headline figures, in order
    assert data["baseline"] == "round_robin"
    for policy, run in data["runs"].items():
        assert run["completed"] == run["planned"] == 12 and run["failed"] == 0, policy
        assert data["policies"][policy]["completed"] == 12
        assert sum(run["per_worker"].values()) == 12
        # a fresh cluster: nothing cached before the run, so no policy can beat the oracle
        assert run["hit_rate"] <= run["oracle_hit_rate"] + 1e-9, policy
        assert not any(listening(url) for url in [run["url"], *run["per_worker"]]), policy
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_comparisons_are_refused_before_anything_starts(tmp_path: Path) -> None:
    unknown = compare(tmp_path, "--compare", "cache_aware,bogus", "--simulate", "--dp", "2")
    assert unknown.returncode == 2 and "unknown policy 'bogus'" in unknown.stderr
    real = compare(tmp_path, "--compare", "cache_aware,round_robin", "--dp", "2")
    assert real.returncode == 2 and "add --simulate" in real.stderr
