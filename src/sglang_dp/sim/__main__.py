"""`python -m sglang_dp.sim [flags]`: the simulated worker, with sglang.launch_server's argv."""

from __future__ import annotations

from sglang_dp.sim.config import SimConfig, build_command


def _run(config: SimConfig, extra_args: list[str]) -> None:
    from sglang_dp.sim.run import run_worker

    run_worker(config, extra_args)


def main() -> None:
    """Entry point of `python -m sglang_dp.sim`."""
    build_command("sglang_dp.sim", _run)(prog_name="python -m sglang_dp.sim")


if __name__ == "__main__":
    main()
