"""What a benchmark run measured: per-request records in, figures, a rich table and JSON out.

Pure: `compute_figures` takes the records and the run's measured duration and CPU samples.

- Throughput is over the run's duration (first send to last answer): requests/s, input tokens/s
  (Σ prompt_tokens), output tokens/s (Σ completion_tokens), as the server reported them (our own
  token count of the text when it did not).
- Latencies over completed requests, in ms, mean and p50/p90/p99 (linear interpolation between
  ranks, as numpy's default): TTFT (first piece of text, streaming only), end-to-end, and the
  inter-token latency: every gap between consecutive pieces of text of a stream, pooled.
- Cache hit rate: Σ cached_tokens / Σ prompt_tokens over completed requests that reported
  cached_tokens (None when none did: OpenAI routes report it only with --enable-cache-report).
  The oracle hit rate (workloads.oracle_rate) is the best any router could do with the same
  requests; the achieved share is hit rate / oracle rate.
- Per-worker request counts come from the router's `x-sglang-dp-worker` header (empty without a
  router). Failures are counted by reason, with the first message of each reason.
- Machine CPU: whole-machine utilisation over the run, and its busiest 0.5 s sample; above
  90 % on average the run is marked saturated (its figures measure the machine, not the
  router). Client CPU: this process's CPU time per request sent.
- A hit rate above the oracle means the server's cache was warm before the run (say so).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from sglang_dp.bench.config import BenchConfig
from sglang_dp.bench.protocol import ReplyParser

SATURATED_PERCENT = 90.0
WARM_MARGIN = 0.01  # hit rate above oracle + this: the cache was warm


@dataclass
class RequestRecord:
    """One request sent: what, when, to whom, and what came back (times on the run's clock)."""

    script: int
    turn: int
    sent_at: float
    prompt: str  # the prompt as text (the oracle's view)
    reply: ReplyParser
    done_at: float | None = None
    worker: str | None = None
    cancelled: bool = False  # still running at --max-duration
    prompt_len: int = 0  # our own token counts, when the server reports none
    answer_len: int = 0

    @property
    def ok(self) -> bool:
        return not self.cancelled and self.reply.done and self.reply.error is None

    @property
    def failed(self) -> bool:
        return not self.cancelled and self.reply.error is not None


@dataclass(frozen=True)
class Latency:
    """Milliseconds: mean and percentiles."""

    mean: float
    p50: float
    p90: float
    p99: float


@dataclass(frozen=True)
class CpuUsage:
    """Machine utilisation over the run and its busiest sample (percent of all cores), and this
    process's CPU seconds."""

    mean_percent: float | None = None
    max_percent: float | None = None
    client_seconds: float = 0.0


@dataclass(frozen=True)
class Figures:
    """Every figure of one run (see the module docstring)."""

    planned: int  # requests the workload holds (up to --num-requests)
    sent: int
    completed: int
    failed: int
    cancelled: int  # in flight when --max-duration ran out
    not_sent: int  # planned but never sent: time limit, or turns after a failed turn
    duration_s: float
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    hit_rate: float | None
    oracle_hit_rate: float
    oracle_share: float | None
    ttft_ms: Latency | None
    e2e_ms: Latency | None
    itl_ms: Latency | None
    cpu_mean_percent: float | None
    cpu_max_percent: float | None
    cpu_saturated: bool
    client_cpu_ms_per_request: float | None
    failures: dict[str, int] = field(default_factory=dict)
    failure_examples: dict[str, str] = field(default_factory=dict)
    per_worker: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchResult:
    """A finished run: its configuration, the URL it loaded, the figures and the raw records."""

    config: BenchConfig
    url: str
    figures: Figures
    records: tuple[RequestRecord, ...] = ()
    notes: tuple[str, ...] = ()  # what the runner wants the reader to know (a failed flush...)


# ------------------------------------------------------------------- figures


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted `values`, interpolating between ranks."""
    if not values:
        return math.nan
    rank = (len(values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def latency(seconds: Sequence[float]) -> Latency | None:
    """Mean and percentiles in ms, or None for no values."""
    if not seconds:
        return None
    ms = sorted(s * 1000 for s in seconds)
    return Latency(sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99))


def _gaps(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def compute_figures(
    records: Sequence[RequestRecord],
    *,
    planned: int,
    duration_s: float,
    oracle_hits: int,
    oracle_tokens: int,
    cpu: CpuUsage = CpuUsage(),
) -> Figures:
    """The figures of a run from its records (see the module docstring)."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if r.failed]
    prompt = sum(_or(r.reply.prompt_tokens, r.prompt_len) for r in done)
    output = sum(_or(r.reply.completion_tokens, r.answer_len) for r in done)
    reported = [r for r in done if r.reply.cached_tokens is not None]
    cached = sum(r.reply.cached_tokens or 0 for r in reported)
    reported_prompt = sum(_or(r.reply.prompt_tokens, r.prompt_len) for r in reported)
    hit_rate = cached / reported_prompt if reported_prompt else None
    oracle = oracle_hits / oracle_tokens if oracle_tokens else 0.0
    per_second = 1 / duration_s if duration_s > 0 else 0.0
    return Figures(
        planned=planned,
        sent=len(records),
        completed=len(done),
        failed=len(failed),
        cancelled=sum(r.cancelled for r in records),
        not_sent=max(0, planned - len(records)),
        duration_s=duration_s,
        request_throughput=len(done) * per_second,
        input_throughput=prompt * per_second,
        output_throughput=output * per_second,
        total_throughput=(prompt + output) * per_second,
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=output,
        hit_rate=hit_rate,
        oracle_hit_rate=oracle,
        oracle_share=hit_rate / oracle if hit_rate is not None and oracle > 0 else None,
        ttft_ms=latency([r.reply.text_times[0] - r.sent_at for r in done if r.reply.text_times]),
        e2e_ms=latency([r.done_at - r.sent_at for r in done if r.done_at is not None]),
        itl_ms=latency([gap for r in done for gap in _gaps(r.reply.text_times)]),
        cpu_mean_percent=cpu.mean_percent,
        cpu_max_percent=cpu.max_percent,
        cpu_saturated=cpu.mean_percent is not None and cpu.mean_percent > SATURATED_PERCENT,
        client_cpu_ms_per_request=cpu.client_seconds * 1000 / len(records) if records else None,
        failures=dict(Counter(r.reply.error or "" for r in failed).most_common()),
        failure_examples=_examples(failed),
        per_worker=dict(sorted(Counter(r.worker for r in done if r.worker).items())),
    )


def _or(value: int | None, fallback: int) -> int:
    return fallback if value is None else value


def _examples(failed: Sequence[RequestRecord]) -> dict[str, str]:
    examples: dict[str, str] = {}
    for r in failed:
        examples.setdefault(r.reply.error or "", r.reply.detail)
    return examples


# ------------------------------------------------------------------- output


def result_json(result: BenchResult) -> dict[str, Any]:
    """Every figure and the full configuration, JSON-ready (NaN and inf become null)."""
    figures = dataclasses.asdict(result.figures)
    out: dict[str, Any] = _finite(
        {
            "url": result.url,
            **figures,
            "notes": list(result.notes),
            "config": dataclasses.asdict(result.config),
        }
    )
    return out


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate * 100:.1f} %"


