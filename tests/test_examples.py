"""Every example that needs no GPU runs against a simulated cluster and says what it should."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.router.cluster import Cluster, cluster

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def two() -> Iterator[Cluster]:
    with cluster(2) as c:
        yield c


def run(example: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / example), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_example_opens_with_a_line_on_what_it_shows() -> None:
    for path in sorted(p for p in EXAMPLES.rglob("*") if p.is_file()):
        text = path.read_text()
        first = text.split('"""')[1] if path.suffix == ".py" else text.splitlines()[1]
        assert len(first.strip()) > 20, path.name


def test_openai_client(two: Cluster) -> None:
    out = run("openai_client.py", "--url", two.router.url)
    assert "answer:" in out and "streamed:" in out and "worker: http://127.0.0.1:" in out


def test_shared_prefix_hit_rate(two: Cluster) -> None:
    out = run("shared_prefix_hit_rate.py", "--url", two.router.url)
    rate = float(out.split("cache hit rate: ")[1].split("%")[0])
    assert rate > 70
    assert out.count("8 requests on") == 4  # each system prompt stayed on one worker


def test_why_this_worker(two: Cluster) -> None:
    out = run("why_this_worker.py", "--url", two.router.url, "some prompt")
    assert out.startswith("→ http://127.0.0.1:") and out.count("in flight") == 2


def test_gpu_example_is_a_valid_launch_command() -> None:
    text = (EXAMPLES / "launch_8_gpus_tp2.sh").read_text()
    assert "sglang-dp launch" in text and "--tp 2" in text and " -- " in text
