"""Dashboard rendering (pure): records in, a rich renderable out, rebuilt every frame.

The data is the router's stats payload (`/debug/stats`, the same dict in process or over HTTP)
plus, inside `launch`, the supervisor's per-worker process facts. `frame()` turns two successive
payloads into rates and builds plain records; `render()` draws them (wait: the router's estimate
of the prefill queued there and its decode load, in seconds; prefill: its fitted prefill price
as tokens per second, `prices.py`):

    ┌ sglang-dp · Llama-3.1-8B · cache_aware · http://127.0.0.1:30000 · up 0:12:04 ┐
    │ 41.2 req/s · 9,870 tok/s · cache hit 74.1 % (predicted 75.0 %) · tree 1.2 M   │
    │ admitted 31/2048 · queue 0/256 · shed 0 · breakers open: none                │
    └──────────────────────────────────────────────────────────────────────────────┘
     #  GPU  port   state    queue          wait    prefill   routed  match  hit   tree  ...
     0  0    31000  healthy  12 ██████▌     0.42 s  7.1 k/s   1,204   81 %   79 %  210 k ...
    events: 22:41:03 worker 3 restarted · ...

With the workers' KV events followed (`kv_events` in the payload), a last column `view` says
what each worker is matched on: `events 12/s` (exact; batches per second) or `tree: <why>`.

Rows come from plain records and a fresh table is built each frame (no widget state).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

STATE_STYLES = {
    "healthy": "green",
    "starting": "yellow",
    "loading": "yellow",
    "restarting": "yellow",
    "unhealthy": "red",
    "failed": "bold red",
    "stopped": "dim",
    "unready": "yellow",  # service discovery: its pod is not Ready, it takes no new requests
}
BAR_WIDTH = 10
BLOCKS = " ▏▎▍▌▋▊▉█"


@dataclass(frozen=True)
class ProcessFacts:
    """What the launcher knows about one worker process (absent for a remote router)."""

    index: int
    url: str
    gpus: str
    state: str
    restarts: int
    cpu_percent: float
    rss_bytes: int
    retry_in_s: float | None = None  # failed: tried again in this many seconds
    node: str = ""  # the Ray node it runs on, "" for a local worker


VIEW_WIDTH = 28  # the reason a worker is on the tree, cut to fit a terminal


@dataclass(frozen=True)
class WorkerRow:
    index: int
    url: str
    gpus: str
    state: str
    in_flight: int
    routed: int
    predicted_rate: float
    hit_rate: float
    tree_size: int
    restarts: int
    cpu_percent: float | None
    rss_bytes: int | None
    retry_in_s: float | None = None
    node: str = ""
    wait_s: float | None = None  # estimated queue wait (s)
    prefill_tokens_per_s: float | None = None  # its fitted prefill price, as a rate
    pod: str = ""  # service discovery: the worker's pod, namespace/name
    view: str = ""  # what its matches come from: "events" (KV events, exact) or "tree"
    view_note: str = ""  # events: their rate; tree: why not events


@dataclass(frozen=True)
class Frame:
    title: str
    policy: str
    url: str
    uptime_s: float
    requests_per_s: float
    tokens_per_s: float
    hit_rate: float
    predicted_rate: float
    tree_size: int
    workers: tuple[WorkerRow, ...]
    events: tuple[str, ...]
    discovery: str = ""  # service discovery's summary ("" without it)
    discovery_stale: bool = False
    admission: Admission | None = None


@dataclass(frozen=True)
class Admission:
    """Admission control and circuit breakers (`/debug/stats`' "admission")."""

    in_flight: int
    cap: int  # 0: no cap
    waiting: int
    queue_size: int
    refused_full: int  # 429
    refused_overloaded: int  # 429
    timed_out: int  # 408
    breakers_open: tuple[str, ...]  # ports of workers whose breaker is open or half-open

    @property
    def shed(self) -> int:
        return self.refused_full + self.refused_overloaded + self.timed_out


def _admission(stats: Mapping[str, Any]) -> Admission | None:
    gate = stats.get("admission")
    if not isinstance(gate, Mapping):
        return None
    breakers = gate.get("breakers", {})
    return Admission(
        in_flight=int(gate.get("in_flight", 0)),
        cap=int(gate.get("cap", 0)),
        waiting=int(gate.get("waiting", 0)),
        queue_size=int(gate.get("queue_size", 0)),
        refused_full=int(gate.get("refused_full", 0)),
        refused_overloaded=int(gate.get("refused_overloaded", 0)),
        timed_out=int(gate.get("timed_out", 0)),
        breakers_open=tuple(
            f"{url.rsplit(':', 1)[-1]} ({state.replace('_', '-')})"
            for url, state in sorted(breakers.items())
            if state != "closed"
        ),
    )


def _totals(stats: Mapping[str, Any]) -> tuple[int, int]:
    workers = stats.get("workers", [])
    routed = sum(w.get("completed", 0) for w in workers)
    tokens = sum(w.get("completion_tokens", 0) for w in workers)
    return routed, tokens


def frame(
    stats: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
    *,
    title: str,
    url: str,
    processes: Sequence[ProcessFacts] = (),
) -> Frame:
    """Plain records for one frame; rates come from the change since `previous`."""
    rps = tps = 0.0
    if previous is not None:
        elapsed = float(stats.get("now", 0)) - float(previous.get("now", 0))
        if elapsed > 0:
            (done, tokens), (done0, tokens0) = _totals(stats), _totals(previous)
            rps, tps = (done - done0) / elapsed, (tokens - tokens0) / elapsed
    by_url = {p.url: p for p in processes}
    per_token = float(stats.get("elements_per_token", 1.0)) or 1.0
    rows = [
        _row(i, w, by_url.get(w["url"]), per_token) for i, w in enumerate(stats.get("workers", []))
    ]
    known = {row.url for row in rows}
    rows += [_process_only_row(p) for p in processes if p.url not in known]
    rows.sort(key=lambda row: row.index)
    discovery = stats.get("discovery")
    if isinstance(discovery, Mapping):
        rows = with_pods(rows, discovery)
    kv_events = stats.get("kv_events")
    if isinstance(kv_events, Mapping):
        rows = with_views(rows, stats.get("workers", []), kv_events)
    workers = stats.get("workers", [])
    prompt = sum(w.get("prompt_tokens", 0) for w in workers)
    predicted = sum(w.get("predicted_tokens", 0) for w in workers)
    return Frame(
        title=title,
        policy=str(stats.get("policy", "?")),
        url=url,
        uptime_s=float(stats.get("uptime_s", 0.0)),
        requests_per_s=rps,
        tokens_per_s=tps,
        hit_rate=float(stats.get("hit_rate", 0.0)),
        predicted_rate=predicted / prompt if prompt else 0.0,
        tree_size=int(stats.get("tree_size", 0)),
        workers=tuple(rows),
        events=tuple(stats.get("events", [])[-6:]),
        discovery=discovery_summary(discovery) if isinstance(discovery, Mapping) else "",
        discovery_stale=isinstance(discovery, Mapping) and discovery.get("state") == "stale",
        admission=_admission(stats),
    )


def with_pods(rows: list[WorkerRow], discovery: Mapping[str, Any]) -> list[WorkerRow]:
    """Each discovered worker's row names its pod; a held one (pod not Ready) says unready."""
    pods = {p["worker"]: p for p in discovery.get("pods", []) if p.get("worker")}
    out = []
    for row in rows:
        pod = pods.get(row.url)
        if pod is None:
            out.append(row)
            continue
        state = row.state if pod.get("routed", True) else "unready"
        out.append(dataclasses.replace(row, pod=f"{pod['namespace']}/{pod['name']}", state=state))
    return out


def with_views(
    rows: list[WorkerRow], workers: Sequence[Mapping[str, Any]], kv_events: Mapping[str, Any]
) -> list[WorkerRow]:
    """Each row says what the router matches that worker on: its KV events (with their rate)
    or the approximate tree (with why not events)."""
    views = {w["url"]: w.get("cache_view", "tree") for w in workers}
    streams: Mapping[str, Any] = kv_events.get("workers", {})
    out = []
    for row in rows:
        view = views.get(row.url, "tree")
        stream = streams.get(row.url)
        if view == "events" and stream is not None:
            note = f"{float(stream.get('events_per_s', 0.0)):.0f}/s"
        else:
            note = str(stream.get("reason", "")) if stream is not None else "not followed"
        out.append(dataclasses.replace(row, view=view, view_note=note))
    return out


def discovery_summary(discovery: Mapping[str, Any]) -> str:
    """'pods 3/4 Ready · synced' (with the error when stale)."""
    pods = discovery.get("pods", [])
    ready = sum(1 for p in pods if p.get("ready") and not p.get("terminating"))
    text = f"pods {ready}/{len(pods)} Ready · discovery {discovery.get('state', '?')}"
    error = discovery.get("last_error")
    return f"{text}: {error}" if discovery.get("state") == "stale" and error else text


def _row(
    index: int, worker: Mapping[str, Any], facts: ProcessFacts | None, per_token: float
) -> WorkerRow:
    wait = worker.get("wait_s")
    rate = None
    prices = worker.get("ttft_prices")
    if isinstance(prices, (list, tuple)) and len(prices) == 3 and float(prices[1]) > 0:
        rate = 1.0 / (float(prices[1]) * per_token)
    return WorkerRow(
        index=facts.index if facts else index,
        url=worker["url"],
        gpus=facts.gpus if facts else "-",
        # the launcher's state follows the router's health checks; it also knows the process
        state=facts.state if facts else worker.get("state", "?"),
        in_flight=int(worker.get("in_flight", 0)),
        routed=int(worker.get("routed", 0)),
        predicted_rate=float(worker.get("predicted_rate", 0.0)),
        hit_rate=float(worker.get("hit_rate", 0.0)),
        tree_size=int(worker.get("tree_size", 0)),
        restarts=facts.restarts if facts else int(worker.get("resets", 0)),
        cpu_percent=facts.cpu_percent if facts else None,
        rss_bytes=facts.rss_bytes if facts else None,
        retry_in_s=facts.retry_in_s if facts else None,
        node=facts.node if facts else "",
        wait_s=None if wait is None else float(wait),
        prefill_tokens_per_s=rate,
    )


def _process_only_row(facts: ProcessFacts) -> WorkerRow:
    """A worker the router does not know (yet): starting, or restarting on a new port."""
    return WorkerRow(
        facts.index, facts.url, facts.gpus, facts.state, 0, 0, 0.0, 0.0, 0,
        facts.restarts, facts.cpu_percent, facts.rss_bytes, facts.retry_in_s, node=facts.node,
    )  # fmt: skip


def state_text(state: str, retry_in_s: float | None) -> str:
    """'failed' → 'failed, retry in 4:05' while a retry is planned."""
    if retry_in_s is None:
        return state
    minutes, seconds = divmod(max(0, round(retry_in_s)), 60)
    return f"{state}, retry in {minutes}:{seconds:02d}"


def human(n: float) -> str:
    """1234 → '1.2 k', 5_600_000 → '5.6 M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    whole = int(max(seconds, 0))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def bar(value: int, scale: int, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of `value` out of `scale`, in eighths of a character."""
    eighths = round(min(value / scale, 1.0) * width * 8) if scale > 0 else 0
    full, part = divmod(eighths, 8)
    return ("█" * full + (BLOCKS[part] if part else "")).ljust(width)


def percent(rate: float) -> str:
    return f"{rate * 100:.0f} %"


def header(f: Frame) -> Panel:
    top = Text.assemble(
        ("sglang-dp", "bold cyan"), " · ", (f.title, "bold"), " · ", f.policy, " · ",
        (f.url, "underline"), " · up ", duration(f.uptime_s),
    )  # fmt: skip
    figures = Text.assemble(
        (f"{f.requests_per_s:.1f}", "bold"), " req/s · ",
        (human(f.tokens_per_s), "bold"), " tok/s · cache hit ",
        (f"{f.hit_rate * 100:.1f} %", "bold green"),
        f" (predicted {f.predicted_rate * 100:.1f} %) · tree {human(f.tree_size)}",
    )  # fmt: skip
    lines = [top, figures]
    if f.discovery:
        lines.append(Text(f.discovery, style="bold red" if f.discovery_stale else "dim"))
    gate = f.admission
    if gate is not None:
        cap = f"{gate.cap:,}" if gate.cap else "no cap"
        lines.append(Text.assemble(
            f"admitted {gate.in_flight:,}/{cap} · ",
            f"queue {gate.waiting:,}/{gate.queue_size:,} · shed ",
            (f"{gate.shed:,}", "bold red" if gate.shed else ""),
            f" (429 {gate.refused_full + gate.refused_overloaded:,} · 408 {gate.timed_out:,})",
            " · breakers open: ",
            (", ".join(gate.breakers_open), "bold red") if gate.breakers_open else "none",
        ))  # fmt: skip
    return Panel(Group(*lines), padding=(0, 1))


def worker_table(f: Frame) -> Table:
    table = Table(expand=False, box=None, header_style="bold", pad_edge=False)
    on_nodes = any(w.node for w in f.workers)  # Ray workers: say which node holds each
    if on_nodes:
        table.add_column("node")
    in_pods = any(w.pod for w in f.workers)  # service discovery: say which pod each is
    if in_pods:
        table.add_column("pod")
    viewed = any(w.view for w in f.workers)  # KV events: say what each worker is matched on
    for name, justify in (
        ("#", "right"), ("GPU", "left"), ("port", "right"), ("state", "left"),
        ("queue", "left"), ("wait", "right"), ("prefill", "right"),
        ("routed", "right"), ("match", "right"), ("hit", "right"),
        ("tree", "right"), ("restarts", "right"), ("CPU", "right"), ("mem", "right"),
    ):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    if viewed:
        table.add_column("view", no_wrap=True, max_width=VIEW_WIDTH)
    scale = max([8, *(w.in_flight for w in f.workers)])
    for w in f.workers:
        table.add_row(
            *([w.node] if on_nodes else []),
            *([w.pod or "(added by hand)"] if in_pods else []),
            str(w.index),
            w.gpus,
            w.url.rsplit(":", 1)[-1],
            Text(state_text(w.state, w.retry_in_s), style=STATE_STYLES.get(w.state, "")),
            Text(f"{w.in_flight:>4} ") + Text(bar(w.in_flight, scale), style="cyan"),
            "-" if w.wait_s is None else f"{w.wait_s:.2f} s",
            "-" if w.prefill_tokens_per_s is None else human(w.prefill_tokens_per_s) + "/s",
            f"{w.routed:,}",
            percent(w.predicted_rate),
            percent(w.hit_rate),
            human(w.tree_size),
            str(w.restarts),
            "-" if w.cpu_percent is None else f"{w.cpu_percent:.0f} %",
            "-" if w.rss_bytes is None else human(w.rss_bytes) + "B",
            *([view_text(w)] if viewed else []),
        )
    return table


def view_text(w: WorkerRow) -> Text:
    """'events 12/s' in green, or 'tree: <why>' in yellow."""
    if w.view == "events":
        return Text(f"events {w.view_note}", style="green")
    return Text(f"tree: {w.view_note}" if w.view_note else "tree", style="yellow")


def render(f: Frame) -> RenderableType:
    """The whole dashboard for one frame."""
    events = Text("events: ", style="bold")
    events.append(" · ".join(f.events) if f.events else "none yet", style="dim")
    return Group(header(f), worker_table(f), events)


def status_line(f: Frame, now: float | None = None) -> str:
    """One plain line for logs and non-terminal output."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    healthy = sum(1 for w in f.workers if w.state == "healthy")
    queue = sum(w.in_flight for w in f.workers)
    return (
        f"{stamp} {healthy}/{len(f.workers)} workers healthy · {f.requests_per_s:.1f} req/s · "
        f"{human(f.tokens_per_s)} tok/s · in flight {queue} · cache hit {f.hit_rate * 100:.1f} %"
    )


@dataclass(frozen=True)
class StartupRow:
    index: int
    gpus: str
    port: int
    state: str
    elapsed_s: float
    last_error: str = ""
    node: str = ""


def startup_table(rows: Sequence[StartupRow], model: str) -> RenderableType:
    """Per-worker progress while the workers start (starting → loading → healthy)."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    on_nodes = any(row.node for row in rows)
    for name in (["node"] if on_nodes else []) + ["#", "GPU", "port", "state", "elapsed", ""]:
        table.add_column(name)
    for row in rows:
        table.add_row(
            *([row.node] if on_nodes else []),
            str(row.index),
            row.gpus,
            str(row.port),
            Text(row.state, style=STATE_STYLES.get(row.state, "")),
            duration(row.elapsed_s),
            Text(row.last_error[:60], style="dim"),
        )
    ready = sum(1 for row in rows if row.state == "healthy")
    title = Text.assemble(
        ("sglang-dp", "bold cyan"), f" · starting {len(rows)} workers of {model} · ",
        (f"{ready}/{len(rows)} healthy", "bold"),
    )  # fmt: skip
    return Group(title, table)
