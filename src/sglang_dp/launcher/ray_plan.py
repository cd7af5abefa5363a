"""Planning workers on a Ray cluster (pure): bundles, placement strategies, fit, port bands.

One placement group holds one bundle per worker, `{"GPU": tp, "CPU": 1}`, placed by the
strategy the user names (`--placement`):

    pack           Ray's PACK:          as few nodes as possible (best effort)
    spread         Ray's SPREAD:        over as many nodes as possible (best effort)
    strict-spread  Ray's STRICT_SPREAD: one bundle per node, or no placement at all

`shortfall(bundle, count, strategy, nodes)` says, before anything is reserved, whether the
cluster's nodes could hold the bundles at all (by their *total* resources: what is busy now may
free up, what does not exist never will), and if not, what is missing and where. All bundles are
equal, so node n holds k_n = min over the bundle's resources r of ⌊total_n[r] / bundle[r]⌋ of
them; pack and spread fit when Σ k_n ≥ count, strict-spread when #{n : k_n ≥ 1} ≥ count.

`candidate_ports(index, dp, base_port, stride)`: where worker `index` looks for its band of
ports on its node: first its own slot of the plan (base + index × stride: workers on one node
never race for the same band), then the bands after every worker's, in order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from sglang_dp.launcher.plan import MAX_PORT

PLACEMENTS = ("pack", "spread", "strict-spread")
RAY_STRATEGIES: Mapping[str, str] = {
    "pack": "PACK",
    "spread": "SPREAD",
    "strict-spread": "STRICT_SPREAD",
}
CPUS_PER_WORKER = 1.0  # the actor itself; the worker's own CPU use is not reserved (like GPUs'
# host threads locally)


@dataclass(frozen=True)
class NodeResources:
    """One alive Ray node: its id, its address and its total resources."""

    node_id: str
    address: str
    resources: Mapping[str, float]

    @property
    def label(self) -> str:
        return f"{self.address} ({self.node_id[:8]})"


def worker_bundle(tp: int) -> dict[str, float]:
    """What one worker reserves: its GPUs and one CPU for its actor."""
    return {"GPU": float(tp), "CPU": CPUS_PER_WORKER}


def bundles_per_node(bundle: Mapping[str, float], resources: Mapping[str, float]) -> int:
    """How many copies of `bundle` a node with these resources holds."""
    counts = [int(resources.get(name, 0.0) // need) for name, need in bundle.items() if need > 0]
    return min(counts) if counts else 0


def shortfall(
    bundle: Mapping[str, float], count: int, strategy: str, nodes: Sequence[NodeResources]
) -> str | None:
    """None if `count` bundles fit the nodes under `strategy`, else what is missing, and where."""
    if strategy not in RAY_STRATEGIES:
        raise ValueError(f"unknown placement {strategy!r} (one of {', '.join(PLACEMENTS)})")
    holds = {node.node_id: bundles_per_node(bundle, node.resources) for node in nodes}
    wanted = f"{count} × {format_resources(bundle)}"
    where = "; ".join(
        f"{n.label}: {format_resources(_relevant(n.resources, bundle))} → {holds[n.node_id]}"
        for n in nodes
    )
    where = where or "no alive node"
    if strategy == "strict-spread":
        usable = sum(1 for k in holds.values() if k >= 1)
        if usable >= count:
            return None
        return (
            f"--placement strict-spread needs {count} nodes that can each hold "
            f"{format_resources(bundle)}; the cluster has {usable} ({where})"
        )
    if sum(holds.values()) >= count:
        return None
    missing = _missing_totals(bundle, count, nodes)
    if missing:
        lack = ", ".join(f"{format_amount(v)} {name}" for name, v in missing.items())
        reason = f"missing {lack} in total"
    else:
        reason = "the resources exist in total but no node has a whole bundle's worth of them"
    return (
        f"the cluster cannot hold {wanted}: {reason} (per node, resources → bundles it holds: "
        f"{where})"
    )


def _missing_totals(
    bundle: Mapping[str, float], count: int, nodes: Sequence[NodeResources]
) -> dict[str, float]:
    missing = {}
    for name, need in bundle.items():
        have = sum(n.resources.get(name, 0.0) for n in nodes)
        if need * count > have:
            missing[name] = need * count - have
    return missing


def _relevant(resources: Mapping[str, float], bundle: Mapping[str, float]) -> dict[str, float]:
    return {name: resources.get(name, 0.0) for name in bundle}


def format_amount(value: float) -> str:
    return f"{value:g}"


def format_resources(resources: Mapping[str, float]) -> str:
    """{"GPU": 1.0, "CPU": 1.0} → "{GPU: 1, CPU: 1}"."""
    inner = ", ".join(f"{name}: {format_amount(v)}" for name, v in resources.items())
    return "{" + inner + "}"


def candidate_ports(index: int, dp: int, base_port: int, stride: int) -> Iterator[int]:
    """First ports of the bands worker `index` tries on its node, in order (module docstring)."""
    own = base_port + index * stride
    if own + stride - 1 <= MAX_PORT:
        yield own
    start = base_port + dp * stride
    yield from range(start, MAX_PORT - stride + 2, stride)
