"""`sglang-dp router`: the cache-aware router in front of running workers."""

from __future__ import annotations

from typing import Any

import click

from sglang_dp.clickopts import click_options
from sglang_dp.options import build
from sglang_dp.router.config import RouterConfig


@click.command(
    "router",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click_options(RouterConfig)
@click.argument("more_urls", nargs=-1, metavar="[URL]...")
def command(more_urls: tuple[str, ...], **values: Any) -> None:
    """Route requests to running SGLang workers by what they probably have cached.

    Workers are given with --worker-urls (several after one flag, as sgl-router takes them),
    or found with --service-discovery --selector app=sglang (several key=value after one flag).
    """
    try:
        config = config_from(more_urls, values)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    from sglang_dp.router.server import run_router

    run_router(config)


def config_from(more_urls: tuple[str, ...], values: dict[str, Any]) -> RouterConfig:
    """The config from click's values: the positional arguments are more worker URLs, or more
    selectors when they read key=value (`--selector app=sglang component=worker`, as SMG)."""
    selectors = tuple(arg for arg in more_urls if "=" in arg and "://" not in arg)
    urls = tuple(arg for arg in more_urls if arg not in selectors)
    values["worker_urls"] = tuple(values.get("worker_urls", ())) + urls
    values["selector"] = tuple(values.get("selector", ())) + selectors
    return build(RouterConfig, values)
