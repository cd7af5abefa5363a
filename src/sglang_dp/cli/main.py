"""The `sglang-dp` click group.

Subcommands are loaded lazily from their own modules (`cli/<name>.py`, each exposing `command`),
so `sglang-dp --help` imports neither the router nor the simulator and stays instant.
"""

from __future__ import annotations

import importlib

import click

from sglang_dp import __version__

# command name -> module under sglang_dp.cli that defines `command`
COMMANDS: dict[str, str] = {
    "bench": "bench",
    "inspect-tree": "inspect_tree",
    "launch": "launch",
    "router": "router",
    "sim-worker": "sim_worker",
    "top": "top",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when they are invoked or listed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module_name = COMMANDS.get(cmd_name)
        if module_name is None:
            return None
        module = importlib.import_module(f"sglang_dp.cli.{module_name}")
        command = module.command
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sglang-dp")
def main() -> None:
    """Data-parallel front end for SGLang: N workers behind one cache-aware router."""
