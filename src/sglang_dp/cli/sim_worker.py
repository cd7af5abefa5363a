"""`sglang-dp sim-worker`: one simulated SGLang worker (options: `sglang_dp.sim.config`)."""

from __future__ import annotations

from sglang_dp.sim.config import SimConfig, build_command


def _run(config: SimConfig, extra_args: list[str]) -> None:
    from sglang_dp.sim.run import run_worker

    run_worker(config, extra_args)


command = build_command("sim-worker", _run)
