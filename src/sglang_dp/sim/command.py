"""The click command of the simulated worker, for `sglang-dp sim-worker` and
`python -m sglang_dp.sim` alike: options generated from `SimConfig`, SGLang flags the simulator
does not model passed on as extra arguments (never an error), then `run_worker`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from sglang_dp.clickopts import click_options
from sglang_dp.options import build
from sglang_dp.sim.config import SimConfig

Run = Callable[[SimConfig, list[str]], None]


def run_worker(config: SimConfig, extra_args: list[str]) -> None:
    """`sim.run.run_worker`, imported only when the command runs (`--help` stays instant)."""
    from sglang_dp.sim.run import run_worker

    run_worker(config, extra_args)


def build_command(name: str, run: Run = run_worker) -> click.Command:
    """The click command: parses the options into a SimConfig and calls `run(config, extra)`.

    `extra` holds the unknown arguments (SGLang flags the simulator does not model): the command
    never fails on them.
    """

    def callback(**values: Any) -> None:
        ctx = click.get_current_context()
        run(build(SimConfig, values), list(ctx.args))

    decorated: Any = click_options(SimConfig)(callback)
    command: click.Command = click.command(
        name,
        help="A CPU-only SGLang worker: SGLang's HTTP API, a RadixAttention-like cache and "
        "scheduler, a cost model of the GPU, and a time scale.",
        context_settings={
            "ignore_unknown_options": True,
            "allow_extra_args": True,
            "help_option_names": ["-h", "--help"],
            "max_content_width": 100,
        },
    )(decorated)
    return command
