"""`python -m sglang_dp.sim [flags]`: the simulated worker, with sglang.launch_server's argv."""

from __future__ import annotations

from sglang_dp.sim.command import build_command


def main() -> None:
    """Entry point of `python -m sglang_dp.sim`."""
    build_command("sglang_dp.sim")(prog_name="python -m sglang_dp.sim")


if __name__ == "__main__":
    main()
