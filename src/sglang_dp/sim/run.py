"""Process entry of the simulated worker: logging, option checks, event loop, signals.

`run_worker(config, extra_args)` is what `sglang-dp sim-worker` and `python -m sglang_dp.sim`
call. `--http-server` picks the server: the lean `httpserver` (default) or uvicorn + Starlette
(`sim.asgi`, imported only then). It serves until SIGINT/SIGTERM (the handlers only set an
event; the main coroutine closes the listener), exits 2 on options that cannot work together
and 1 when the port is taken.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sglang_dp.httpserver import HttpServer, serve
from sglang_dp.kv_wire import KvEventsConfig
from sglang_dp.sim.config import SCHEDULE_POLICIES, SimConfig
from sglang_dp.sim.cost_model import resolve
from sglang_dp.sim.faults import RATES as FAULT_RATES
from sglang_dp.sim.server import SimWorker

if TYPE_CHECKING:
    from sglang_dp.sim.asgi import UvicornServer

log = logging.getLogger("sglang_dp.sim")


def check_config(config: SimConfig) -> str | None:
    """A message if the options cannot work together, else None."""
    if config.time_scale <= 0:
        return "--time-scale must be positive"
    if config.page_size < 1:
        return "--page-size must be at least 1"
    if config.kv_events_config:
        try:
            KvEventsConfig.parse(config.kv_events_config)
        except ValueError as exc:
            return str(exc)
    for name in (*(field for _, field in FAULT_RATES), "kv_events_drop_rate"):
        if not 0 <= getattr(config, name) <= 1:
            return f"--{name.replace('_', '-')} must be between 0 and 1"
    if config.stream_interval < 1:
        return "--stream-interval must be at least 1"
    try:
        resolve(config)
    except ValueError as exc:
        return str(exc)
    return None


def process_age_seconds() -> float:
    """Seconds since this process started (Linux /proc; 0.0 where unknown)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        # fields after the command name, which may hold spaces; starttime is field 22
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


async def _serve(config: SimConfig) -> None:
    loop = asyncio.get_running_loop()
    worker = SimWorker(config, loop)
    server: HttpServer | UvicornServer
    if config.http_server == "uvicorn":
        from sglang_dp.sim.asgi import serve_uvicorn  # uvicorn and Starlette: only for it

        server = await serve_uvicorn(worker, config.host, config.port, config.log_level)
    else:
        server = await serve(worker.handle, config.host, config.port)
    log.info(
        "simulated SGLang worker on http://%s:%d (%s, KV %d tokens, time scale %g%s, %s server)",
        config.host,
        config.port,
        config.profile,
        worker.cost.max_total_tokens,
        config.time_scale,
        ", instant" if config.instant else "",
        config.http_server,
    )
    worker.start(already_elapsed=process_age_seconds())
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    server.close()
    if not isinstance(server, HttpServer):
        await server.wait_closed()
    worker.close()


def run_worker(config: SimConfig, extra_args: list[str]) -> None:
    """Run one simulated worker until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=config.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    if extra_args:
        log.warning(
            "ignoring options the simulated worker does not model: %s", " ".join(extra_args)
        )
    problem = check_config(config)
    if problem:
        log.error("%s", problem)
        sys.exit(2)
    if config.tokenizer_path and not Path(config.tokenizer_path).is_dir():
        log.warning(
            "--tokenizer-path %s is not a local folder (nothing is downloaded): "
            "using the built-in word tokenizer",
            config.tokenizer_path,
        )
        config = config.replace(tokenizer_path=None)
    if config.schedule_policy not in SCHEDULE_POLICIES:
        log.warning("--schedule-policy %s is not modelled: using fcfs", config.schedule_policy)
        config = config.replace(schedule_policy="fcfs")
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        runner = asyncio.run
    try:
        runner(_serve(config))
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", config.host, config.port, exc)
        sys.exit(1)
