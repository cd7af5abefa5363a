"""`sglang-dp router --service-discovery` against the fake API server, with real simulated
workers as the pods (each on its own loopback address, 127.0.0.2, 127.0.0.3, ..., one port):
scale up and down, readiness flaps, a pod replaced on its IP, an API server restart, watch
expiry, wrong RBAC, and workers added by hand."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sglang_dp.launcher.process import stop_group
from tests.discovery.fake_kube import FakeKube
from tests.processes import SGLANG_DP, Worker, free_port, sim_worker, wait_for
from tests.router.cluster import router_process

pytestmark = pytest.mark.slow
LABELS = {"app": "sglang"}
PODS = 4


@dataclass
class PodWorkers:
    port: int
    ips: list[str]

    def url(self, i: int) -> str:
        return f"http://{self.ips[i]}:{self.port}"


@contextmanager
def sim_worker_on(ip: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [SGLANG_DP, "sim-worker", "--host", ip, "--port", str(port), "--log-level", "warning",
         "--time-scale", "1000", "--enable-cache-report"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def workers() -> Iterator[PodWorkers]:
    """Simulated workers on 127.0.0.2..5, one port: the pods' containers."""
    port = free_port()
    ips = [f"127.0.0.{2 + i}" for i in range(PODS)]
    with ExitStack() as stack:
        procs = [stack.enter_context(sim_worker_on(ip, port)) for ip in ips]
        pods = PodWorkers(port, ips)
        for i, proc in enumerate(procs):
            wait_for(lambda i=i, p=proc: _healthy(pods.url(i), p), 30, "sim worker")  # type: ignore[misc]
        yield pods


def _healthy(url: str, proc: subprocess.Popen[bytes]) -> bool:
    import urllib.request

    assert proc.poll() is None, f"worker exited with {proc.returncode}"
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def discovery_args(kube: FakeKube, tmp_path: Path, port: int, *more: str) -> list[str]:
    kubeconfig = kube.kubeconfig(str(tmp_path / "kubeconfig"))
    return ["--service-discovery", "--selector", "app=sglang", "--service-discovery-port",
            str(port), "--kubeconfig", kubeconfig, *more]  # fmt: skip


class View:
    """What the router says: its workers, their pods, discovery's state."""

    def __init__(self, router: Worker) -> None:
        self.router = router

    def stats(self) -> dict[str, Any]:
        reply = self.router.get("/debug/stats")
        assert reply.status == 200, reply.body
        return reply.json()  # type: ignore[no-any-return]

    def workers(self) -> dict[str, dict[str, Any]]:
        return {w["url"]: w for w in self.router.get("/workers").json()["workers"]}

    def routable(self) -> set[str]:
        return {w["url"] for w in self.stats()["workers"] if w["healthy"]}

    def generate(self, text: str) -> str:
        """Send one request; returns the worker that answered it (by the routed counts)."""
        before = {w["url"]: w["routed"] for w in self.stats()["workers"]}
        reply = self.router.post(
            "/generate", {"text": text, "sampling_params": {"max_new_tokens": 2}}
        )
        assert reply.status == 200, reply.body
        after = {w["url"]: w["routed"] for w in self.stats()["workers"]}
        return next(u for u, n in after.items() if n > before.get(u, 0))


@contextmanager
def discovering(
    kube: FakeKube, tmp_path: Path, workers: PodWorkers, ready: int, *more: str
) -> Iterator[View]:
    args = discovery_args(kube, tmp_path, workers.port, "--policy", "round_robin", *more)
    with router_process([], *args, ready_workers=ready) as router:
        yield View(router)


def test_pods_scale_up_and_down(tmp_path: Path, workers: PodWorkers) -> None:
    with FakeKube() as kube:
        kube.add_pod("sglang-0", workers.ips[0], LABELS)
        kube.add_pod("sglang-1", workers.ips[1], LABELS)
        kube.add_pod("elsewhere", workers.ips[3], {"app": "other"})
        with discovering(kube, tmp_path, workers, 2) as view:
            assert view.routable() == {workers.url(0), workers.url(1)}
            kube.add_pod("sglang-2", workers.ips[2], LABELS, ready=False)  # starting
            wait_for(lambda: "sglang-2" in _pod_names(view), what="pod listed")
            assert workers.url(2) not in view.workers()  # not a worker until Ready
            kube.set_ready("sglang-2", True)
            wait_for(lambda: len(view.routable()) == 3, what="scale up to 3")
            assert {view.generate(f"hello {i}") for i in range(6)} == view.routable()
            record = view.workers()[workers.url(2)]["pod"]
            assert record | {"ip": None} == {
                "name": "sglang-2", "namespace": "default", "ip": None, "phase": "Running",
                "ready": True, "terminating": False, "routed": True,
            }  # fmt: skip
            kube.terminate("sglang-0")
            wait_for(lambda: workers.url(0) not in view.workers(), what="scale down")
            kube.delete("sglang-0")
            assert {view.generate(f"again {i}") for i in range(4)} == {
                workers.url(1),
                workers.url(2),
            }
            events = view.stats()["events"]
            assert any("sglang-2 is Ready" in e for e in events)
            assert any("sglang-0 is terminating" in e for e in events)


