"""Rendering of the router's debug data (pure): the worker summary, the tree, a dry-run decision.

Inputs are the JSON of `/debug/stats`, `/debug/tree` and `/debug/route`; outputs are rich
renderables. Each worker gets one colour everywhere (summary, tree, decision), by its index in
the router's worker list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from sglang_dp.dashboard.render import human

PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")


def worker_names(stats: Mapping[str, Any]) -> dict[str, str]:
    """url → 'w<i>' in the router's order."""
    return {w["url"]: f"w{i}" for i, w in enumerate(stats.get("workers", []))}


def _style(name: str) -> str:
    index = int(name[1:]) if name[1:].isdigit() else 0
    return PALETTE[index % len(PALETTE)]


def _pct(value: float) -> str:
    return f"{value * 100:.0f} %"


def summary_table(stats: Mapping[str, Any]) -> Table:
    names = worker_names(stats)
    total = max(int(stats.get("tree_size", 0)), 1)
    table = Table(title="what the router believes each worker holds", title_justify="left")
    for column in ("worker", "state", "tree share", "budget", "requests",
                   "predicted", "hit", "corrected", "evicted", "url"):  # fmt: skip
        table.add_column(
            column, justify="left" if column in ("worker", "url", "state") else "right"
        )
    streams = kv_streams(stats)
    if streams is not None:
        table.add_column("events (exact blocks)", justify="left")
        table.add_column("routed on speculation", justify="right")
    for w in stats.get("workers", []):
        name = names[w["url"]]
        budget = w.get("budget")
        table.add_row(
            Text(name, style=_style(name)),
            w.get("state", "?"),
            f"{human(w.get('tree_size', 0))} ({_pct(w.get('tree_size', 0) / total)})",
            "∞"
            if budget is None or (isinstance(budget, float) and math.isinf(budget))
            else human(budget),
            f"{w.get('routed', 0):,}",
            _pct(w.get("predicted_rate", 0.0)),
            _pct(w.get("hit_rate", 0.0)),
            str(w.get("corrections", 0)),
            human(w.get("evicted", 0)),
            w["url"],
            *(stream_cells(streams.get(w["url"]), w) if streams is not None else []),
        )
    return table


