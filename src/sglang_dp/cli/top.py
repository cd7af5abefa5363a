"""`sglang-dp top`: the live dashboard of any running router (local or remote)."""

from __future__ import annotations

import click


@click.command("top", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", default="http://127.0.0.1:30000", show_default=True, help="Router URL.")
@click.option("--api-key", default=None, help="The router's admin API key, if it has one.")
@click.option("--plain", is_flag=True, help="Status lines instead of the live dashboard.")
def command(url: str, api_key: str | None, plain: bool) -> None:
    """Watch a router: queue depth, routing and cache hit rate per worker."""
    from sglang_dp.dashboard.top import run_top

    raise SystemExit(run_top(url.rstrip("/"), api_key, plain))
