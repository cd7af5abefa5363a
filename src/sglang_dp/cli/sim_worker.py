"""`sglang-dp sim-worker`: one simulated SGLang worker (options: `sglang_dp.sim.config`)."""

from __future__ import annotations

from sglang_dp.sim.command import build_command

command = build_command("sim-worker")
