"""Service discovery under scaling: how fast pods join and leave routing, and what load sees.

A fake Kubernetes API server (tests/discovery/fake_kube.py: real LIST/WATCH over HTTP, in this
process) and `sglang-dp router --service-discovery` (default health checks: 5 s) in front of
simulated workers, each a pod on its own loopback address (127.0.0.2, ...; one port,
`--time-scale 10`). 16 clients send `/generate` requests back to back (prompts that share no
prefix, so cache_aware sends each to the shortest queue and a new worker is chosen as soon as it
is routable; 16 new tokens) the whole time. The cluster scales 4 → 8 → 2 pods:

- up: each new pod's worker starts, its pod is added unready, and once the worker answers
  /health the pod turns Ready (what the kubelet's readiness probe does);
- down: graceful deletion as Kubernetes does it: deletionTimestamp set (the router stops sending
  it requests), a 1 s preStop-like wait (`--prestop-s`), SIGTERM to the worker, then the pod
  object is deleted.

Figures (`results_discovery.json`):
- `pod_ready_to_routed_s`: a pod turning Ready → the first request the router sends to it
  (its routed count, polled every 5 ms); median of the 4 new pods, and the max. Target ≤ 1 s;
- `pod_deleted_to_unrouted_s`: deletionTimestamp set → the router no longer lists the worker;
  median of the 6 removed pods, and the max. Target ≤ 1 s;
- `requests_failed_during_scale`: client requests that did not get a 200, over the whole run
  (with `requests_during_scale`, how many were sent). Target 0.

    python benchmarks/bench_discovery.py [--json] [--prestop-s 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the fake API server lives with the tests that use it

from tests.discovery.fake_kube import FakeKube  # noqa: E402

from sglang_dp.launcher.ports import free_port  # noqa: E402
from support import process  # noqa: E402

SGLANG_DP = str(Path(sys.executable).parent / "sglang-dp")
RESULTS = Path(__file__).with_name("results_discovery.json")
LABELS = {"app": "sglang"}
START, PEAK, END = 4, 8, 2
CLIENTS = 16
PRESTOP_S = 1.0
POLL_S = 0.005
DEADLINE_S = 30.0
TARGETS = {"pod_ready_to_routed_s": 1.0, "pod_deleted_to_unrouted_s": 1.0}


class Bench:
    def __init__(self, stack: ExitStack, kube: FakeKube, port: int, prestop_s: float) -> None:
        self.stack, self.kube, self.port = stack, kube, port
        self.prestop_s = prestop_s
        self.workers: dict[str, subprocess.Popen[bytes]] = {}  # pod name → process
        self.router_url = ""
        self.sent = 0
        self.failed = 0
        self.failures: list[str] = []
        self.stopping = False

    def ip(self, index: int) -> str:
        return f"127.0.0.{2 + index}"

    def url(self, index: int) -> str:
        return f"http://{self.ip(index)}:{self.port}"

    def start_worker(self, index: int) -> None:
        argv = [SGLANG_DP, "sim-worker", "--host", self.ip(index), "--port", str(self.port),
                "--log-level", "warning", "--time-scale", "10",
                "--enable-cache-report"]  # fmt: skip
        stack = ExitStack()
        self.workers[f"sglang-{index}"] = stack.enter_context(process(argv))
        self.stack.callback(stack.close)

    async def stats(self, session: Any) -> dict[str, Any]:
        async with session.get(self.router_url + "/debug/stats") as reply:
            return await reply.json()  # type: ignore[no-any-return]

    async def wait_healthy(self, session: Any, url: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health") as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{url} never became healthy")

    async def client(self, session: Any, number: int) -> None:
        import aiohttp

        i = 0
        while not self.stopping:
            i += 1
            text = f"{number}-{i}: " + "a question that shares no prefix with the others " * 4
            body = {"text": text, "sampling_params": {"max_new_tokens": 16}}
            self.sent += 1
            try:
                async with session.post(self.router_url + "/generate", json=body) as reply:
                    await reply.read()
                    if reply.status != 200:
                        self.failed += 1
                        self.failures.append(f"{reply.status}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.failed += 1
                self.failures.append(type(exc).__name__)

    async def scale_up(self, session: Any, index: int) -> float:
        """Start the pod's worker, add it unready, turn it Ready once healthy: seconds from
        Ready to the first request routed to it."""
        name, url = f"sglang-{index}", self.url(index)
        self.start_worker(index)
        self.kube.add_pod(name, self.ip(index), LABELS, ready=False)
        await self.wait_healthy(session, url)
        ready_at = time.monotonic()
        self.kube.set_ready(name, True)
        while time.monotonic() - ready_at < DEADLINE_S:
            routed = {w["url"]: w["routed"] for w in (await self.stats(session))["workers"]}
            if routed.get(url, 0) > 0:
                return time.monotonic() - ready_at
            await asyncio.sleep(POLL_S)
        raise RuntimeError(f"no request was routed to {url} in {DEADLINE_S} s")

    async def scale_down(self, session: Any, index: int) -> float:
        """Graceful deletion: seconds from deletionTimestamp to the worker's leaving routing."""
        name, url = f"sglang-{index}", self.url(index)
        deleting_at = time.monotonic()
        self.kube.terminate(name)
        while url in {w["url"] for w in (await self.stats(session))["workers"]}:
            if time.monotonic() - deleting_at > DEADLINE_S:
                raise RuntimeError(f"{url} was still routed {DEADLINE_S} s after its deletion")
            await asyncio.sleep(POLL_S)
        took = time.monotonic() - deleting_at
        await asyncio.sleep(max(self.prestop_s - took, 0.0))  # the preStop wait, then SIGTERM
        proc = self.workers.pop(name)
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 10)
        self.kube.delete(name)
        return took

    async def run(self) -> dict[str, Any]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=CLIENTS + 8)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            clients = [asyncio.create_task(self.client(session, n)) for n in range(CLIENTS)]
            await asyncio.sleep(1.0)  # steady load before scaling
            ready = [await self.scale_up(session, i) for i in range(START, PEAK)]
            await asyncio.sleep(1.0)
            deleted = [await self.scale_down(session, i) for i in range(END, PEAK)]
            await asyncio.sleep(1.0)
            self.stopping = True
            await asyncio.gather(*clients)
            final = await self.stats(session)
        return {
            "pod_ready_to_routed_s": round(statistics.median(ready), 3),
            "pod_ready_to_routed_max_s": round(max(ready), 3),
            "pod_deleted_to_unrouted_s": round(statistics.median(deleted), 3),
            "pod_deleted_to_unrouted_max_s": round(max(deleted), 3),
            "requests_failed_during_scale": self.failed,
            "requests_during_scale": self.sent,
            "failures": sorted(set(self.failures)),
            "workers_at_end": sorted(w["url"] for w in final["workers"]),
            "discovery_lists": final["discovery"]["lists"],
        }


