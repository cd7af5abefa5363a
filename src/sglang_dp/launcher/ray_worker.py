"""A worker as a Ray actor: the actor owns the worker's process tree on its node (shell).

    driver (launch --ray)                          node holding bundle i
    RayWorkers.spawn(spec) ──create actor on bundle i──▶ WorkerActor.start(request)
                                                        port band free on this node, argv, env
                                                        WorkerProcess.spawn(spec)   (process.py)
         ◀── Started(url http://NODE_IP:PORT, node id, GPU ids, pid) ──
    RayWorkerProcess.wait()   resolves when the subprocess exits (its exit status) or when the
                              actor or its node dies (Ray raises: reported as SIGKILL)
    RayWorkerProcess.terminate(grace)   the actor terminates the process group (TERM, grace,
                              KILL, exactly as locally), then the actor is killed (ray.kill)

`RayWorkerProcess` has the public surface of `process.WorkerProcess` (spec, pid, returncode,
pids_path (None unless the worker runs on this machine), wait(), log_tail(), terminate(grace)), so
the supervisor runs Ray workers as it runs local ones: readiness, health, restarts with backoff,
and CPU and memory for those on this machine. One actor lives for one run of its worker: when
the worker exits, its last log lines are fetched and the actor is killed, which frees the bundle
for the replacement.

The actor spawns through `WorkerProcess.spawn`: the worker gets its own process group, dies with
the actor (PR_SET_PDEATHSIG, from the actor's event-loop thread, which lives as long as the actor)
and logs to `log_dir/worker-<i>.log` on its node. So a driver killed with SIGKILL takes the
actors with it (Ray's ownership) and they take their workers (the same rule as locally).

On its node the actor plans the worker with `plan.plan_worker`, as a local launch does, from the
driver's `WorkerTemplate` made the node's own: that node's Python (is sglang there? does it take
--nccl-port and --kv-events-config?), its environment, CUDA_VISIBLE_DEVICES from the GPUs Ray
assigned to the actor, the node's address as registered with Ray (`ray.nodes()`; not
`ray.util.get_node_ip_address()`, which answers the machine's interface address even for a
loopback node) to listen on, and the first free port band of `ray_plan.candidate_ports`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sglang_dp.launcher.plan import (
    KV_EVENTS_FLAG,
    NCCL_PORT_OFFSET,
    PortLayout,
    WorkerSpec,
    WorkerTemplate,
    plan_worker,
)
from sglang_dp.launcher.ports import busy_ports, is_local_address
from sglang_dp.launcher.preflight import (
    sglang_accepts_flag,
    sglang_accepts_nccl_port,
    sglang_importable,
)
from sglang_dp.launcher.process import KILL_WAIT_S, LogRotation, WorkerProcess, pids_path_of
from sglang_dp.launcher.ray_plan import CPUS_PER_WORKER, candidate_ports

TAIL_LINES = 20
ACTOR_GONE_S = 10.0  # after ray.kill, how long the watch may take to see the actor gone
CALL_SLACK_S = 5.0  # beyond the worker's own grace, for the call to reach the actor and back


@dataclass(frozen=True)
class WorkerRequest:
    """What the actor needs to start worker `index` on its node."""

    index: int
    dp: int
    template: WorkerTemplate  # the driver's: python, environ, host and kv_events are the node's
    base_port: int
    log_path: str  # absolute: the actor's working directory is Ray's
    log_rotation: LogRotation


@dataclass(frozen=True)
class Started:
    """What the actor reports once the worker's process runs."""

    index: int
    host: str
    port: int
    nccl_port: int | None
    node_id: str
    gpus: tuple[int, ...]
    pid: int
    argv: tuple[str, ...]
    log_path: str


class WorkerActor:
    """Runs one worker process on the node of its bundle (made a Ray actor by `RayWorkers`)."""

    def __init__(self) -> None:
        self._proc: WorkerProcess | None = None

    async def start(self, request: WorkerRequest) -> Started:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        host = node_address(node_id)
        gpus = tuple(int(g) for g in ray.get_gpu_ids())
        template, python = request.template, sys.executable
        if not template.simulate and not await asyncio.to_thread(sglang_importable, python):
            raise RuntimeError(f"sglang is not importable by {python} on node {host}")
        accepts = template.simulate or await asyncio.to_thread(sglang_accepts_nccl_port, python)
        layout = PortLayout(request.base_port, accepts)
        port = free_band(request, layout, host)
        kv_events = template.kv_events and (
            template.simulate
            or await asyncio.to_thread(sglang_accepts_flag, python, KV_EVENTS_FLAG)
        )
        here = dataclasses.replace(
            template, python=python, environ=os.environ, host=host, kv_events=kv_events
        )
        nccl_port = port + NCCL_PORT_OFFSET if accepts else None
        spec = plan_worker(here, request.index, gpus, port, nccl_port, Path(request.log_path))
        self._proc = await WorkerProcess.spawn(spec, rotation=request.log_rotation)
        return Started(
            request.index, host, port, nccl_port, node_id, gpus, self._proc.pid, spec.argv,
            request.log_path,
        )  # fmt: skip

    async def wait(self) -> int:
        assert self._proc is not None
        return await self._proc.wait()

    async def log_tail(self, lines: int) -> list[str]:
        return self._proc.log_tail(lines) if self._proc is not None else []

    async def terminate(self, grace: float) -> None:
        if self._proc is not None:
            await self._proc.terminate(grace)


