"""`sglang-dp inspect-tree`: what the router believes each worker holds, and why it routes."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("inspect-tree", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", default="http://127.0.0.1:30000", show_default=True, help="Router URL.")
@click.option("--api-key", default=None, help="The router's admin API key, if it has one.")
@click.option("--depth", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option("--top", default=8, show_default=True, type=click.IntRange(1, 1000),
              help="Largest branches shown per level.")  # fmt: skip
@click.option("--worker", default=None, help="Only what this worker (URL) holds.")
@click.option("--prompt", default=None, help="Explain where this prompt would go (dry run).")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--messages-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A chat conversation (JSON list of messages) to explain.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the data as JSON.")
def command(
    url: str,
    api_key: str | None,
    depth: int,
    top: int,
    worker: str | None,
    prompt: str | None,
    prompt_file: Path | None,
    messages_file: Path | None,
    as_json: bool,
) -> None:
    """Show the router's approximate radix tree per worker, or why a prompt would go where
    it goes (a dry run: nothing in the router changes)."""
    if sum(x is not None for x in (prompt, prompt_file, messages_file)) > 1:
        raise click.UsageError("give at most one of --prompt, --prompt-file, --messages-file")
    from rich.console import Console

    from sglang_dp.inspect.run import InspectRequest, run_inspect

    request = InspectRequest(
        url.rstrip("/"), api_key, depth, top, worker, prompt, prompt_file, messages_file, as_json
    )
    raise SystemExit(run_inspect(request, Console()))
