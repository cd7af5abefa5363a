"""Encoding off the event loop: long prompts are tokenised in a small pool of threads.

With `--tokenizer-path` every key is made of token ids, and encoding an 8k-token prompt takes
milliseconds: on the loop, every other request waits behind it. Hugging Face's Rust tokenizer
releases the GIL while it encodes, so a pool thread encodes while the loop goes on serving.

What goes to the pool is pure work only, a function of its arguments (the encoder is
thread-safe): `keys.route_request` (parse the body, render the chat template, encode) for a
request body of at least `threshold` bytes, and `answers.outcome` (the key extended by the
answer) for a prompt and answer of at least `threshold` characters. Shorter ones stay on the
loop: the hop to a thread and back costs more than encoding them. Each result comes back to the
loop as an asyncio future, whose done callback — on the loop — goes on with the request
(admission, routing, `engine.observe`): the engine is never touched from a thread.

While a pool runs, the interpreter's switch interval is `SWITCH_INTERVAL_S` (1 ms; CPython's
default is 5): when a pool thread holds the GIL, the loop waits for it until it asks the
holder to give it up, after that interval (measured with `benchmarks/bench_tokenize.py`: a few
stalls of 5–9 ms per 16,000 probes at 5 ms, none over 2 ms at 1 ms, at the same requests/s).

`close()` cancels what is still pending (the callbacks run and see it cancelled: nothing waits
on a result that will not come) and lets the threads go.

Settings: `--tokenizer-threads` (default: one thread per CPU the loop leaves free, 1 to 4;
0: no pool, every prompt is encoded on the loop), `OFFLOAD_BYTES` 2048 (~500 tokens: under a
millisecond on the loop with an 8,000-token vocabulary, where an 8,000-token prompt takes
10 ms; a hop to a thread and back: 25 µs p50 measured on uvloop, 48 µs p90).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

OFFLOAD_BYTES = 2048
MAX_THREADS = 4
SWITCH_INTERVAL_S = 0.001


def default_threads() -> int:
    """One thread per CPU this process may use but the loop's, 1 to `MAX_THREADS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus - 1))


class EncodingPool:
    """Threads that run pure encoding work for the loop (see the module docstring)."""

    def __init__(self, threads: int, threshold: int = OFFLOAD_BYTES) -> None:
        if threads < 1:
            raise ValueError(f"an encoding pool needs at least one thread, not {threads}")
        self.threads = threads
        self.threshold = threshold
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="sglang-dp-encode")
        self._pending: set[asyncio.Future[Any]] = set()
        self.offloaded = 0  # calls sent to the threads so far
        self._switch_interval = sys.getswitchinterval()  # restored by `close`
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))

    def run(self, work: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`work(*args)` in a thread; its result (or exception) as a future of the running loop.
        Cancelling the future drops the result (and the work, if it has not started)."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, work, *args)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        self.offloaded += 1
        return future

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def close(self) -> None:
        """Cancel what is pending (its callbacks run now), then let the threads go."""
        pending = list(self._pending)
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        sys.setswitchinterval(self._switch_interval)
