"""`sglang-dp launch`: N workers on GPUs behind an embedded cache-aware router, with a dashboard."""

from __future__ import annotations

from typing import Any

import click

from sglang_dp.clickopts import click_options
from sglang_dp.launcher.config import EXCLUDED_FLAGS, LaunchConfig
from sglang_dp.options import build


@click.command(
    "launch",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click_options(LaunchConfig, exclude=EXCLUDED_FLAGS)
@click.argument("worker_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- WORKER FLAGS]")
def command(worker_args: tuple[str, ...], **values: Any) -> None:
    """Start N SGLang workers (one per GPU or TP group), wait until they are healthy, and
    route requests to them by what they have cached, with a live dashboard.

    Everything after `--` goes to every worker unchanged (sglang.launch_server flags).
    """
    values["worker_args"] = worker_args
    try:
        config = build(LaunchConfig, values)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    from sglang_dp.launcher.run import run_launch

    raise SystemExit(run_launch(config))
