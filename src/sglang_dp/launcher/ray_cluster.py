"""`sglang-dp launch --ray [ADDRESS]`: the workers as Ray actors, the router here (shell).

    import ray (else: how to install it) → connect (or start a local instance) → does the
    cluster hold dp × {GPU: tp, CPU: 1} under --placement? (else: what is missing, where;
    nothing was reserved) → one placement group, waited for with progress (up to
    --startup-timeout-secs) → `Launch` as locally, with `RayWorkers.spawn` as the supervisor's
    spawner … Ctrl-C → the workers' groups stopped through their actors, the actors killed →
    placement group removed → ray.shutdown() (which also stops a local instance we started)

`run.run_launch` calls `run_ray_launch(config, console, serve)`; this driver hands its specs and
spawner to `serve` (run.py's), so nothing here imports run.py.

Addresses (`--ray`):
- no ADDRESS (`local`): a new local Ray instance with every CPU and, for --simulate, dp × tp
  logical GPUs (no GPU is needed to simulate). While `--worker-host` is a loopback address (the
  default) it is started on 127.0.0.1 and listens on loopback only: Ray otherwise replaces a
  loopback node address by the machine's interface address, which `RAY_ENABLE_WINDOWS_OR_OSX_
  CLUSTER=0` (set here before ray is imported) prevents.
- `auto`, or `HOST:PORT` of the cluster's GCS: an existing cluster (a loopback HOST is connected
  to over loopback too, by the same setting).
The workers listen on their node's address as Ray knows it, whatever --worker-host says.

Exit codes as `launch`'s: 2 when nothing could be started (ray missing, cluster too small,
placement timed out), else what `Launch.run` returns.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.markup import escape

from sglang_dp.launcher.cluster import LaunchError, worker_template
from sglang_dp.launcher.config import RAY_LOCAL, LaunchConfig
from sglang_dp.launcher.plan import WorkerSpec, WorkerTemplate, plan_workers
from sglang_dp.launcher.ports import busy_ports
from sglang_dp.launcher.process import LogRotation, Spawner
from sglang_dp.launcher.ray_plan import (
    RAY_STRATEGIES,
    NodeResources,
    format_resources,
    shortfall,
    worker_bundle,
)
from sglang_dp.launcher.ray_worker import WorkerRequest

INSTALL_HINT = "--ray needs Ray: pip install 'sglang-dp[ray]'"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a loopback node address
PROGRESS_INTERVAL_S = 0.5
CONNECT_TIMEOUT_S = 5.0  # for the GCS address to accept a TCP connection


def import_ray(loopback: bool) -> ModuleType:
    """The ray module, or a LaunchError saying how to install it."""
    if loopback and "ray" not in sys.modules:
        os.environ[LOOPBACK_ENV] = "0"  # read once, when ray is imported
    try:
        import ray
    except ImportError:
        raise LaunchError(INSTALL_HINT) from None
    return ray


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def split_address(address: str) -> tuple[str, int | None]:
    """(host, port or None) of a Ray address: `HOST:PORT`, `[V6]:PORT`, a bare host or IPv6
    literal, each perhaps after `ray://`; brackets are dropped from the host."""
    rest = address.split("://", 1)[-1]
    if rest.startswith("["):
        host, _, after = rest[1:].partition("]")
        port = after.removeprefix(":")
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:  # no port, or an unbracketed IPv6 literal (which cannot carry one)
        host, port = rest, ""
    return host, int(port) if port.isdigit() else None


def address_is_loopback(config: LaunchConfig) -> bool:
    """Whether this run talks to Ray over loopback only (module docstring)."""
    if config.ray == RAY_LOCAL:
        return is_loopback(config.worker_host)
    return is_loopback(split_address(config.ray or "")[0])


def driver_template(config: LaunchConfig) -> WorkerTemplate:
    """The workers as this driver knows them: each actor makes the template its node's own
    (Python, environment, address, KV events; ray_worker's docstring)."""
    return worker_template(config, sys.executable, {}, config.kv_events)


def template_specs(config: LaunchConfig, log_dir: Path) -> list[WorkerSpec]:
    """The plan as far as the driver knows it (each actor redoes argv, env, port on its node);
    a LaunchError for a bad plan (e.g. a flag after `--` that the launcher owns)."""
    virtual = [tuple(range(i * config.tp, (i + 1) * config.tp)) for i in range(config.dp)]
    try:
        return plan_workers(
            driver_template(config),
            dp=config.dp,
            gpus=virtual,
            base_port=config.base_port,
            log_dir=log_dir,
            accepts_nccl_port=True,
            reserved_ports=[config.router.port],
        )
    except ValueError as exc:
        raise LaunchError(str(exc)) from None


def requests_for(specs: list[WorkerSpec], config: LaunchConfig) -> dict[int, WorkerRequest]:
    template = driver_template(config)
    return {
        spec.index: WorkerRequest(
            index=spec.index,
            dp=config.dp,
            template=template,
            base_port=config.base_port,
            log_path=str(spec.log_path),
            log_rotation=LogRotation(config.log_rotation_bytes, config.log_keep),
        )
        for spec in specs
    }


def alive_nodes(ray: ModuleType) -> list[NodeResources]:
    return [
        NodeResources(str(n["NodeID"]), str(n["NodeManagerAddress"]), dict(n["Resources"]))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """LaunchError unless something accepts connections at a HOST:PORT address (Ray itself
    retries an unreachable one for minutes); other forms (auto, ray://) are left to Ray."""
    host, port = split_address(address)
    if not host or port is None or "://" in address:
        return
    try:
        socket.create_connection((host, port), timeout).close()
    except OSError as exc:
        raise LaunchError(
            f"nothing answers at {address} ({exc.strerror or exc}): is the Ray head running "
            "there (ray start --head)?"
        ) from None


class RaySession:
    """This driver's connection to Ray and the placement group it holds; close() undoes both."""

    def __init__(self, config: LaunchConfig, console: Console) -> None:
        self.config = config
        self.console = console
        self.ray = import_ray(address_is_loopback(config))
        self.placement_group: Any = None

    def connect(self) -> None:
        """Connect (or start a local instance); LaunchError if Ray cannot be reached."""
        config = self.config
        quiet = {"log_to_driver": False, "logging_level": "warning"}  # the dashboard owns stdout
        if config.ray != RAY_LOCAL:
            assert config.ray is not None
            check_reachable(config.ray)
            try:
                self.ray.init(address=config.ray, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise LaunchError(f"cannot connect to Ray at {config.ray}: {exc}") from None
            return
        node_ip = "127.0.0.1" if is_loopback(config.worker_host) else config.worker_host
        self.ray.init(
            address="local",  # a new instance even if RAY_ADDRESS names a cluster
            num_cpus=max(config.dp, os.cpu_count() or 1),
            num_gpus=config.dp * config.tp if config.simulate else None,
            include_dashboard=False,
            _node_ip_address=None if node_ip in ("0.0.0.0", "::") else node_ip,
            **quiet,
        )

    def reserve(self) -> Any:
        """The placement group, placed; LaunchError if the cluster cannot hold it or Ray does
        not place it within --startup-timeout-secs."""
        from ray.util.placement_group import placement_group

        config = self.config
        bundle = worker_bundle(config.tp)
        nodes = alive_nodes(self.ray)
        missing = shortfall(bundle, config.dp, config.placement, nodes)
        if missing:
            raise LaunchError(missing)
        self.placement_group = placement_group(
            [bundle] * config.dp, strategy=RAY_STRATEGIES[config.placement]
        )
        self._wait_placed(bundle)
        return self.placement_group

    def _wait_placed(self, bundle: dict[str, float]) -> None:
        ray, config = self.ray, self.config
        ready = self.placement_group.ready()
        what = f"{config.dp} × {format_resources(bundle)} ({config.placement})"
        started = time.monotonic()
        with self.console.status(f"waiting for Ray to place {what}") as status:
            while not ray.wait([ready], timeout=PROGRESS_INTERVAL_S)[0]:
                waited = time.monotonic() - started
                free = {name: ray.available_resources().get(name, 0.0) for name in bundle}
                if waited > config.startup_timeout_secs:
                    raise LaunchError(
                        f"Ray did not place {what} within {config.startup_timeout_secs:g} s; "
                        f"free in the cluster now: {format_resources(free)} (other jobs may "
                        "hold the rest)"
                    )
                status.update(
                    f"waiting for Ray to place {what}: {waited:.0f} s, free now "
                    f"{format_resources(free)}"
                )
        ray.get(ready)
        self.console.print(f"Ray placed {what} in {time.monotonic() - started:.1f} s")

    def close(self) -> None:
        """Remove the placement group and disconnect (a local instance stops). Idempotent."""
        from ray.util.placement_group import remove_placement_group

        if self.placement_group is not None and self.ray.is_initialized():
            remove_placement_group(self.placement_group)
            self.placement_group = None
        self.ray.shutdown()


def run_ray_launch(
    config: LaunchConfig, console: Console, serve: Callable[[list[WorkerSpec], Spawner], int]
) -> int:
    """`launch --ray`: the process exit code (see the module docstring). `serve(specs, spawner)`
    runs the launch as locally (run.py's), with the actors as its spawner, while this driver
    holds the placement group."""
    from sglang_dp.launcher.ray_worker import RayWorkers

    try:
        specs = template_specs(config, Path(config.log_dir).resolve())
        if busy_ports([config.router.port], config.router.host):
            raise LaunchError(f"port {config.router.port} already in use: choose another --port")
        session = RaySession(config, console)
    except LaunchError as exc:
        _show_error(console, exc)
        return 2
    try:
        session.connect()
        placement_group = session.reserve()
        workers = RayWorkers(
            placement_group, requests_for(specs, config), config.startup_timeout_secs
        )
        return serve(specs, workers.spawn)
    except LaunchError as exc:
        _show_error(console, exc)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted while Ray was placing the workers")
        return 1
    finally:
        session.close()


def _show_error(console: Console, error: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