def _latency_row(table: Table, name: str, value: Latency | None, why: str = "") -> None:
    if value is None:
        table.add_row(name, f"n/a{why}")
        return
    table.add_row(
        name,
        f"{value.p50:,.1f} / {value.p90:,.1f} / {value.p99:,.1f} ms  (mean {value.mean:,.1f})",
    )


def render_result(result: BenchResult) -> RenderableType:
    """The result table, the per-worker table (behind a router) and any warnings."""
    f, c = result.figures, result.config
    table = Table(title=f"sglang-dp bench · {c.workload} · {result.url}", show_header=False)
    table.add_column("figure", style="bold")
    table.add_column("value", justify="left")
    table.add_row("Completed", f"{f.completed:,} of {f.planned:,} planned")
    failed = ", ".join(f"{reason}: {n}" for reason, n in f.failures.items())
    table.add_row("Failed", f"{f.failed:,}" + (f"  ({failed})" if failed else ""))
    if f.cancelled or f.not_sent:
        table.add_row("Cancelled / not sent", f"{f.cancelled:,} / {f.not_sent:,}")
    table.add_row("Duration", f"{f.duration_s:,.2f} s")
    table.add_row("Requests/s", f"{f.request_throughput:,.2f}")
    table.add_row("Input tokens/s", f"{f.input_throughput:,.0f}")
    table.add_row("Output tokens/s", f"{f.output_throughput:,.0f}")
    table.add_row("Total tokens/s", f"{f.total_throughput:,.0f}")
    why = "" if c.stream else " (streaming off)"
    _latency_row(table, "TTFT p50/p90/p99", f.ttft_ms, why)
    _latency_row(table, "End-to-end p50/p90/p99", f.e2e_ms)
    _latency_row(table, "Inter-token p50/p90/p99", f.itl_ms, why)
    table.add_row("Cache hit rate", _hit_text(f))
    table.add_row(
        "Oracle hit rate",
        f"{_pct(f.oracle_hit_rate)}  (achieved {_pct(f.oracle_share)} of it)",
    )
    table.add_row("Machine CPU", _cpu_text(f))
    table.add_row("Client CPU", _client_text(f))
    parts: list[RenderableType] = [table]
    if f.per_worker:
        parts.append(_worker_table(f.per_worker, f.completed))
    parts += _warnings(f)
    parts += [Text(f"note: {note}", style="yellow") for note in result.notes]
    return Group(*parts)


