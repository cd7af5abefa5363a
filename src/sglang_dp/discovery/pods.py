"""Pods → workers, pure: what a pod is, and what the router should do about a set of them.

`parse_pod(obj)` reads the fields that matter from a Pod API object (a dict, as LIST and WATCH
return it). `reconcile(pods, members, port, now, grace, foreign)` compares the whole desired set
with what discovery registered so far and returns a `Plan`; the shell applies it and keeps
`plan.members` for the next call. It is level-triggered: called on every watch event and on a
timer, with the whole set each time, it converges whatever events were missed or repeated, and
a second call with nothing new returns an empty plan.

A pod's worker is `http://<pod IP>:<port>`. Per worker URL:

    no member, pod eligible ─────────────▶ add      (eligible: Running, Ready, not terminating)
    member, same pod, eligible, held ────▶ release  (takes new requests again)
    member, same pod, not eligible ──────▶ hold     (no new requests; its tree share is kept)
      ... still not eligible after `grace` ▶ remove (grace 0: at once)
    member, another pod (UID) on its IP ─▶ remove, then add the new pod if eligible
                                            (a new pod is a new worker with an empty cache)
    member, pod terminating / gone ──────▶ remove

Workers registered by hand (`foreign`: the router's workers that discovery did not add) are
left alone, even if a pod has their address. Two live pods on one address (hostNetwork pods, or
a missed DELETE): the member's own pod is kept while it is alive, else an eligible one, else
the first by name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ELIGIBLE_PHASE = "Running"
ENDED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Pod:
    uid: str
    name: str
    namespace: str
    ip: str  # "" until the pod has one
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    ready: bool  # the Ready condition is True
    terminating: bool  # deletionTimestamp is set: it is being shut down

    @property
    def eligible(self) -> bool:
        """May take requests: Running, Ready, not terminating, with an IP."""
        return (
            self.phase == ELIGIBLE_PHASE and self.ready and not self.terminating and bool(self.ip)
        )

    @property
    def live(self) -> bool:
        """Still a candidate for its address (a worker may come back on it)."""
        return bool(self.ip) and not self.terminating and self.phase not in ENDED_PHASES

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"


class InvalidPod(ValueError):
    """An object that is not a pod we can read (no metadata.uid)."""


def parse_pod(obj: Mapping[str, Any]) -> Pod:
    """The pod fields discovery needs, from an API object (missing status: a pending pod)."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("uid"), str):
        raise InvalidPod(f"not a pod object: {str(obj)[:200]}")
    status = obj.get("status")
    status = status if isinstance(status, Mapping) else {}
    conditions = status.get("conditions")
    ready = any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in (conditions if isinstance(conditions, list) else ())
    )
    ip = status.get("podIP")
    return Pod(
        uid=meta["uid"],
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "")),
        ip=ip if isinstance(ip, str) else "",
        phase=str(status.get("phase", "Pending")),
        ready=ready,
        terminating=meta.get("deletionTimestamp") is not None,
    )


def pod_url(ip: str, port: int) -> str:
    """`http://10.0.0.5:30000`; an IPv6 address in brackets."""
    try:
        v6 = ipaddress.ip_address(ip).version == 6
    except ValueError:
        v6 = False
    return f"http://[{ip}]:{port}" if v6 else f"http://{ip}:{port}"


@dataclass(frozen=True)
class Member:
    """A worker discovery registered, and the pod it is."""

    url: str
    pod: Pod
    routed: bool = True  # False: held out of routing while its pod is not Ready
    unready_since: float | None = None


@dataclass(frozen=True)
class Plan:
    """What to do, in this order: remove, add, hold, release. `members` is the new state."""

    remove: tuple[tuple[str, str], ...]  # (url, why)
    add: tuple[Member, ...]
    hold: tuple[str, ...]
    release: tuple[str, ...]
    members: Mapping[str, Member]

    @property
    def empty(self) -> bool:
        return not (self.remove or self.add or self.hold or self.release)


def choose_pods(pods: Iterable[Pod], port: int, members: Mapping[str, Member]) -> dict[str, Pod]:
    """One pod per worker URL among the live ones (see the module docstring for the order)."""
    by_url: dict[str, list[Pod]] = {}
    for pod in pods:
        if pod.live:
            by_url.setdefault(pod_url(pod.ip, port), []).append(pod)
    chosen: dict[str, Pod] = {}
    for url, candidates in by_url.items():
        member = members.get(url)
        own = [p for p in candidates if member is not None and p.uid == member.pod.uid]
        chosen[url] = (
            own[0] if own else min(candidates, key=lambda p: (not p.eligible, p.name, p.uid))
        )
    return chosen


def reconcile(
    pods: Iterable[Pod],
    members: Mapping[str, Member],
    port: int,
    now: float,
    grace: float,
    foreign: Collection[str] = (),
) -> Plan:
    """The plan that makes the registered workers match the pods (see the module docstring)."""
    pods = list(pods)
    chosen = choose_pods(pods, port, members)
    by_uid = {p.uid: p for p in pods}
    remove: list[tuple[str, str]] = []
    add: list[Member] = []
    hold: list[str] = []
    release: list[str] = []
    kept: dict[str, Member] = {}
    for url, member in members.items():
        pod = chosen.get(url)
        if pod is None:
            remove.append((url, _gone_reason(member.pod, by_uid.get(member.pod.uid))))
        elif pod.uid != member.pod.uid:
            remove.append((url, f"pod {member.pod.label} was replaced by {pod.label}"))
        elif pod.eligible:
            kept[url] = Member(url, pod)
            if not member.routed:
                release.append(url)
        else:
            since = now if member.unready_since is None else member.unready_since
            if now - since >= grace:
                remove.append((url, f"pod {pod.label} unready for {grace:g} s"))
                continue
            kept[url] = Member(url, pod, routed=False, unready_since=since)
            if member.routed:
                hold.append(url)
    # a free address takes its best pod, whoever held it before (that member may just have left)
    for url, pod in choose_pods(pods, port, {}).items():
        if url not in kept and url not in foreign and pod.eligible:
            kept[url] = member = Member(url, pod)
            add.append(member)
    return Plan(tuple(remove), tuple(add), tuple(hold), tuple(release), kept)


def _gone_reason(was: Pod, now: Pod | None) -> str:
    if now is None:
        return f"pod {was.label} was deleted"
    if now.terminating:
        return f"pod {was.label} is terminating"
    if now.phase in ENDED_PHASES:
        return f"pod {was.label} {now.phase.lower()}"
    return f"pod {was.label} lost its IP"