def measure(prestop_s: float) -> dict[str, Any]:
    port = free_port()
    with ExitStack() as stack, FakeKube() as kube, tempfile.TemporaryDirectory() as tmp:
        bench = Bench(stack, kube, port, prestop_s)
        for i in range(START):
            bench.start_worker(i)
            kube.add_pod(f"sglang-{i}", bench.ip(i), LABELS)
        router_port = free_port()
        bench.router_url = f"http://127.0.0.1:{router_port}"
        argv = [SGLANG_DP, "router", "--port", str(router_port), "--log-level", "warning",
                "--service-discovery", "--selector", "app=sglang", "--service-discovery-port",
                str(port), "--kubeconfig", kube.kubeconfig(f"{tmp}/kubeconfig")]  # fmt: skip
        stack.enter_context(process(argv))
        return asyncio.run(_when_routing(bench, START))


async def _when_routing(bench: Bench, count: int) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 60
        while True:
            try:
                async with session.get(bench.router_url + "/readiness") as reply:
                    if reply.status == 200 and (await reply.json())["healthy_workers"] >= count:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the router never routed to the first pods")
            await asyncio.sleep(0.05)
    return await bench.run()


def table(out: dict[str, Any]) -> str:
    lines = [f"{key:32}{value}" for key, value in out.items() if key != "targets_met"]
    for key, bound in TARGETS.items():
        verdict = "met" if out["targets_met"][key] else "MISSED"
        lines.append(f"{key:32}target <= {bound:g} s: {verdict}")
    verdict = "met" if out["targets_met"]["requests_failed_during_scale"] else "MISSED"
    lines.append(f"{'requests_failed_during_scale':32}target 0: {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--prestop-s",
        type=float,
        default=PRESTOP_S,
        help="wait between deletionTimestamp and SIGTERM (0: a pod without a preStop hook)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        out = measure(args.prestop_s)
    except KeyboardInterrupt:
        sys.exit("interrupted: workers and router stopped")
    out["targets_met"] = {key: out[key] <= bound for key, bound in TARGETS.items()}
    out["targets_met"]["requests_failed_during_scale"] = out["requests_failed_during_scale"] == 0
    out["prestop_s"] = args.prestop_s
    if args.prestop_s == PRESTOP_S:  # the figures quoted; other waits are experiments
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out) if args.json else table(out))


if __name__ == "__main__":
    main()
