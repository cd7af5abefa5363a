"""A router process in front of simulated worker processes, on free loopback ports (test helper).

Everything runs in its own process group and is stopped by pid (TERM, then KILL), never by name;
readiness is polled with a deadline.
"""

from __future__ import annotations

import resource
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from tests.processes import SGLANG_DP, Worker, free_port, sim_worker, stop, wait_for


@dataclass
class Cluster:
    router: Worker
    workers: list[Worker]

    def stats(self) -> dict[str, Any]:
        reply = self.router.get("/debug/stats", headers=self.admin_headers)
        assert reply.status == 200, reply.body
        return reply.json()  # type: ignore[no-any-return]

    def in_flight(self) -> int:
        return sum(w["in_flight"] for w in self.stats()["workers"])

    admin_headers: dict[str, str] | None = None


def _ready(router: Worker, count: int) -> bool:
    if not router.alive():
        raise AssertionError(f"router exited with {router.proc.returncode}")
    try:
        reply = router.get("/readiness", timeout=1)
    except OSError:
        return False
    return reply.status == 200 and reply.json()["healthy_workers"] >= count


@contextmanager
def router_process(
    urls: list[str], *args: str, ready_workers: int | None = None, max_files: int | None = None
) -> Iterator[Worker]:
    """`max_files`: the router's hard limit of open files (it cannot raise it past that)."""
    port = free_port()

    def limit() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    proc = subprocess.Popen(
        [
            SGLANG_DP,
            "router",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--health-check-interval-secs",
            "0.2",
            *(["--worker-urls", *urls] if urls else []),
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=limit if max_files is not None else None,  # noqa: PLW1509 (no threads here)
    )
    router = Worker(proc, port)
    try:
        count = len(urls) if ready_workers is None else ready_workers
        if count:
            wait_for(lambda: _ready(router, count), timeout=30, what="router readiness")
        else:
            wait_for(lambda: _listening(router), timeout=30, what="router listening")
        yield router
    finally:
        stop(proc)


def _listening(router: Worker) -> bool:
    if not router.alive():
        raise AssertionError(f"router exited with {router.proc.returncode}")
    try:
        return router.get("/health", timeout=1).status == 200
    except OSError:
        return False


@contextmanager
def cluster(
    n: int,
    *router_args: str,
    worker_args: tuple[str, ...] = ("--time-scale", "1000", "--enable-cache-report"),
    per_worker: list[tuple[str, ...]] | None = None,
    admin_headers: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    with ExitStack() as stack:
        workers = [
            stack.enter_context(sim_worker(*worker_args, *(per_worker[i] if per_worker else ())))
            for i in range(n)
        ]
        router = stack.enter_context(router_process([w.url for w in workers], *router_args))
        yield Cluster(router, workers, admin_headers)
