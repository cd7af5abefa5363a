"""What Ray costs `launch`: start-up overhead, replacing a dead actor, teardown.

Starts a local Ray instance on loopback (dp logical GPUs; its own start is `ray_start_s`), then,
per run, `sglang-dp launch --ray ADDRESS --simulate --dp N -- --startup-seconds 2` (every
simulated worker takes 2 s from its process start to be ready):
- `ray_ready_overhead_s`: launch start until the router reports N healthy workers, minus those
  2 s (Python and ray import, connecting, placing the group, starting actors, health checks);
  `local_ready_overhead_s` is the same for a plain `launch` in the same run, for comparison;
- `ray_replace_s`: one worker's actor SIGKILLed until a new worker process is routable again
  (includes the supervisor's 0.5 s backoff and the replacement's 2 s start-up);
- `ray_teardown_s`: SIGINT until the launcher has exited, every actor and worker is gone and
  Ray reports all GPUs free and no placement group left.

    python benchmarks/bench_ray.py [--json] [--dp 4] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from sglang_dp.launcher.ports import free_port, free_port_band
from sglang_dp.launcher.ray_cluster import LOOPBACK_ENV
from support import SGLANG_DP, STARTUP_S, launch_healthy_workers

POLL_S = 0.01


def get_json(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as reply:
            return json.load(reply)
    except (OSError, ValueError):
        return None


def until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> float:
    """Poll `condition`; the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {what}")
        time.sleep(POLL_S)
    return time.monotonic()


def sim_workers() -> dict[int, psutil.Process]:
    """Simulated workers under this process (Ray's raylet is our child), by port."""
    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            argv = p.cmdline()
            # the worker itself, not a wrapper naming it further on
            if argv[1:3] == ["-m", "sglang_dp.sim"] and p.status() != psutil.STATUS_ZOMBIE:
                found[int(argv[argv.index("--port") + 1])] = p
        except (psutil.Error, ValueError):
            continue
    return found


def actor_of(worker: psutil.Process) -> psutil.Process:
    """The Ray actor process that started the worker (its closest `ray::` ancestor)."""
    return next(p for p in worker.parents() if p.name().startswith("ray::"))


def start_launch(dp: int, log_dir: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [
        SGLANG_DP, "launch", "--simulate", "--dp", str(dp), "--port", str(port),
        "--worker-base-port", str(free_port_band(dp * 10)), "--log-dir", log_dir, "--no-dashboard",
        *extra, "--", "--startup-seconds", str(STARTUP_S),
    ]  # fmt: skip
    output = (Path(log_dir) / "launch.out").open("w")
    proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def ready_after(proc: subprocess.Popen[bytes], port: int, dp: int, start: float) -> float:
    def ready() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"launch exited with {proc.returncode}")
        return launch_healthy_workers(port) == dp

    return until(ready, "launch ready") - start


def local_overhead(dp: int, log_dir: str) -> float:
    start = time.monotonic()
    proc, port = start_launch(dp, log_dir)
    try:
        return ready_after(proc, port, dp, start) - STARTUP_S
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)


def routed_pids(port: int) -> set[int]:
    stats = get_json(port, "/debug/stats") or {"workers": []}
    workers = sim_workers()
    return {workers[int(w["url"].rsplit(":", 1)[1])].pid for w in stats["workers"]
            if int(w["url"].rsplit(":", 1)[1]) in workers}  # fmt: skip


def ray_run(ray: Any, address: str, dp: int, log_dir: str) -> tuple[float, float, float]:
    start = time.monotonic()
    proc, port = start_launch(dp, log_dir, "--ray", address)
    try:
        ready = ready_after(proc, port, dp, start) - STARTUP_S
        before = routed_pids(port)
        victim = actor_of(next(iter(sim_workers().values())))
        killed_at = time.monotonic()
        victim.kill()
        replaced = until(
            lambda: (
                launch_healthy_workers(port) == dp
                and len(pids := routed_pids(port)) == dp
                and bool(pids - before)
            ),
            "replacement routable",
        )
        gone = [*sim_workers().values()]
        gone += [actor_of(p) for p in gone]
        stop_at = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        total = ray.cluster_resources().get("GPU", 0.0)
        until(
            lambda: (
                proc.poll() is not None
                and not any(_alive(p) for p in gone)
                and ray.available_resources().get("GPU", 0.0) == total
                and all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())
            ),
            "teardown",
        )
        return ready, replaced - killed_at, time.monotonic() - stop_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def figures(dp: int, runs: int) -> dict[str, Any]:
    """Start a local Ray instance on loopback, measure `runs` Ray launches (and as many local
    ones, for comparison), stop it; the figures by name."""
    os.environ[LOOPBACK_ENV] = "0"  # before ray is imported: the instance stays on loopback
    import ray

    started = time.monotonic()
    context = ray.init(
        num_cpus=dp, num_gpus=dp, include_dashboard=False,
        _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="warning",
    )  # fmt: skip
    ray_start = time.monotonic() - started
    address = context.address_info["gcs_address"]
    try:
        with tempfile.TemporaryDirectory() as log_dir:
            local = [local_overhead(dp, log_dir) for _ in range(runs)]
            results = [ray_run(ray, address, dp, log_dir) for _ in range(runs)]
    finally:
        ray.shutdown()
    median = lambda values: round(statistics.median(values), 3)  # noqa: E731
    return {
        "ray_dp": dp,
        "ray_start_s": round(ray_start, 3),
        "ray_ready_overhead_s": median(r[0] for r in results),
        "local_ready_overhead_s": median(local),
        "ray_replace_s": median(r[1] for r in results),
        "ray_teardown_s": median(r[2] for r in results),
        "ray_ready_overhead_s_all": [round(r[0], 3) for r in results],
        "ray_replace_s_all": [round(r[1], 3) for r in results],
        "ray_teardown_s_all": [round(r[2], 3) for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    result = figures(args.dp, args.runs)
    Path(__file__).with_name("results_ray.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>26}  {value}")


if __name__ == "__main__":
    main()
