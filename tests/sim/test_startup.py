"""Start-up timing of the simulated worker: the modelled loading time counts from process start."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sglang_dp.sim.config import SimConfig
from sglang_dp.sim.run import process_age_seconds
from sglang_dp.sim.server import SimWorker

IMPORTED_AT = time.monotonic()  # this process started before this module was imported


def test_process_age_covers_the_time_since_this_module_was_imported() -> None:
    time.sleep(max(0.0, IMPORTED_AT + 0.2 - time.monotonic()))  # let time pass, not a sync
    since_import = time.monotonic() - IMPORTED_AT
    age = process_age_seconds()
    uptime = float((Path("/proc") / "uptime").read_text().split()[0])
    assert since_import - 0.02 <= age <= uptime  # /proc counts in 10 ms ticks


def readiness_after_one_turn(startup_seconds: float, already_elapsed: float) -> bool:
    async def scenario() -> bool:
        config = SimConfig(startup_seconds=startup_seconds, skip_server_warmup=True)
        worker = SimWorker(config, asyncio.get_running_loop())
        worker.start(already_elapsed=already_elapsed)
        await asyncio.sleep(0)  # one turn of the loop: a zero delay has fired
        await asyncio.sleep(0)
        return worker.ready

    return asyncio.run(scenario())


def test_time_already_spent_starting_counts_towards_loading() -> None:
    assert readiness_after_one_turn(startup_seconds=3600, already_elapsed=3600)
    assert readiness_after_one_turn(startup_seconds=3600, already_elapsed=7200)
    assert not readiness_after_one_turn(startup_seconds=3600, already_elapsed=3599)
    assert readiness_after_one_turn(startup_seconds=0, already_elapsed=0)
