"""Fault injection of the simulated worker: which generation request goes wrong, and how.

Deciding (pure, seeded, so a test run repeats): `Faults.draw()` is called once per generation
request that parsed, in arrival order. From request N+1 on, `--crash-after N` wins; otherwise
every rate that is set draws one number from `random.Random(--random-seed)`, in this order, until
one hits: `--fail-rate`, `--garble-rate`, `--close-after-head`, `--truncate-rate`,
`--reset-rate`, `--hang-rate`. No hit: None, the request runs.

Acting (`Faults.inject`, through the server's `Responder`, either HTTP server):
- crash: the process exits (status 3) at once;
- fail: a 500 with a JSON error;
- garble: a head, one SSE event, 50 ms later bytes that are no valid chunk (left open);
- close: a head, then the connection closes;
- truncate: a head whose content-length the body falls short of (half of it), then a close;
- reset: a head and half a body (one SSE event for streams), then 50 ms later a TCP reset;
- hang: never answered (the connection keeps the responder alive).

Stalls (`--stall-after-tokens`, `--stall-secs`) are not drawn here: they delay an answer that
goes on, and `server.SimWorker` applies them as it writes.

`MATRIX` names one worker per way of going wrong, as the flags that make every request do so:
the fault matrix the router's tests and `benchmarks/bench_faults.py` run against.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random

import orjson

from sglang_dp.httpserver import JSON, SSE
from sglang_dp.sglang_api import sse
from sglang_dp.sim.api import error_body
from sglang_dp.sim.config import SimConfig
from sglang_dp.sim.responder import Responder

log = logging.getLogger("sglang_dp.sim")

RATES = (  # each fault and the SimConfig field of its rate, in the order they are drawn
    ("fail", "fail_rate"),
    ("garble", "garble_rate"),
    ("close", "close_after_head"),
    ("truncate", "truncate_rate"),
    ("reset", "reset_rate"),
    ("hang", "hang_rate"),
)
DELAY_S = 0.05  # garble, reset: so that the bytes before reach the client first
CRASH_STATUS = 3


class Faults:
    """The seeded draw of one worker's faults (see the module docstring)."""

    def __init__(self, config: SimConfig) -> None:
        self.crash_after = config.crash_after
        self.rates: tuple[tuple[str, float], ...] = tuple(
            (fault, getattr(config, field)) for fault, field in RATES
        )
        self.received = 0  # generation requests drawn for
        self._rng = random.Random(config.random_seed)

    def draw(self) -> str | None:
        """The fault of the next generation request, or None."""
        self.received += 1
        if self.crash_after is not None and self.received > self.crash_after:
            return "crash"
        for fault, rate in self.rates:
            if rate and self._rng.random() < rate:
                return fault
        return None

    def inject(
        self, fault: str, responder: Responder, stream: bool, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Answer (or not) one generation request as `fault` says."""
        if fault == "crash":
            log.error("--crash-after %d: exiting", self.crash_after)
            logging.shutdown()
            os._exit(CRASH_STATUS)
        elif fault == "fail":
            responder.send(
                500, error_body("injected failure (--fail-rate)", "InternalServerError", 500)
            )
        elif fault == "garble":
            responder.start_stream()
            responder.write(sse({"text": "", "meta_info": {"garbled": True}}))
            loop.call_later(DELAY_S, responder.write_unframed, b"no chunk size\r\n")
        elif fault == "close":
            responder.start_stream()
            responder.abort_stream()
        elif fault == "truncate":
            body, kind = _answer(stream, "truncated")
            responder.send_partial(200, body, len(body) // 2, kind)
            responder.abort_stream()
        elif fault == "reset":
            body, kind = _answer(stream, "reset")
            if stream:  # one whole event, as a stream that breaks off
                responder.start_stream()
                responder.write(body)
            else:
                responder.send_partial(200, body, len(body) // 2, kind)
            loop.call_later(DELAY_S, responder.reset)
        # hang: nothing at all


def _answer(stream: bool, mark: str) -> tuple[bytes, bytes]:
    """The body (and content type) a broken answer begins: one SSE event or a JSON answer."""
    answer = {"text": "", "meta_info": {mark: True}}
    return (sse(answer), SSE) if stream else (orjson.dumps(answer), JSON)


INSTANT = ("--instant",)  # no simulated time: a fault shows at once
STALL = ("--stall-after-tokens", "2", "--stall-secs", "3")
MATRIX: dict[str, tuple[str, ...]] = {  # fault -> the worker's flags
    "fail": (*INSTANT, "--fail-rate", "1"),
    "hang": (*INSTANT, "--hang-rate", "1"),
    "garble": (*INSTANT, "--garble-rate", "1"),
    "close_after_head": (*INSTANT, "--close-after-head", "1"),
    "truncate": (*INSTANT, "--truncate-rate", "1"),
    "reset": (*INSTANT, "--reset-rate", "1"),
    "stall": (*INSTANT, *STALL),
    "stall_timed": ("--time-scale", "100", *STALL),  # the scheduler's timers run: a real stall
}
