"""Admission control and circuit breakers in a router process, with sim workers on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

from sglang_dp.router.admission import AdmissionConfig
from sglang_dp.router.config import RouterConfig
from sglang_dp.router.server import RouterServer
from tests.processes import Reply, free_port, sim_worker, wait_for
from tests.router.cluster import Cluster, cluster

BODY = {"text": "hello", "sampling_params": {"max_new_tokens": 4}}


def admission(c: Cluster) -> dict[str, Any]:
    return c.stats()["admission"]  # type: ignore[no-any-return]


def test_a_full_router_queues_then_refuses_with_retry_after_and_leaks_nothing() -> None:
    slow = ("--time-scale", "1000", "--stall-after-tokens", "0", "--stall-secs", "2")
    args = ("--max-concurrent-requests", "1", "--queue-size", "1", "--queue-timeout-secs", "0.5")
    with cluster(1, *args, worker_args=slow) as c:
        replies: dict[str, Reply] = {}

        def send(name: str) -> None:
            replies[name] = c.router.post("/generate", BODY)

        first = threading.Thread(target=send, args=("answered",))
        first.start()
        wait_for(lambda: admission(c)["in_flight"] == 1, timeout=10, what="first admitted")
        second = threading.Thread(target=send, args=("queued",))
        second.start()
        wait_for(lambda: admission(c)["waiting"] == 1, timeout=10, what="second queued")
        full = c.router.post("/generate", BODY)
        assert full.status == 429 and full.headers["retry-after"] == "1"
        assert "router is full (1 requests in flight, 1 waiting)" in full.json()["error"]["message"]
        second.join(10)
        first.join(10)
        assert replies["queued"].status == 408 and replies["queued"].headers["retry-after"] == "1"
        assert replies["answered"].status == 200
        stats = admission(c)
        assert (stats["in_flight"], stats["waiting"], stats["timed_out"]) == (0, 0, 1)
        assert c.in_flight() == 0
        metrics = c.router.get("/metrics").body.decode()
        assert 'sglang_dp_shed_total{reason="queue_full"} 1.0' in metrics
        assert 'sglang_dp_shed_total{reason="queue_timeout"} 1.0' in metrics


def test_a_failing_worker_leaves_routing_while_its_health_answers() -> None:
    args = ("--policy", "round_robin", "--retries", "0", "--cb-failure-threshold", "2")
    per_worker = [("--instant",), ("--instant", "--fail-rate", "1.0")]
    with cluster(2, *args, per_worker=per_worker) as c:
        bad = c.workers[1].url
        statuses = [c.router.post("/generate", BODY).status for _ in range(6)]
        assert statuses.count(500) == 2  # two failures open its breaker; then only the good one
        assert statuses[-2:] == [200, 200]
        assert admission(c)["breakers"][bad] == "open"
        assert c.workers[1].get("/health").status == 200
        assert all(w["healthy"] for w in c.stats()["workers"])
        metrics = c.router.get("/metrics").body.decode()
        assert f'sglang_dp_circuit_breaker_state{{state="open",worker="{bad}"}} 1.0' in metrics
        c.workers[0].proc.kill()  # the good one gone too: nothing left to route to
        c.workers[0].proc.wait()
        wait_for(lambda: c.router.post("/generate", BODY).status == 503, 10, "a 503")
        reply = c.router.post("/generate", BODY)
        assert f"circuit breaker open: {bad}" in reply.json()["error"]["message"], reply.body


def test_the_router_reads_each_worker_load_report() -> None:
    with sim_worker("--instant") as worker:

        async def main() -> int | None:
            config = RouterConfig(
                worker_urls=(worker.url,),
                port=free_port(),
                admission=AdmissionConfig(load_report_interval_secs=0.05),
            )
            server = RouterServer(config)
            await server.start()
            try:
                deadline = time.monotonic() + 10
                while server.loads.waiting(worker.url, time.monotonic()) is None:
                    assert time.monotonic() < deadline, "no load report read"
                    await asyncio.sleep(0.02)
                return server.loads.waiting(worker.url, time.monotonic())
            finally:
                await server.stop(0.5)

        assert asyncio.run(main()) == 0  # an idle worker: nothing waits in its queue


def test_clients_gone_while_admitted_or_queued_free_their_slots() -> None:
    slow = ("--time-scale", "1000", "--stall-after-tokens", "0", "--stall-secs", "5")
    args = ("--max-concurrent-requests", "2", "--queue-size", "2", "--queue-timeout-secs", "30")
    with cluster(1, *args, worker_args=slow) as c:
        clients = []
        for stream in (False, True, False, True):  # two admitted, two queued
            data = json.dumps(dict(BODY, stream=stream)).encode()
            head = f"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\n\r\n"
            sock = socket.create_connection(("127.0.0.1", c.router.port))
            sock.sendall(head.encode() + data)
            clients.append(sock)
        wait_for(lambda: admission(c)["waiting"] == 2, timeout=10, what="two queued")
        assert admission(c)["in_flight"] == 2
        for sock in clients:
            sock.close()
        wait_for(
            lambda: (
                (admission(c)["in_flight"], admission(c)["waiting"], c.in_flight()) == (0, 0, 0)
            ),
            timeout=10,
            what="slots freed",
        )


def test_a_dead_or_removed_worker_leaves_no_load_report_behind() -> None:
    async def main() -> list[int | None]:
        urls = ("http://127.0.0.1:9", "http://127.0.0.1:10")
        server = RouterServer(RouterConfig(worker_urls=urls))
        for url in urls:
            server.add_worker(url)
            server.loads.record(url, 5, 0.0)
        server.worker_down(urls[0], "exited")  # its replacement must not look saturated
        server.remove_worker(urls[1])
        return [server.loads.waiting(url, 0.0) for url in urls]

    assert asyncio.run(main()) == [None, None]
