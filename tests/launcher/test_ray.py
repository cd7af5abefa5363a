"""`sglang-dp launch --ray` against a real two-node Ray cluster on loopback (simulated workers).

One cluster for the module (each start costs seconds): a head node with 4 logical GPUs and a
second node with 2, both raylets on 127.0.0.1 (`ray.cluster_utils.Cluster` with Ray's loopback
setting, checked below: every Ray listener is on loopback). This test process is a Ray driver
too, to see the cluster's free resources and placement groups; the launches under test are the
installed command, connected to the cluster's loopback GCS address. One test lets `launch --ray`
start its own Ray instance instead, and checks that it listens on loopback only and goes with it.
All Ray tests take ~33 s on the 2-core machine (the cluster's start ~6-16 s of it).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from sglang_dp.launcher.ray_cluster import LOOPBACK_ENV
from tests.e2e.launcher import Launched, gone, launch_argv, launched
from tests.processes import free_port, wait_for

SYSTEM = " ".join(f"rule{i}" for i in range(200))  # a long shared prefix
HEAD_GPUS, OTHER_GPUS = 4, 2  # one node that packs four workers, one to spread to (and lose)


@dataclass
class RayCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    ray: Any

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def free(self) -> dict[str, float]:
        return {k: self.ray.available_resources().get(k, 0.0) for k in ("GPU", "CPU")}

    def total(self) -> dict[str, float]:
        return {k: self.ray.cluster_resources().get(k, 0.0) for k in ("GPU", "CPU")}

    def placement_groups_alive(self) -> int:
        table = self.ray.util.placement_group_table()
        return sum(1 for pg in table.values() if pg["state"] != "REMOVED")

    def all_released(self) -> bool:
        return self.free() == self.total() and self.placement_groups_alive() == 0

    def head_raylet(self) -> int:
        return int(self.cluster.head_node.all_processes["raylet"][0].process.pid)

    def lose_second_node(self) -> None:
        """Kill the second node's raylet and everything on it (as a machine lost)."""
        for node in list(self.cluster.worker_nodes):
            self.cluster.remove_node(node, allow_graceful=False)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    before = os.environ.get(LOOPBACK_ENV)
    os.environ[LOOPBACK_ENV] = "0"  # read when ray is imported: loopback node addresses stay
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 4, "num_gpus": HEAD_GPUS, "node_ip_address": "127.0.0.1"}
    # A lost node is declared dead after 3 missed health checks 0.5 s apart (default 5 × 3 s)
    detect = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**head, "include_dashboard": False, "_system_config": detect},
    )
    try:
        cluster.add_node(num_cpus=2, num_gpus=OTHER_GPUS, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
        cluster.wait_for_nodes()
        yield RayCluster(cluster, ray)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if before is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = before


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Instead of the launcher tests' check (Ray starts and keeps its own idle worker processes
    between tests): no simulated worker and no worker actor may outlive a test."""
    yield
    wait_for(lambda: not sim_workers() and not actors(), timeout=15, what="workers and actors gone")


def actors() -> list[psutil.Process]:
    found = []
    for p in ray_processes():
        with suppress(psutil.Error):
            if p.name().startswith("ray::WorkerActor") and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def ray_processes() -> list[psutil.Process]:
    """This test's Ray processes (raylets, GCS, agents, actors) and the workers they run."""
    return psutil.Process().children(recursive=True)


