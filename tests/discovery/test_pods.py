"""The pure core of service discovery: pods from API objects, selectors, and reconcile."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.discovery.config import DiscoveryConfig, parse_selector, selector_query
from sglang_dp.discovery.pods import InvalidPod, Member, Plan, Pod, parse_pod, pod_url, reconcile

PORT = 30000


def pod(
    name: str = "w0",
    ip: str = "10.0.0.1",
    uid: str | None = None,
    phase: str = "Running",
    ready: bool = True,
    terminating: bool = False,
) -> Pod:
    return Pod(uid or f"uid-{name}", name, "default", ip, phase, ready, terminating)


def url(ip: str) -> str:
    return pod_url(ip, PORT)


def run(
    pods: list[Pod], members: dict[str, Member] | None = None, now: float = 0.0, **kw: Any
) -> Plan:
    return reconcile(pods, members or {}, PORT, now, kw.pop("grace", 30.0), **kw)


# --- parsing ---------------------------------------------------------------------------------


def test_a_pod_object_as_the_api_returns_it() -> None:
    obj = {
        "metadata": {"name": "sglang-0", "namespace": "llm", "uid": "u1", "labels": {"app": "s"}},
        "status": {
            "phase": "Running",
            "podIP": "10.1.2.3",
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "True"},
            ],
        },
    }
    assert parse_pod(obj) == Pod("u1", "sglang-0", "llm", "10.1.2.3", "Running", True, False)
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"  # type: ignore[index]
    assert parse_pod(obj).terminating


def test_a_pending_pod_without_status_is_not_eligible() -> None:
    parsed = parse_pod({"metadata": {"name": "p", "namespace": "d", "uid": "u"}})
    assert (parsed.phase, parsed.ip, parsed.ready, parsed.eligible) == ("Pending", "", False, False)


@pytest.mark.parametrize("obj", [{}, {"metadata": {"name": "x"}}, {"metadata": "nope"}])
def test_an_object_without_a_uid_is_refused(obj: dict[str, Any]) -> None:
    with pytest.raises(InvalidPod):
        parse_pod(obj)


def test_ipv6_pod_urls_are_bracketed() -> None:
    assert pod_url("fd00::5", 8000) == "http://[fd00::5]:8000"
    assert pod_url("10.0.0.5", 8000) == "http://10.0.0.5:8000"


def test_selectors_are_anded_labels() -> None:
    labels = parse_selector(("app=sglang", "tier=gpu,zone=a"))
    assert labels == {"app": "sglang", "tier": "gpu", "zone": "a"}
    assert selector_query(labels) == "app=sglang,tier=gpu,zone=a"
    assert parse_selector(("app.kubernetes.io/name=sglang",)) == {
        "app.kubernetes.io/name": "sglang"
    }


@pytest.mark.parametrize("bad", ["app", "app!=x", "=x", "a b=c", "app=x y", "a=1,a=2"])
def test_bad_selectors_are_clear_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="selector"):
        parse_selector((bad,))


def test_discovery_options_are_checked() -> None:
    with pytest.raises(ValueError, match="needs --selector"):
        DiscoveryConfig(service_discovery=True)
    with pytest.raises(ValueError, match="is not on"):
        DiscoveryConfig(selector=("app=x",))
    with pytest.raises(ValueError, match="port"):
        DiscoveryConfig(service_discovery=True, selector=("app=x",), service_discovery_port=0)
    with pytest.raises(ValueError, match="grace"):
        DiscoveryConfig(
            service_discovery=True, selector=("app=x",), discovery_unready_grace_secs=-1
        )


# --- reconcile: the transitions --------------------------------------------------------------


def test_ready_pods_join_and_others_wait() -> None:
    plan = run([pod("a", "10.0.0.1"), pod("b", "10.0.0.2", ready=False), pod("c", "", ready=True)])
    assert [m.url for m in plan.add] == [url("10.0.0.1")]
    assert not (plan.remove or plan.hold or plan.release)
    assert run([pod("a", "10.0.0.1")], dict(plan.members)).empty


def test_an_unready_pod_is_held_then_released_keeping_its_worker() -> None:
    members = dict(run([pod("a", "10.0.0.1")]).members)
    held = run([pod("a", "10.0.0.1", ready=False)], members, now=5.0)
    assert held.hold == (url("10.0.0.1"),) and not held.remove
    assert held.members[url("10.0.0.1")].unready_since == 5.0
    again = run([pod("a", "10.0.0.1", ready=False)], dict(held.members), now=10.0)
    assert again.empty and again.members[url("10.0.0.1")].unready_since == 5.0
    back = run([pod("a", "10.0.0.1")], dict(held.members), now=12.0)
    assert back.release == (url("10.0.0.1"),) and back.members[url("10.0.0.1")].routed


def test_with_no_grace_an_unready_pod_leaves_at_once() -> None:
    members = dict(run([pod("a")]).members)
    plan = run([pod("a", ready=False)], members, now=3.0, grace=0.0)
    assert [u for u, _ in plan.remove] == [url("10.0.0.1")] and not plan.hold


def test_an_unready_pod_leaves_after_the_grace() -> None:
    members = dict(run([pod("a", "10.0.0.1", ready=False)], dict(run([pod("a")]).members)).members)
    kept = run([pod("a", ready=False)], members, now=29.9)
    assert kept.empty
    gone = run([pod("a", ready=False)], members, now=30.0)
    assert gone.remove == ((url("10.0.0.1"), "pod default/a unready for 30 s"),)
    assert gone.members == {}
    assert run([pod("a", ready=False)], {}, now=31.0).empty  # not back until Ready


@pytest.mark.parametrize(
    ("after", "why"),
    [
        ([], "pod default/a was deleted"),
        ([pod("a", terminating=True)], "pod default/a is terminating"),
        ([pod("a", phase="Failed", ready=False)], "pod default/a failed"),
    ],
)
def test_a_pod_that_goes_leaves(after: list[Pod], why: str) -> None:
    members = dict(run([pod("a")]).members)
    assert run(after, members).remove == ((url("10.0.0.1"), why),)


def test_a_new_pod_on_a_reused_ip_is_a_new_worker() -> None:
    members = dict(run([pod("a", uid="old")]).members)
    plan = run([pod("a", uid="new")], members)
    assert plan.remove == ((url("10.0.0.1"), "pod default/a was replaced by default/a"),)
    assert [m.pod.uid for m in plan.add] == ["new"]


def test_workers_added_by_hand_are_left_alone() -> None:
    hand = url("10.0.0.1")
    plan = run([pod("a", "10.0.0.1"), pod("b", "10.0.0.2")], foreign=[hand, "http://x:1"])
    assert [m.url for m in plan.add] == [url("10.0.0.2")]
    assert not plan.remove


def test_a_members_own_pod_wins_its_address_over_a_newcomer() -> None:
    members = dict(run([pod("a", uid="a")]).members)
    plan = run([pod("a", uid="a", ready=False), pod("b", uid="b")], members, now=1.0)
    assert plan.hold == (url("10.0.0.1"),) and not plan.add and not plan.remove


def test_a_member_that_leaves_frees_its_address_for_a_ready_pod_at_once() -> None:
    members = dict(run([pod("a", uid="a"), pod("b", uid="b", phase="Pending")]).members)
    plan = run([pod("a", uid="a", phase="Pending"), pod("b", uid="b")], members, grace=0.0)
    assert [u for u, _ in plan.remove] == [url("10.0.0.1")]
    assert [m.pod.uid for m in plan.add] == ["b"]


# --- reconcile: properties over any history ------------------------------------------------

IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", ""]
pods_strategy = st.lists(
    st.builds(
        Pod,
        uid=st.sampled_from(["u1", "u2", "u3", "u4", "u5"]),
        name=st.sampled_from(["a", "b", "c"]),
        namespace=st.just("default"),
        ip=st.sampled_from(IPS),
        phase=st.sampled_from(["Pending", "Running", "Running", "Succeeded", "Failed"]),
        ready=st.booleans(),
        terminating=st.booleans(),
    ),
    max_size=5,
    unique_by=lambda p: p.uid,
)


@settings(max_examples=200, deadline=None)
@given(
    history=st.lists(st.tuples(pods_strategy, st.floats(0, 20)), min_size=1, max_size=8),
    foreign_ip=st.sampled_from(IPS),
    grace=st.sampled_from([0.0, 5.0, 30.0]),
)
def test_reconcile_converges_and_the_router_follows(
    history: list[tuple[list[Pod], float]], foreign_ip: str, grace: float
) -> None:
    foreign = [url(foreign_ip)] if foreign_ip else []
    members: dict[str, Member] = {}
    registered: set[str] = set()  # the router's discovered workers, as the plans leave them
    routed: set[str] = set()
    now = 0.0
    for pods, step in history:
        now += step
        plan = reconcile(pods, members, PORT, now, grace, foreign)
        removed = [u for u, _ in plan.remove]
        assert len(set(removed)) == len(removed) and not set(removed) & set(foreign)
        registered -= set(removed)
        routed -= set(removed)
        for member in plan.add:
            assert member.url not in registered and member.pod.eligible
            registered.add(member.url)
            routed.add(member.url)
        routed -= set(plan.hold)
        routed |= set(plan.release)
        members = dict(plan.members)
        assert registered == set(members)
        assert routed == {u for u, m in members.items() if m.routed}
        for u, member in members.items():
            assert member.pod in pods and member.pod.live and url(member.pod.ip) == u
            assert member.routed == member.pod.eligible
            if not member.routed:
                assert member.unready_since is not None and now - member.unready_since < grace
        for p in pods:
            if p.eligible and url(p.ip) not in foreign:
                assert url(p.ip) in members  # every Ready pod's address is a worker
        assert reconcile(pods, members, PORT, now, grace, foreign).empty  # converged
