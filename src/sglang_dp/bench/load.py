"""The dispatcher: one run of a workload's scripts against a client, every request recorded.

    load = Load(config, scripts, client, model, time.perf_counter, on_done)
    duration = await load.run(stop)        # load.records: one RequestRecord per request sent

Algorithm: one dispatcher walks the scripts in order. It waits until a script's arrival offset
(all 0, Poisson gaps, or trace timestamps), then for a free slot when `--concurrency` is set
(so closed loop = next script as soon as one ends; open loop with a cap delays arrivals), and
starts one task per script. A script's task sends its turns one after another, each with the
answers returned so far, and stops at the first failed turn (its later turns count as not sent).
`--num-requests` is a budget of requests reserved before each send; `--max-duration` (or a
`stop` event, Ctrl-C in the CLI) cancels what is still running and keeps the rest.

Each request is streamed through `protocol.ReplyParser`, stamped with the clock as bytes
arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from sglang_dp.bench.clients import Client, Failure
from sglang_dp.bench.config import BenchConfig
from sglang_dp.bench.protocol import ReplyParser, request_body
from sglang_dp.bench.report import RequestRecord
from sglang_dp.bench.workloads import Script, planned_requests, prompt_text
from sglang_dp.sglang_api import API_PATHS

Clock = Callable[[], float]


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
            await self.client.post(API_PATHS[config.api], orjson.dumps(body), sink)
            sink.finish()
        except Failure as exc:
            record.reply.fail(exc.reason, exc.detail)
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        record.done_at = self.clock()
        self.on_done(record)
        return record