def sim_workers() -> list[psutil.Process]:
    found = []
    for p in ray_processes():
        try:
            if is_sim_worker(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def is_sim_worker(argv: list[str]) -> bool:
    """`python -m sglang_dp.sim ...` itself (not a wrapper naming it further on)."""
    return argv[1:3] == ["-m", "sglang_dp.sim"]


def actor_of(worker: psutil.Process) -> psutil.Process:
    """The Ray actor process that started the worker (its closest `ray::` ancestor)."""
    return next(p for p in worker.parents() if p.name().startswith("ray::"))


def worker_on(port: int) -> psutil.Process | None:
    """The simulated worker listening on `port`, if one runs."""
    for p in sim_workers():
        with suppress(psutil.Error):
            argv = p.cmdline()
            if argv[argv.index("--port") + 1] == str(port):
                return p
    return None


def workers_of(run: Launched) -> list[psutil.Process]:
    found = [worker_on(port_of(u)) for u in urls(run)]
    assert all(found), "a routed worker has no process"
    return [p for p in found if p is not None]


def raylet_of(proc: psutil.Process) -> int:
    return next(p.pid for p in proc.parents() if p.name() == "raylet")


def urls(run: Launched) -> list[str]:
    return [w["url"] for w in run.router.get("/debug/stats").json()["workers"]]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def ray_launch(ray_cluster: RayCluster, dp: int, tmp_path: Path, *extra: str) -> Any:
    return launched(dp, tmp_path, "--ray", ray_cluster.address, *extra)


def test_every_ray_listener_is_on_loopback(ray_cluster: RayCluster) -> None:
    mine = {p.pid for p in ray_processes()} | {os.getpid()}
    listening = [
        c.laddr.ip
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in mine
    ]
    assert listening, "no Ray listener found"
    assert {ip.removeprefix("::ffff:") for ip in listening} == {"127.0.0.1"}


class Load:
    """Clients sending shared-prefix requests through the router until stopped."""

    def __init__(self, run: Launched, clients: int = 2) -> None:
        self.run = run
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]
        for t in self._threads:
            t.start()

    def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            body = {"text": f"load {i} {SYSTEM} q{n}", "sampling_params": {"max_new_tokens": 2}}
            try:
                status = self.run.router.post("/generate", body, timeout=30).status
            except OSError:
                status = 0
            self.statuses.append(status)

    def stop(self) -> list[int]:
        self._stop.set()
        for t in self._threads:
            t.join()
        return self.statuses


def replaced(run: Launched, dp: int, old_pids: set[int]) -> bool:
    """Every routed worker has a process, one of them new, and all are healthy."""
    if not run.ready(dp):
        return False
    found = [worker_on(port_of(u)) for u in urls(run)]
    pids = {p.pid for p in found if p is not None}
    return len(pids) == dp and bool(pids - old_pids)


def survive_a_kill(run: Launched, victim: psutil.Process, dp: int) -> None:
    old = {p.pid for p in sim_workers()}
    load = Load(run)
    try:
        wait_for(lambda: len(load.statuses) >= 5, timeout=30, what="load running")
        victim.kill()
        wait_for(lambda: replaced(run, dp, old), timeout=60, what="a replacement routable")
        done = len(load.statuses)
        wait_for(lambda: len(load.statuses) >= done + 5, timeout=30, what="load on the new set")
    finally:
        statuses = load.stop()
    failed = [s for s in statuses if s != 200]
    assert len(failed) <= 2, failed  # at most the two requests in flight on the victim


