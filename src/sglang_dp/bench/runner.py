"""The load: send a workload's scripts to a server, record every request, compute the figures.

    result = await run_bench(config, "http://127.0.0.1:30000")   # -> BenchResult
    console.print(render_result(result)); json.dumps(result_json(result))

Algorithm: one dispatcher walks the scripts in order. It waits until a script's arrival offset
(all 0, Poisson gaps, or trace timestamps), then for a free slot when `--concurrency` is set
(so closed loop = next script as soon as one ends; open loop with a cap delays arrivals), and
starts one task per script. A script's task sends its turns one after another, each with the
answers returned so far, and stops at the first failed turn (its later turns count as not sent).
`--num-requests` is a budget of requests reserved before each send; `--max-duration` (or a
`stop` event, Ctrl-C in the CLI) cancels what is still running and keeps the rest.

Each request is streamed through `protocol.ReplyParser`, stamped with the clock as bytes
arrive; the `x-sglang-dp-worker` response header names the worker behind a router. After the
load (so it costs the measured run nothing) the prompts and answers are tokenised — with the
`--tokenizer-path` tokenizer, else like the simulated worker's word tokenizer — for the oracle
hit rate and for token counts a server did not report.

Times come from `time.perf_counter` (uvloop's loop clock has millisecond resolution).
Clients: `lean` (default) is the router's own `UpstreamPool` (uvloop protocols + httptools: the
cheapest per request, which matters when the client shares two cores with eight workers and a
router); `aiohttp` (one session, connector limit = concurrency) also speaks https. Machine CPU
utilisation over the run comes from psutil's cumulative CPU times before and after, its busiest
moment from 0.5 s samples; this process's CPU time is read before and after too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import orjson

from sglang_dp.bench.config import BenchConfig
from sglang_dp.bench.protocol import PATHS, ReplyParser, request_body
from sglang_dp.bench.report import (
    BenchResult,
    CpuUsage,
    RequestRecord,
    compute_figures,
)
from sglang_dp.bench.workloads import (
    Codec,
    Script,
    build_workload,
    oracle_rate,
    planned_requests,
    prompt_text,
    word_tokens,
)

if TYPE_CHECKING:
    from rich.console import Console

WORKER_HEADER = "x-sglang-dp-worker"
CPU_SAMPLE_S = 0.5
RATE_WINDOW_S = 5.0  # the progress bar's req/s: completions over the last 5 s
Clock = Callable[[], float]


class Failure(Exception):
    """One request failed: `reason` is how it is counted, `detail` what was said."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Sink(Protocol):
    """Where a client hands a response: its head, then body bytes as they arrive."""

    def head(self, status: int, worker: str | None) -> None: ...

    def chunk(self, data: bytes) -> None: ...


class Client(Protocol):
    async def post(self, path: str, body: bytes, sink: Sink) -> None: ...

    async def get(self, path: str) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


# ------------------------------------------------------------------- clients


def _split_url(url: str) -> tuple[str, str]:
    """(scheme://host:port, path prefix) of a server URL."""
    parts = urlsplit(url.rstrip("/"))
    return f"{parts.scheme}://{parts.netloc}", parts.path


def _error_detail(body: bytes) -> str:
    return body[:300].decode(errors="replace").strip()


class LeanClient:
    """Plain-http client on the router's `UpstreamPool` (see the module docstring)."""

    def __init__(self, url: str, headers: list[tuple[bytes, bytes]], timeout: float) -> None:
        from sglang_dp.router.upstream import UpstreamPool

        self._origin, self._prefix = _split_url(url)
        self._headers = headers
        self._timeout = timeout
        self._pool = UpstreamPool(max_idle_per_host=4096)

    async def post(self, path: str, body: bytes, sink: Sink) -> None:
        from sglang_dp.router import upstream

        try:
            resp = await self._pool.request(
                self._origin,
                "POST",
                self._prefix + path,
                self._headers,
                body,
                timeout=self._timeout,
            )
            worker = resp.header(WORKER_HEADER.encode())
            sink.head(resp.status, worker.decode() if worker else None)
            if resp.status != 200:
                raise Failure(f"http {resp.status}", _error_detail(await resp.read()))
            async for data in resp:
                sink.chunk(data)
        except upstream.ConnectTimeout as exc:
            raise Failure("connect timeout", str(exc)) from None
        except upstream.ConnectError as exc:
            raise Failure("connect error", str(exc)) from None
        except upstream.UpstreamTimeout as exc:
            raise Failure("timeout", str(exc)) from None
        except upstream.UpstreamClosed as exc:
            raise Failure("disconnected", str(exc)) from None
        except upstream.UpstreamError as exc:
            raise Failure("protocol error", str(exc)) from None

    async def get(self, path: str) -> tuple[int, bytes]:
        from sglang_dp.router.upstream import UpstreamError

        try:
            resp = await self._pool.request(
                self._origin, "GET", self._prefix + path, self._headers, b"", timeout=10.0
            )
            return resp.status, await resp.read()
        except UpstreamError as exc:
            raise Failure("connect error", str(exc)) from None

    async def close(self) -> None:
        await self._pool.close()