def kv_streams(stats: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The KV event streams the router follows (None when it follows none: `--cache-view
    approx`)."""
    kv = stats.get("kv_events")
    return kv.get("workers", {}) if isinstance(kv, Mapping) else None


def stream_cells(stream: Mapping[str, Any] | None, worker: Mapping[str, Any]) -> list[Text]:
    """The events columns of one worker: its stream, and its routes on unconfirmed pages."""
    return [stream_cell(stream), Text(f"{int(worker.get('speculated', 0)):,}")]


def stream_cell(stream: Mapping[str, Any] | None) -> Text:
    """'1,204 blocks, exact' or 'untrusted: <why>' for one worker's stream."""
    if stream is None:
        return Text("not followed", style="dim")
    if stream.get("trusted"):
        return Text(f"{int(stream.get('blocks', 0)):,} blocks, exact", style="green")
    return Text(f"tree: {stream.get('reason', '?')}", style="yellow")


def view_sentence(route: Mapping[str, Any]) -> str:
    """Which picture of the chosen worker's cache decided ('' when there is only the tree)."""
    views = {w.get("view") for w in route.get("workers", [])}
    if "events" not in views:
        return ""
    if route["decision"].get("view") == "events":
        return "; its match is exact: the blocks its KV events say it holds"
    return "; its match is the approximate tree's: its KV events are not whole (see the summary)"


def _branch_label(branch: Mapping[str, Any], names: Mapping[str, str]) -> Text:
    label = Text()
    label.append(f'"{branch["text"]}"', style="bold")
    label.append(
        f"  {branch['length']:,} chars · subtree {human(branch['subtree_size'])} · ", style="dim"
    )
    for i, holder in enumerate(branch.get("workers", [])):
        name = names.get(holder["url"], holder["url"])
        if i:
            label.append(" ")
        label.append(name, style=_style(name))
        label.append(f" ({_ago(holder['idle_s'])})", style="dim")
    return label


def _ago(seconds: float) -> str:
    if seconds < 1:
        return "now"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _grow(node: Tree, branches: Sequence[Mapping[str, Any]], names: Mapping[str, str]) -> None:
    for branch in branches:
        child = node.add(_branch_label(branch, names))
        _grow(child, branch.get("children", []), names)
        hidden = branch.get("hidden_children", 0)
        if hidden:
            child.add(Text(f"… {hidden} smaller branch(es) not shown (--top)", style="dim"))


def tree_view(tree: Mapping[str, Any], stats: Mapping[str, Any]) -> Tree:
    names = worker_names(stats)
    root = Tree(
        Text.assemble(
            ("tree", "bold"),
            f"  {human(tree.get('total_size', 0))} chars in {tree.get('nodes', 0):,} nodes",
        )
    )
    _grow(root, tree.get("branches", []), names)
    if not tree.get("branches"):
        root.add(Text("empty: no request has been routed yet (or every share was dropped)"))
    return root


def explain(route: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    """The decision in plain words."""
    names = worker_names(stats)
    d = route["decision"]
    settings = route.get("settings", {})
    length = route.get("key_length", 0)
    name = names.get(d["worker"], d["worker"])
    loads = {w["url"]: w["load"] for w in route.get("workers", [])}
    threshold = settings.get("cache_threshold", 0.0)
    unit = route.get("key_unit", "characters")
    held = f"{d['matched']:,} of {length:,} {unit} ({_pct(d['match_rate'])})"
    reason = d["reason"]
    if d["policy"] == "least_ttft":
        return _explain_least_ttft(route, names, held)
    if reason == "cache_hit" and d["policy"] == "variance":
        return f"{name} holds {held}, the most among workers not overloaded (μ + Kσ)"
    if reason == "cache_hit":
        return f"{name} holds {held} > threshold {_pct(threshold)}"
    if reason == "below_threshold":
        best = max((w["matched"] for w in route.get("workers", [])), default=0)
        rate = best / length if length else 0.0
        below = f"the best match is {best:,} of {length:,} {unit} ({_pct(rate)}) ≤ threshold "
        in_flight = f"{loads.get(d['worker'], 0)} in flight"
        if d["policy"] == "cache_aware":
            pending = {w["url"]: w.get("pending", 0) for w in route.get("workers", [])}
            return (
                f"{below}{_pct(threshold)}: the worker with the least pending prefill, {name} "
                f"({pending.get(d['worker'], 0):,} uncached {unit}, {in_flight}), takes it"
            )
        return f"{below}{_pct(threshold)}: the least loaded worker, {name} ({in_flight}), takes it"
    if reason in ("imbalanced", "imbalanced_hit"):
        high, low = max(loads.values()), min(loads.values())
        why = (
            f"loads are imbalanced (max {high} − min {low} > "
            f"{settings.get('balance_abs_threshold')} and {high} > {low} × "
            f"{settings.get('balance_rel_threshold')})"
        )
        if reason == "imbalanced_hit":
            return f"{why}: {name} holds {held} and is not overloaded, so it takes it"
        return f"{why}: the least loaded worker, {name}, takes it"
    if reason == "no_match":
        return f"no worker within μ + Kσ holds any of it: the least loaded of them, {name}"
    return f"{name}, by the {d['policy']} policy (it does not look at the cache)"


def _explain_least_ttft(route: Mapping[str, Any], names: Mapping[str, str], held: str) -> str:
    d = route["decision"]
    workers = route.get("workers", [])
    name = names.get(d["worker"], d["worker"])
    ttft = {w["url"]: w.get("estimate", {}).get("ttft_s", 0.0) for w in workers}
    soonest = f"soonest first token (est. {_seconds(ttft.get(d['worker'], 0.0))})"
    if d["reason"] == "least_wait":
        return f"no worker holds any of it; {name}: {soonest}"
    if d["reason"] == "cache_hit":
        return f"{name} holds {held}: {soonest}"
    if d["reason"] == "idle":
        return f"{name} has nothing in flight, the cheapest is busy: no GPU idles ({soonest})"
    best = max(workers, key=lambda w: w["matched"])
    holder = names.get(best["url"], best["url"])
    return (
        f"{holder} holds most ({best['matched']:,}) but its queue makes it "
        f"{_seconds(ttft.get(best['url'], 0.0))}; {name} recomputes: {soonest}"
    )


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _estimate_cell(estimate: Mapping[str, float] | None) -> str:
    if not estimate:
        return "-"
    parts = (("queue", "queue_s"), ("prefill", "prefill_s"), ("batch", "running_s"))
    shown = " + ".join(f"{label} {_seconds(estimate[k])}" for label, k in parts if estimate[k])
    ttft = f"{_seconds(estimate['ttft_s'])}" + (f" ({shown})" if shown else "")
    return f"{ttft}, then {_seconds(estimate.get('decode_s', 0.0))} to answer"


def decision_view(route: Mapping[str, Any], stats: Mapping[str, Any]) -> RenderableType:
    names = worker_names(stats)
    table = Table(title="per worker", title_justify="left")
    viewed = any(w.get("view") == "events" for w in route.get("workers", []))
    for column in (
        "worker", "url", "matched", "rate", "in flight", "pending prefill", "estimated",
        *(["view"] if viewed else []),
    ):  # fmt: skip
        table.add_column(column, justify="left" if column in ("worker", "url") else "right")
    length = max(int(route.get("key_length", 0)), 1)
    chosen = route["decision"]["worker"]
    for w in route.get("workers", []):
        name = names.get(w["url"], w["url"])
        marker = " ◀" if w["url"] == chosen else ""
        table.add_row(
            Text(name + marker, style=_style(name)),
            w["url"],
            f"{w['matched']:,}",
            _pct(w["matched"] / length),
            str(w["load"]),
            f"{w.get('pending', 0):,}",
            _estimate_cell(w.get("estimate")),
            *([w.get("view", "tree")] if viewed else []),
        )
    d = route["decision"]
    name = names.get(d["worker"], d["worker"])
    headline = Text.assemble(
        ("→ ", "bold"), (name, f"bold {_style(name)}"),
        f"  [{d['reason']}, policy {d['policy']}]\n", explain(route, stats),
        view_sentence(route),
    )  # fmt: skip
    return Group(headline, table)