def node_address(node_id: str) -> str:
    """The address a node registered with Ray (what other nodes reach it at)."""
    import ray

    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    for node in nodes:
        if node["NodeID"] == node_id:
            return str(node["NodeManagerAddress"])
    raise RuntimeError(f"Ray does not know node {node_id}")


def free_band(request: WorkerRequest, layout: PortLayout, host: str) -> int:
    """The first candidate band whose HTTP (and nccl) port is free on this node."""
    for port in candidate_ports(request.index, request.dp, request.base_port, layout.stride):
        wanted = [port, port + NCCL_PORT_OFFSET] if layout.uses_nccl_port else [port]
        if not busy_ports(wanted, host):
            return port
    raise RuntimeError(f"no free port band from {request.base_port} on {host}")


class RayWorkerProcess:
    """The driver's handle on one run of a worker in an actor (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, actor: Any, started: Started) -> None:
        self.spec = spec
        self.pids_path = local_pids_path(started)  # the supervisor samples CPU and memory
        self._actor = actor
        self._pid = started.pid
        self._tail: list[str] = []
        self._returncode: int | None = None
        self._watching = asyncio.ensure_future(self._watch())

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        return await asyncio.shield(self._watching)

    def log_tail(self, lines: int = TAIL_LINES) -> list[str]:
        return self._tail[-lines:] if lines > 0 else []

    async def terminate(self, grace: float) -> None:
        """TERM the worker's group through the actor, KILL after `grace`; then kill the actor."""
        import ray

        if not self._watching.done():
            with contextlib.suppress(ray.exceptions.RayError, asyncio.TimeoutError):
                call = self._actor.terminate.remote(grace)
                await asyncio.wait_for(call, grace + KILL_WAIT_S + CALL_SLACK_S)
        kill_actor(self._actor)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._watching), ACTOR_GONE_S)

    async def _watch(self) -> int:
        import ray

        try:
            code = int(await self._actor.wait.remote())
        except ray.exceptions.RayError as exc:
            code = -int(signal.SIGKILL)
            self._tail = [f"the worker's Ray actor died: {_first_line(exc)}"]
        else:
            with contextlib.suppress(ray.exceptions.RayError):
                self._tail = await self._actor.log_tail.remote(TAIL_LINES)
        kill_actor(self._actor)  # its bundle is free for the replacement
        self._returncode = code
        return code


def local_pids_path(started: Started) -> Path | None:
    """The shim's record of the worker's tree when the worker runs on this machine (its pids
    mean these processes), else None: a record of another node's pids, seen here through a
    shared log directory, would name unrelated local processes."""
    return pids_path_of(Path(started.log_path)) if is_local_address(started.host) else None


def kill_actor(actor: Any) -> None:
    import ray

    with contextlib.suppress(ray.exceptions.RayError, ValueError):
        ray.kill(actor, no_restart=True)


def _reason(exc: BaseException) -> str:
    """What went wrong inside the actor (a RayTaskError's cause), else Ray's own first line."""
    cause = getattr(exc, "cause", None)
    return _first_line(cause if isinstance(cause, BaseException) else exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RayWorkers:
    """Spawns workers as actors on the bundles of one placement group (a supervisor spawner)."""

    def __init__(
        self,
        placement_group: Any,
        requests: Mapping[int, WorkerRequest],
        start_timeout: float,
    ) -> None:
        import ray

        self._pg = placement_group
        self._requests = requests
        self._start_timeout = start_timeout
        self._actor_class = ray.remote(WorkerActor)

    async def spawn(self, spec: WorkerSpec) -> RayWorkerProcess:
        """Start worker `spec.index` in a new actor on its bundle; OSError if it cannot be."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        request = self._requests[spec.index]
        actor: Any = self._actor_class.options(
            num_cpus=CPUS_PER_WORKER,
            num_gpus=request.template.tp,
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=spec.index
            ),
        ).remote()
        try:
            started: Started = await asyncio.wait_for(
                actor.start.remote(request), self._start_timeout
            )
        except asyncio.TimeoutError:
            kill_actor(actor)
            raise OSError(
                f"Ray did not start worker {spec.index}'s actor within {self._start_timeout:g} s"
            ) from None
        except ray.exceptions.RayError as exc:
            kill_actor(actor)
            raise OSError(_reason(exc)) from None
        except BaseException:  # cancelled: no actor may outlive its handle
            kill_actor(actor)
            raise
        return RayWorkerProcess(_spec_of(started, spec), actor, started)


def _spec_of(started: Started, template: WorkerSpec) -> WorkerSpec:
    """The spec as it runs on its node (the driver's copy: no environment to carry)."""
    return WorkerSpec(
        index=started.index,
        gpus=started.gpus,
        port=started.port,
        nccl_port=started.nccl_port,
        argv=started.argv,
        env=MappingProxyType({}),
        log_path=Path(started.log_path),
        simulated=template.simulated,
        host=started.host,
        node=f"{started.host} {started.node_id[:8]}",
    )