class AiohttpClient:
    """aiohttp client: one session, at most `limit` connections (0: no limit)."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float, limit: int) -> None:
        import aiohttp

        self._url = url.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=timeout),
            headers=headers,
        )

    async def post(self, path: str, body: bytes, sink: Sink) -> None:
        import aiohttp

        try:
            async with self._session.post(self._url + path, data=body) as resp:
                sink.head(resp.status, resp.headers.get(WORKER_HEADER))
                if resp.status != 200:
                    raise Failure(f"http {resp.status}", _error_detail(await resp.read()))
                async for data in resp.content.iter_any():
                    sink.chunk(data)
        except aiohttp.ClientConnectorError as exc:
            raise Failure("connect error", str(exc)) from None
        except asyncio.TimeoutError:
            raise Failure("timeout", "no progress within --request-timeout") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise Failure("disconnected", str(exc)) from None
        except aiohttp.ClientError as exc:
            raise Failure("client error", str(exc) or type(exc).__name__) from None

    async def get(self, path: str) -> tuple[int, bytes]:
        import aiohttp

        try:
            async with self._session.get(self._url + path) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise Failure("connect error", str(exc) or type(exc).__name__) from None

    async def close(self) -> None:
        await self._session.close()


def make_client(config: BenchConfig, url: str) -> Client:
    """The client `config.client` names, sending the API key and JSON content type."""
    headers = {"content-type": "application/json"}
    if config.api_key:
        headers["authorization"] = f"Bearer {config.api_key}"
    if config.client == "aiohttp":
        return AiohttpClient(url, headers, config.request_timeout, config.concurrency or 0)
    encoded = [(k.encode(), v.encode()) for k, v in headers.items()]
    return LeanClient(url, encoded, config.request_timeout)


async def server_model(client: Client) -> str:
    """The first model a server lists at /v1/models, or "default"."""
    with contextlib.suppress(Failure, orjson.JSONDecodeError, LookupError, TypeError):
        status, body = await client.get("/v1/models")
        if status == 200:
            return str(orjson.loads(body)["data"][0]["id"])
    return "default"


async def flush_cache(client: Client) -> str:
    """Ask the server to drop its prefix cache; an empty string, or a note saying it refused."""
    try:
        status, body = await client.get("/flush_cache")
    except Failure as exc:
        return f"could not flush the cache: {exc.detail}"
    if status != 200:
        return f"the server refused to flush its cache ({status}): {_error_detail(body)}"
    return ""


# ------------------------------------------------------------------- tokenizers


class HFCodec:
    """A local Hugging Face tokenizer (transformers imported only here; nothing downloaded)."""

    def __init__(self, path: str) -> None:
        if not Path(path).is_dir():
            raise OSError(f"--tokenizer-path {path}: not a folder (a local tokenizer is needed)")
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids))


def load_codec(path: str | None) -> Codec | None:
    return HFCodec(path) if path else None


# ------------------------------------------------------------------- the load


class _Reply:
    """Sink of one request: feeds the parser with the clock's reading as bytes arrive."""

    def __init__(self, record: RequestRecord, clock: Clock, stream: bool) -> None:
        self.record = record
        self.clock = clock
        self.stream = stream
        self.body: list[bytes] = []

    def head(self, status: int, worker: str | None) -> None:
        self.record.worker = worker

    def chunk(self, data: bytes) -> None:
        if self.stream:
            self.record.reply.feed(data, self.clock())
        else:
            self.body.append(data)

    def finish(self) -> None:
        if self.stream:
            self.record.reply.finish_stream()
        else:
            self.record.reply.finish_body(b"".join(self.body))