def test_a_readiness_flap_holds_the_worker_and_the_grace_removes_it(
    tmp_path: Path, workers: PodWorkers
) -> None:
    with FakeKube() as kube:
        kube.add_pod("sglang-0", workers.ips[0], LABELS)
        kube.add_pod("sglang-1", workers.ips[1], LABELS)
        grace = ("--discovery-unready-grace-secs", "2")
        with discovering(kube, tmp_path, workers, 2, *grace) as view:
            view.generate("a prompt the tree keeps for sglang-0 " * 4)
            view.generate("a prompt the tree keeps for sglang-1 " * 4)
            kube.set_ready("sglang-1", False)
            wait_for(lambda: view.routable() == {workers.url(0)}, what="held")
            held = view.workers()[workers.url(1)]
            assert held["pod"]["routed"] is False and held["tree_size"] > 0  # share kept
            assert {view.generate(f"while unready {i}") for i in range(3)} == {workers.url(0)}
            kube.set_ready("sglang-1", True)
            wait_for(lambda: len(view.routable()) == 2, what="released")
            assert view.workers()[workers.url(1)]["tree_size"] > 0
            kube.set_ready("sglang-1", False)
            wait_for(lambda: workers.url(1) not in view.workers(), what="grace over", timeout=15)
            assert any("unready for 2 s" in e for e in view.stats()["events"])


def test_a_new_pod_on_the_same_ip_starts_with_an_empty_cache(
    tmp_path: Path, workers: PodWorkers
) -> None:
    with FakeKube() as kube:
        kube.add_pod("sglang-0", workers.ips[0], LABELS)
        with discovering(kube, tmp_path, workers, 1) as view:
            view.generate("the old pod's cached prefix " * 8)
            assert view.workers()[workers.url(0)]["tree_size"] > 0
            kube.replace("sglang-0")
            wait_for(lambda: any("replaced" in e or "deleted" in e for e in view.stats()["events"]))
            wait_for(lambda: view.routable() == {workers.url(0)}, what="the new pod routed")
            assert view.workers()[workers.url(0)]["tree_size"] == 0


def test_an_api_server_restart_and_watch_expiry_keep_the_workers(
    tmp_path: Path, workers: PodWorkers
) -> None:
    with FakeKube() as kube:
        kube.add_pod("sglang-0", workers.ips[0], LABELS)
        kube.add_pod("sglang-1", workers.ips[1], LABELS)
        with discovering(kube, tmp_path, workers, 2) as view:
            wait_for(lambda: kube.open_watches() == 1, what="a watch")
            kube.expire()
            wait_for(lambda: view.stats()["discovery"]["lists"] == 2, what="re-LIST after 410")
            assert view.stats()["discovery"]["state"] == "synced"
            wait_for(lambda: kube.requests["watch"] == 2 and kube.open_watches() == 1)
            kube.sever()  # a cut watch: resumed from its resourceVersion, no LIST
            wait_for(lambda: kube.requests["watch"] == 3, what="watch again")
            assert kube.requests["list"] == 2
            _outage(kube, view)
            kube.add_pod("sglang-2", workers.ips[2], LABELS)
            wait_for(lambda: len(view.routable()) == 3, what="a pod added after the outage")
            assert view.stats()["discovery"]["state"] == "synced"


def _outage(kube: FakeKube, view: View) -> None:
    """The API server goes away: discovery turns stale, the workers stay routed."""
    import threading

    outage = threading.Thread(target=kube.restart, args=(2.0,))
    outage.start()
    try:
        wait_for(lambda: view.stats()["discovery"]["state"] == "stale", what="stale")
        metrics = view.router.get("/metrics").body.decode()
        assert "sglang_dp_discovery_stale 1.0" in metrics
        assert 'sglang_dp_discovery_pods{condition="ready"} 2.0' in metrics
        assert len(view.routable()) == 2
        assert view.generate("during the outage") in view.routable()
    finally:
        outage.join()
    wait_for(lambda: view.stats()["discovery"]["state"] == "synced", what="synced again")


def test_wrong_rbac_is_a_clear_error_at_start(tmp_path: Path, workers: PodWorkers) -> None:
    with FakeKube() as kube:
        kube.forbidden = True
        args = discovery_args(kube, tmp_path, workers.port)
        argv = [SGLANG_DP, "router", "--port", str(free_port()), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 2
        assert "cannot list resource" in done.stderr
        assert "pods: get, list, watch" in done.stderr


def test_workers_added_by_hand_are_left_alone_and_pods_removed_by_hand_come_back(
    tmp_path: Path, workers: PodWorkers
) -> None:
    with FakeKube() as kube, sim_worker() as hand:
        kube.add_pod("sglang-0", workers.ips[0], LABELS)
        with discovering(kube, tmp_path, workers, 1) as view:
            assert view.router.post("/workers", {"url": hand.url}).status == 201
            wait_for(lambda: len(view.routable()) == 2, what="hand-added worker healthy")
            pod_url = workers.url(0)  # a discovered worker removed by hand: back while Ready
            assert view.router.request("DELETE", f"/workers?url={pod_url}").status == 200
            wait_for(lambda: pod_url in view.routable(), what="the pod's worker back")
            kube.delete("sglang-0")
            wait_for(lambda: view.routable() == {hand.url}, what="pod gone, hand one kept")
            assert "pod" not in view.workers()[hand.url]


def _pod_names(view: View) -> set[str]:
    return {p["name"] for p in view.stats()["discovery"]["pods"]}
