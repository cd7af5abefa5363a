"""Service discovery on the router's loop: watched pods become the router's workers.

    PodWatcher (kube.py) ── every change ──▶ reconcile (pods.py, pure) ──▶ Plan
    timer, every RECONCILE_INTERVAL_S (1 s) ─┘                               │
        remove ▶ router.app.remove_worker   add ▶ router.app.add_worker      │
        hold / release ▶ WorkerMonitor.hold (no new requests; tree share kept) ◀┘

`status()` is `/debug/stats`'s "discovery"; the same facts are in `/metrics` (a collector on
the router's registry, read at scrape time).

Workers join through the same helpers as `POST /workers`, so health checks, the event log and
`/workers` treat them alike: a discovered worker takes requests once its first health check
passes (the monitor checks a new worker at once). Workers added by hand are never touched. A
discovered worker removed by hand comes back while its pod is Ready (relabel the pod to drain
it). The timer is what expires the unready grace, and what repairs anything an event missed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sglang_dp.discovery.config import DiscoveryConfig
from sglang_dp.discovery.kube import PodApi, PodWatcher, connect
from sglang_dp.discovery.pods import Member, Plan, Pod, reconcile

if TYPE_CHECKING:
    from sglang_dp.router.app import RouterState


RECONCILE_INTERVAL_S = 1.0


class PodDiscovery:
    """Keeps the router's discovered workers equal to the selected pods (module docstring)."""

    def __init__(
        self,
        config: DiscoveryConfig,
        state: RouterState,
        api: PodApi | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._state = state
        self._api = api
        self._rng = rng
        self.members: dict[str, Member] = {}
        self.watcher: PodWatcher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        state.metrics.registry.register(_DiscoveryCollector(self))

    async def start(self) -> None:
        """Connect, LIST once (DiscoveryError on 401/403 or no configuration), register the
        Ready pods, then watch and reconcile in the background."""
        if self._api is None:
            self._api = await connect(self.config)
        self.watcher = PodWatcher(self._api, self._changed, self._on_state, self._rng)
        try:
            await self.watcher.first_sync()
        except BaseException:
            await self._api.close()
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.watcher.run()), loop.create_task(self._tick())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._api is not None:
            await self._api.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL_S)
            self.reconcile_now()

    def _changed(self) -> None:
        self.reconcile_now()

    def reconcile_now(self) -> Plan:
        """One level-triggered pass over every pod; applies and returns the plan."""
        assert self.watcher is not None
        registered = self._state.monitor.workers
        # a member removed by hand is no member any more: it is registered again if still Ready
        members = {url: m for url, m in self.members.items() if url in registered}
        foreign = [url for url in registered if url not in members]
        plan = reconcile(
            self.watcher.pods.values(),
            members,
            self.config.service_discovery_port,
            self._state.clock(),
            self.config.discovery_unready_grace_secs,
            foreign,
        )
        self._apply(plan)
        return plan

    def _apply(self, plan: Plan) -> None:
        from sglang_dp.router.app import add_worker, remove_worker

        record = self._state.events.record
        for url, why in plan.remove:
            remove_worker(self._state, url)
            record(f"{why}: {url} left")
        self.members = dict(plan.members)
        for member in plan.add:
            add_worker(self._state, member.url)
            record(f"pod {member.pod.label} is Ready: {member.url} joined")
        for url in plan.hold:
            self._state.monitor.hold(url, True)
            record(f"pod {self.members[url].pod.label} is not Ready: {url} takes no requests")
        for url in plan.release:
            self._state.monitor.hold(url, False)
            record(f"pod {self.members[url].pod.label} is Ready again: {url} back")

    def _on_state(self, state: str, error: str) -> None:
        if state == "stale":  # a warning in the log, a line in the event log
            message = f"service discovery is stale (workers stay as they were): {error}"
            self._state.events.record(message, logging.WARNING)
        else:
            self._state.events.record(f"service discovery {state}")

    def pod_record(self, url: str) -> dict[str, Any] | None:
        """What `/workers` shows of a discovered worker's pod (None: not discovered)."""
        member = self.members.get(url)
        return None if member is None else pod_dict(member.pod, member.routed)

    def status(self) -> dict[str, Any]:
        """`/debug/stats`'s "discovery": state, last error, and every selected pod."""
        watcher = self.watcher
        pods = sorted(watcher.pods.values(), key=lambda p: p.label) if watcher else []
        routed = {m.pod.uid: m for m in self.members.values()}
        return {
            "state": watcher.state if watcher else "starting",
            "last_error": watcher.last_error if watcher else "",
            "selector": self.config.labels,
            "namespace": self.config.service_discovery_namespace,
            "port": self.config.service_discovery_port,
            "resource_version": watcher.resource_version if watcher else "",
            "lists": watcher.lists if watcher else 0,
            "watches": watcher.watches if watcher else 0,
            "pods": [
                pod_dict(p, p.uid in routed and routed[p.uid].routed)
                | {"worker": routed[p.uid].url if p.uid in routed else None}
                for p in pods
            ],
        }


class _DiscoveryCollector(Collector):
    """`/metrics` at scrape time: sglang_dp_discovery_stale (1: the API server cannot be read,
    workers are as they were), sglang_dp_discovery_pods{condition} (selected pods: ready,
    unready, terminating), sglang_dp_discovery_{lists,watches}_total (requests made)."""

    def __init__(self, discovery: PodDiscovery) -> None:
        self._discovery = discovery

    def collect(self) -> Iterator[Metric]:
        watcher = self._discovery.watcher
        stale = GaugeMetricFamily(
            "sglang_dp_discovery_stale", "1 while the pods cannot be listed or watched"
        )
        stale.add_metric([], 1.0 if watcher is not None and watcher.state == "stale" else 0.0)
        yield stale
        pods = GaugeMetricFamily(
            "sglang_dp_discovery_pods", "Selected pods by condition", labels=["condition"]
        )
        counts = dict.fromkeys(("ready", "unready", "terminating"), 0)
        for pod in watcher.pods.values() if watcher else ():
            counts["terminating" if pod.terminating else "ready" if pod.ready else "unready"] += 1
        for condition, count in counts.items():
            pods.add_metric([condition], count)
        yield pods
        for name, value in (("lists", watcher.lists if watcher else 0),
                            ("watches", watcher.watches if watcher else 0)):  # fmt: skip
            yield CounterMetricFamily(
                f"sglang_dp_discovery_{name}", f"{name.upper()} requests made", value=value
            )


def pod_dict(pod: Pod, routed: bool) -> dict[str, Any]:
    return {
        "name": pod.name,
        "namespace": pod.namespace,
        "ip": pod.ip,
        "phase": pod.phase,
        "ready": pod.ready,
        "terminating": pod.terminating,
        "routed": routed,
    }