def _hit_text(f: Figures) -> str:
    if f.hit_rate is None:
        return "not reported (OpenAI routes report it with --enable-cache-report)"
    return f"{_pct(f.hit_rate)}  ({f.cached_tokens:,} of {f.prompt_tokens:,} prompt tokens)"


def _cpu_text(f: Figures) -> str:
    if f.cpu_mean_percent is None:
        return "not measured"
    text = f"{f.cpu_mean_percent:.0f} % of all cores"
    if f.cpu_max_percent is not None:
        text += f" (busiest 0.5 s: {f.cpu_max_percent:.0f} %)"
    return text


def _client_text(f: Figures) -> str:
    if f.client_cpu_ms_per_request is None:
        return "n/a"
    return f"{f.client_cpu_ms_per_request:.2f} ms CPU per request"


def _worker_table(per_worker: dict[str, int], completed: int) -> Table:
    table = Table(title="Requests per worker (x-sglang-dp-worker)")
    table.add_column("worker")
    table.add_column("requests", justify="right")
    table.add_column("share", justify="right")
    for url, n in per_worker.items():
        table.add_row(url, f"{n:,}", f"{n / completed * 100:.1f} %" if completed else "")
    return table


def _warnings(f: Figures) -> list[RenderableType]:
    out: list[RenderableType] = []
    if f.cpu_saturated:
        out.append(
            Text(
                f"warning: the machine's CPUs were {f.cpu_mean_percent:.0f} % busy on average: "
                "figures measure the machine, not the router",
                style="bold yellow",
            )
        )
    if f.hit_rate is not None and f.hit_rate > f.oracle_hit_rate + WARM_MARGIN:
        out.append(
            Text(
                "note: the hit rate is above the oracle's: the server's cache held some of these "
                "prompts before the run (--flush-cache starts cold)",
                style="yellow",
            )
        )
    for reason, example in f.failure_examples.items():
        if example:
            out.append(Text(f"{reason}: {example}", style="red"))
    return out
