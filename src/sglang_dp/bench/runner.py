"""The run: a workload's scripts sent to a server, then the figures.

    result = await run_bench(config, "http://127.0.0.1:30000")   # -> BenchResult
    console.print(render_result(result)); json.dumps(result_json(result))

`run_bench` builds the scripts (`workloads`), opens the client (`clients`), optionally flushes the
server's cache and asks for its model, runs the `load.Load` under a `cpu.CpuMeter` and a progress
bar, and closes the client. After the load (so it costs the measured run nothing) the prompts
and answers are tokenised — with the `--tokenizer-path` tokenizer (`codec`), else like the
simulated worker's word tokenizer — for the oracle hit rate and for token counts a server did not
report. Times come from `time.perf_counter` (uvloop's loop clock has millisecond resolution).
`run` is `sglang-dp bench`: the run, its table, `--output`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sglang_dp.bench.clients import flush_cache, make_client, server_model
from sglang_dp.bench.codec import load_codec
from sglang_dp.bench.config import BenchConfig
from sglang_dp.bench.cpu import CpuMeter
from sglang_dp.bench.load import Clock, Load
from sglang_dp.bench.report import BenchResult, CpuUsage, RequestRecord, compute_figures
from sglang_dp.bench.workloads import (
    Codec,
    build_workload,
    oracle_rate,
    planned_requests,
    word_tokens,
)

if TYPE_CHECKING:
    from rich.console import Console

RATE_WINDOW_S = 5.0  # the progress bar's req/s: completions over the last 5 s


def read_trace(path: str) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


async def run_bench(
    config: BenchConfig,
    url: str,
    *,
    console: Console | None = None,
    stop: asyncio.Event | None = None,
) -> BenchResult:
    """Run `config`'s workload against `url` and measure it.

    A progress bar is drawn on `console` when it is a terminal. `stop` ends the run early
    (what was measured is kept). Raises WorkloadError (bad trace), OSError (unreadable trace
    or tokenizer) before sending anything.
    """
    codec = load_codec(config.tokenizer_path)
    lines = (
        read_trace(config.trace_path) if config.trace_path and config.workload == "trace" else []
    )
    scripts = build_workload(config, codec, lines)
    client = make_client(config, url)
    try:
        notes = [await flush_cache(client)] if config.flush_cache else []
        model = config.model or ("" if config.api == "generate" else await server_model(client))
        # Not the loop's clock: uvloop's has millisecond resolution.
        clock = time.perf_counter
        with _progress(console, planned_requests(scripts, config.num_requests), clock) as on_done:
            load = Load(config, scripts, client, model, clock, on_done)
            meter = CpuMeter()
            try:
                duration = await load.run(stop)
            finally:
                cpu = meter.stop()
    finally:
        await client.close()
    if stop is not None and stop.is_set():
        notes.append("stopped early (interrupted): the figures cover what ran until then")
    return _result(config, url, load, duration, cpu, codec, [n for n in notes if n])


def _result(
    config: BenchConfig,
    url: str,
    load: Load,
    duration: float,
    cpu: CpuUsage,
    codec: Codec | None,
    notes: list[str],
) -> BenchResult:
    """Token counts and the oracle (after the load, so they cost it nothing), then figures."""
    tokenize: Callable[[str], Sequence[Any]] = codec.encode if codec else word_tokens
    sent = []
    for record in load.records:
        prompt, answer = tokenize(record.prompt), tokenize(record.reply.answer)
        record.prompt_len, record.answer_len = len(prompt), len(answer)
        if record.ok:  # the same requests as the measured hit rate
            sent.append((prompt, answer))
    oracle = oracle_rate(sent)
    figures = compute_figures(
        load.records,
        planned=load.planned,
        duration_s=duration,
        oracle_hits=oracle.hit_tokens,
        oracle_tokens=oracle.prompt_tokens,
        cpu=cpu,
    )
    return BenchResult(config, url, figures, tuple(load.records), tuple(notes))


@contextlib.contextmanager
def _progress(console: Console | None, total: int, clock: Clock) -> Any:
    """A rich progress bar (requests done, failures, req/s over the last 5 s) while it runs."""
    if console is None or not console.is_terminal:
        yield lambda record: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]bench"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed · {task.fields[rate]} req/s"),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=4,  # cheap: the client shares the machine with the server
        transient=True,
    )
    task = progress.add_task("requests", total=total, failed=0, rate="0.0")
    start = clock()
    recent: collections.deque[float] = collections.deque()  # completion times, last RATE_WINDOW_S
    counts = {"done": 0, "failed": 0}

    def on_done(record: RequestRecord) -> None:
        now = clock()
        counts["done"] += 1
        counts["failed"] += record.failed
        recent.append(now)
        while recent[0] < now - RATE_WINDOW_S:
            recent.popleft()
        window = min(RATE_WINDOW_S, now - start)
        rate = f"{len(recent) / window:.1f}" if window > 0 else "0.0"
        progress.update(task, completed=counts["done"], failed=counts["failed"], rate=rate)

    with progress:
        yield on_done


def run(config: BenchConfig) -> int:
    """`sglang-dp bench`: run, print the table, write --output; exit 1 if nothing completed.

    Ctrl-C ends the load early and still reports what was measured.
    """
    import json
    import signal

    import uvloop
    from rich.console import Console

    from sglang_dp.bench.report import render_result, result_json
    from sglang_dp.bench.workloads import WorkloadError

    console = Console()

    async def main() -> BenchResult:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
        return await run_bench(config, config.url, console=console, stop=stop)

    try:
        result = uvloop.run(main())
    except (WorkloadError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    console.print(render_result(result))
    if config.output:
        text = json.dumps(result_json(result), indent=2)
        Path(config.output).write_text(text + "\n", encoding="utf-8")
        console.print(f"figures written to {config.output}")
    return 0 if result.figures.completed else 1