class Load:
    """One run of the load over `scripts` (see the module docstring)."""

    def __init__(
        self,
        config: BenchConfig,
        scripts: Sequence[Script],
        client: Client,
        model: str,
        clock: Clock,
        on_done: Callable[[RequestRecord], None] = lambda record: None,
    ) -> None:
        self.config = config
        self.scripts = scripts
        self.client = client
        self.model = model
        self.clock = clock
        self.on_done = on_done
        self.records: list[RequestRecord] = []
        self.planned = planned_requests(scripts, config.num_requests)
        self._reserved = 0
        self._slots = asyncio.Semaphore(config.concurrency) if config.concurrency else None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event | None = None) -> float:
        """Send everything (or until the time limit or `stop`); return the duration in s."""
        start = self.clock()
        everything = asyncio.ensure_future(self._everything(start))
        waiters: set[asyncio.Future[Any]] = {everything}
        if stop is not None:
            waiters.add(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(
                waiters, timeout=self.config.max_duration, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        error = everything.exception() if everything.done() and not everything.cancelled() else None
        if error is not None:
            raise error  # a bug in the load itself: never hide it behind empty figures
        ends = [r.done_at for r in self.records if r.done_at is not None]
        return (max(ends) if ends else self.clock()) - start

    async def _everything(self, start: float) -> None:
        try:
            await self._dispatch(start)
            while self._tasks:
                done, _ = await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    error = None if task.cancelled() else task.exception()
                    if error is not None:
                        raise error  # a bug: stop the load and let run() raise it
        finally:  # cancelled by the time limit: cancel what still runs, and wait for it
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _reserve(self) -> bool:
        if self._reserved >= self.planned:
            return False
        self._reserved += 1
        return True

    async def _dispatch(self, start: float) -> None:
        for index, script in enumerate(self.scripts):
            delay = start + script.at - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._slots is not None:
                await self._slots.acquire()
            if not self._reserve():
                if self._slots is not None:
                    self._slots.release()
                return
            task = asyncio.create_task(self._script(index, script))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _script(self, index: int, script: Script) -> None:
        answers: list[str] = []
        try:
            for turn in range(script.requests):
                if turn and not self._reserve():
                    return
                record = await self._request(index, script, turn, answers)
                if not record.ok:
                    return  # a conversation cannot go on without its answer
                answers.append(record.reply.answer)
        finally:
            if self._slots is not None:
                self._slots.release()

    async def _request(
        self, index: int, script: Script, turn: int, answers: Sequence[str]
    ) -> RequestRecord:
        config = self.config
        body = request_body(
            config.api, script, turn, answers, stream=config.stream, model=self.model
        )
        prompt = prompt_text(script, turn, answers)
        record = RequestRecord(index, turn, self.clock(), prompt, ReplyParser(config.api))
        self.records.append(record)
        sink = _Reply(record, self.clock, config.stream)
        try:
            await self.client.post(PATHS[config.api], orjson.dumps(body), sink)
            sink.finish()
        except Failure as exc:
            record.reply.fail(exc.reason, exc.detail)
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        record.done_at = self.clock()
        self.on_done(record)
        return record


# ------------------------------------------------------------------- measuring the machine


class CpuMeter:
    """Whole-machine CPU utilisation between `start` and `stop` (from cumulative CPU times, so
    exact however short the run), its busiest sample, and this process's CPU seconds."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process()
        self._start = psutil.cpu_times()
        self._client_start = self._client_seconds()
        self._samples: list[float] = []
        psutil.cpu_percent(None)  # the first call only sets the baseline for the samples
        self._sampler = asyncio.ensure_future(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(CPU_SAMPLE_S)
            self._samples.append(self._psutil.cpu_percent(None))

    def _client_seconds(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> CpuUsage:
        self._sampler.cancel()
        end = self._psutil.cpu_times()
        total = sum(end) - sum(self._start)
        idle = _idle(end) - _idle(self._start)
        mean = 100.0 * (1 - idle / total) if total > 0 else None
        return CpuUsage(
            mean,
            max(self._samples) if self._samples else None,
            self._client_seconds() - self._client_start,
        )


def _idle(times: Any) -> float:
    return float(times.idle + getattr(times, "iowait", 0.0))


# ------------------------------------------------------------------- the whole run


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


# ------------------------------------------------------------------- the command


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
