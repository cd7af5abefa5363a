"""Ray placement planning (pure): which clusters hold the workers, what is missing, port bands."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.launcher.plan import MAX_PORT
from sglang_dp.launcher.ray_plan import (
    PLACEMENTS,
    NodeResources,
    bundles_per_node,
    candidate_ports,
    format_resources,
    shortfall,
    worker_bundle,
)


def node(name: str, gpus: float, cpus: float, **extra: float) -> NodeResources:
    return NodeResources(name * 8, f"10.0.0.{len(name)}", {"GPU": gpus, "CPU": cpus, **extra})


def fits_brute_force(
    bundle: dict[str, float], count: int, strategy: str, nodes: list[NodeResources]
) -> bool:
    """Try every number of bundles per node (0 or 1 for strict-spread)."""
    most = 1 if strategy == "strict-spread" else count
    for counts in itertools.product(range(most + 1), repeat=len(nodes)):
        if sum(counts) != count:
            continue
        if all(
            c * need <= n.resources.get(name, 0.0)
            for c, n in zip(counts, nodes)
            for name, need in bundle.items()
        ):
            return True
    return False


def test_a_worker_reserves_its_gpus_and_one_cpu() -> None:
    assert worker_bundle(2) == {"GPU": 2.0, "CPU": 1.0}
    assert format_resources(worker_bundle(2)) == "{GPU: 2, CPU: 1}"


def test_a_node_holds_as_many_bundles_as_its_scarcest_resource_allows() -> None:
    assert bundles_per_node({"GPU": 2, "CPU": 1}, {"GPU": 8, "CPU": 3}) == 3
    assert bundles_per_node({"GPU": 1, "CPU": 1}, {"CPU": 64}) == 0


def test_five_workers_on_four_gpus_say_one_gpu_is_missing_and_where_the_four_are() -> None:
    message = shortfall(worker_bundle(1), 5, "pack", [node("a", 4, 8)])
    assert message is not None
    assert "5 × {GPU: 1, CPU: 1}" in message and "missing 1 GPU in total" in message
    assert "10.0.0.1 (aaaaaaaa): {GPU: 4, CPU: 8} → 4" in message


def test_resources_split_across_nodes_are_named_as_such() -> None:
    message = shortfall(worker_bundle(1), 1, "spread", [node("a", 4, 0), node("bb", 0, 4)])
    assert message is not None and "no node has a whole bundle" in message


def test_strict_spread_needs_one_usable_node_per_worker() -> None:
    nodes = [node("a", 8, 8), node("bb", 1, 1)]
    assert shortfall(worker_bundle(1), 2, "strict-spread", nodes) is None
    message = shortfall(worker_bundle(1), 3, "strict-spread", nodes)
    assert message is not None and "needs 3 nodes" in message and "has 2" in message


def test_an_empty_cluster_is_named() -> None:
    message = shortfall(worker_bundle(1), 1, "pack", [])
    assert message is not None and "no alive node" in message


def test_an_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown placement"):
        shortfall(worker_bundle(1), 1, "scatter", [])


amounts = st.sampled_from([0.0, 1.0, 2.0, 3.0, 4.0, 8.0])


@given(
    nodes=st.lists(st.tuples(amounts, amounts), max_size=4),
    tp=st.integers(1, 3),
    count=st.integers(1, 6),
    strategy=st.sampled_from(PLACEMENTS),
)
def test_shortfall_agrees_with_trying_every_assignment(
    nodes: list[tuple[float, float]], tp: int, count: int, strategy: str
) -> None:
    cluster = [node("n" * (i + 1), g, c) for i, (g, c) in enumerate(nodes)]
    bundle = worker_bundle(tp)
    fits = fits_brute_force(bundle, count, strategy, cluster)
    assert (shortfall(bundle, count, strategy, cluster) is None) == fits


def test_a_worker_tries_its_own_band_first_then_the_bands_after_everyones() -> None:
    ports = candidate_ports(2, 4, 31000, 10)
    assert [next(ports) for _ in range(3)] == [31020, 31040, 31050]


@given(
    index=st.integers(0, 7), dp=st.integers(1, 8), base=st.integers(1024, 65000),
    stride=st.sampled_from([10, 1100]),
)  # fmt: skip
def test_candidate_bands_fit_below_65536_and_never_take_another_workers_own_band(
    index: int, dp: int, base: int, stride: int
) -> None:
    if index >= dp:
        index = dp - 1
    ports = list(candidate_ports(index, dp, base, stride))
    others = {base + i * stride for i in range(dp) if i != index}
    assert all(p + stride - 1 <= MAX_PORT for p in ports)
    assert not others.intersection(ports)
    assert len(ports) == len(set(ports))