def test_four_workers_get_their_own_gpus_route_by_cache_survive_kills_and_leave_nothing(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    with ray_launch(ray_cluster, 4, tmp_path) as run:
        workers = workers_of(run)
        devices = {p.environ()["CUDA_VISIBLE_DEVICES"] for p in workers}
        assert len(devices) == 4  # distinct GPUs: pack placed all four on the 4-GPU head
        assert len({raylet_of(p) for p in workers}) == 1
        records = [run.log_dir / f"worker-{i}.log.pids" for i in range(4)]
        assert all(r.is_file() for r in records)  # where the supervisor samples CPU and memory

        groups = {g: f"group {g} {SYSTEM}" for g in range(4)}
        post = lambda text: run.router.post(  # noqa: E731
            "/generate", {"text": text, "sampling_params": {"max_new_tokens": 2}}
        )
        first = {g: post(t + " q0").headers["x-sglang-dp-worker"] for g, t in groups.items()}
        for g, text in groups.items():
            for q in range(1, 3):
                reply = post(text + f" q{q}")
                assert reply.status == 200 and reply.json()["meta_info"]["cached_tokens"] > 150
                assert reply.headers["x-sglang-dp-worker"] == first[g]

        actor = actor_of(workers_of(run)[0])
        survive_a_kill(run, actor, 4)  # Ray reports the actor dead: its worker is replaced
        survive_a_kill(run, workers_of(run)[1], 4)  # the subprocess alone

        children = sim_workers() + actors()
        os.kill(run.proc.pid, signal.SIGINT)
        assert run.proc.wait(timeout=60) == 0
        wait_for(lambda: gone(children), timeout=10, what="workers and actors gone")
        wait_for(ray_cluster.all_released, timeout=10, what="resources and placement free")
        assert not sim_workers()


def test_spread_uses_both_nodes_a_lost_node_is_replaced_and_sigkill_takes_the_workers_along(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    with ray_launch(ray_cluster, 2, tmp_path, "--placement", "spread") as run:
        workers = workers_of(run)
        assert len({raylet_of(p) for p in workers}) == 2

        ray_cluster.lose_second_node()  # its worker dies with it, and is placed on the head
        wait_for(lambda: replaced(run, 2, {p.pid for p in workers}), timeout=60, what="replaced")
        assert {raylet_of(p) for p in workers_of(run)} == {ray_cluster.head_raylet()}

        workers = workers_of(run)
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        wait_for(lambda: gone(workers), timeout=30, what="workers gone with their actors")
        wait_for(ray_cluster.all_released, timeout=30, what="resources and placement free")


def test_a_hung_ray_worker_leaves_routing_is_replaced_through_its_actor_and_not_leaked(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    health = ("--health-check-interval-secs", "0.5", "--health-check-timeout-secs", "0.5")
    with ray_launch(ray_cluster, 2, tmp_path, "--unhealthy-restart-secs", "1", *health) as run:
        hung = workers_of(run)[0]
        hung.suspend()  # alive, answering nothing: a hung collective
        try:
            wait_for(lambda: replaced(run, 2, {hung.pid}), timeout=60, what="a replacement")
            wait_for(lambda: gone([hung]), timeout=10, what="the hung worker killed")
            reply = run.router.post("/generate", {"text": "after", "sampling_params": {}})
            assert reply.status == 200
        finally:
            if not gone([hung]):
                hung.resume()


def launch_until_exit(
    ray_cluster: RayCluster, dp: int, tmp_path: Path, *extra: str, simulate: bool = True
) -> tuple[int, str]:
    """A `launch --ray` on the cluster that is expected to exit: its status and output."""
    argv = launch_argv(dp, free_port(), tmp_path / "logs", "--no-dashboard", "--ray")
    if not simulate:
        argv.remove("--simulate")
    result = subprocess.run(
        [*argv, ray_cluster.address, *extra], capture_output=True, timeout=120, check=False,
        start_new_session=True,
    )  # fmt: skip
    return result.returncode, result.stdout.decode() + result.stderr.decode()


def test_more_workers_than_gpus_is_a_clear_error_and_reserves_nothing(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    dp = int(ray_cluster.total()["GPU"]) + 1  # the second node may have been lost already
    code, output = launch_until_exit(ray_cluster, dp, tmp_path)
    assert code == 2, output
    assert f"cannot hold {dp} × {{GPU: 1, CPU: 1}}: missing 1 GPU" in output
    assert ray_cluster.all_released() and not sim_workers()


def test_a_worker_failing_at_startup_on_ray_shows_its_log_and_leaves_nothing(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    code, output = launch_until_exit(ray_cluster, 2, tmp_path, "--", "--time-scale", "-1")
    assert code == 1, output
    assert "failed to start" in output and "--time-scale must be positive" in output
    wait_for(ray_cluster.all_released, timeout=10, what="resources and placement free")


def test_real_workers_on_a_node_without_sglang_say_so(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    code, output = launch_until_exit(
        ray_cluster, 1, tmp_path, "--model-path", "some/model", simulate=False
    )
    assert code == 1, output
    assert "sglang is not importable by" in output and "on node 127.0.0.1" in output
    wait_for(ray_cluster.all_released, timeout=10, what="resources and placement free")


def test_a_ray_instance_started_by_launch_listens_on_loopback_only_and_stops_with_it(
    tmp_path: Path,
) -> None:
    with launched(2, tmp_path, "--ray") as run:  # no address: launch starts Ray itself
        tree = [psutil.Process(run.proc.pid), *run.children()]
        names = {p.name() for p in tree if p.is_running()}
        assert {"gcs_server", "raylet"} <= names
        pids = {p.pid for p in tree}
        listening = {
            c.laddr.ip.removeprefix("::ffff:")
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids
        }
        assert listening == {"127.0.0.1"}
        devices = {p.environ()["CUDA_VISIBLE_DEVICES"] for p in workers_of(run)}
        assert len(devices) == 2  # dp × tp logical GPUs for simulated workers
        everything = run.children()
        os.kill(run.proc.pid, signal.SIGINT)
        assert run.proc.wait(timeout=60) == 0
        wait_for(lambda: gone(everything), timeout=20, what="workers, actors and Ray gone")
