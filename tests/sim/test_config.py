"""The command line: options generated from SimConfig, unknown SGLang flags tolerated."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from sglang_dp.sim.command import build_command
from sglang_dp.sim.config import SimConfig
from sglang_dp.sim.cost_model import PROFILES, resolve


def parse(*argv: str) -> tuple[SimConfig, list[str]]:
    got: list[tuple[SimConfig, list[str]]] = []
    command = build_command("t", lambda config, extra: got.append((config, extra)))
    result = CliRunner().invoke(command, list(argv), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return got[0]


def test_defaults_match_sglang() -> None:
    config, extra = parse()
    assert (config.host, config.port, config.schedule_policy) == ("127.0.0.1", 30000, "fcfs")
    assert extra == []


def test_sglang_flags_and_unknown_ones() -> None:
    config, extra = parse(
        "--model-path", "m", "--tp", "2", "--max-total-tokens", "5000",
        "--disable-radix-cache", "--trust-remote-code", "--watchdog-timeout", "300",
        "--schedule-policy", "lpm", "--api-key", "k",
    )  # fmt: skip
    assert config.model_path == "m" and config.tp_size == 2 and config.max_total_tokens == 5000
    assert config.disable_radix_cache and config.schedule_policy == "lpm"
    assert extra == ["--trust-remote-code", "--watchdog-timeout", "300"]


def test_every_field_has_an_option() -> None:
    command = build_command("t", lambda config, extra: None)
    names = {p.name for p in command.params}
    assert {f.name for f in dataclasses.fields(SimConfig)} <= names
    help_text = CliRunner().invoke(command, ["--help"]).output
    assert "--time-scale" in help_text and "--crash-after" in help_text


def test_profile_sizes() -> None:
    cost = resolve(SimConfig())
    assert 400_000 < cost.max_total_tokens < 500_000  # ≈ 450k tokens of KV on an H100
    assert cost.prefill_tokens_per_s == PROFILES["h100-llama3-8b"].prefill_tokens_per_s
    assert resolve(SimConfig(tp_size=2)).max_total_tokens > 2 * cost.max_total_tokens
    assert resolve(SimConfig(max_total_tokens=1234)).max_total_tokens == 1234
    assert resolve(SimConfig(decode_step_ms=2.0)).decode_step_s == 0.002


def test_prefill_terms_come_from_the_profile_unless_a_flag_sets_them() -> None:
    h200 = PROFILES["h200-llama3-8b"]
    cost = resolve(SimConfig(profile="h200-llama3-8b"))
    assert cost.prefill_floor_s == h200.prefill_floor_ms / 1e3
    assert cost.prefill_fixed_s == h200.prefill_fixed_ms / 1e3
    assert cost.prefill_per_pair_s == h200.prefill_per_pair_ns / 1e9
    assert 850_000 < cost.max_total_tokens < 950_000  # 141 GB of HBM
    config, _ = parse(
        "--profile", "h200-llama3-8b", "--prefill-floor-ms", "0", "--prefill-fixed-ms", "2",
        "--prefill-per-pair-ns", "3",
    )  # fmt: skip
    flagged = resolve(config)
    assert (flagged.prefill_floor_s, flagged.prefill_fixed_s) == (0.0, 0.002)
    assert flagged.prefill_per_pair_s == 3e-9
    # TP shares the per-token and the attention work, not the fixed part
    tp2 = resolve(SimConfig(profile="h200-llama3-8b", tp_size=2))
    assert tp2.prefill_per_pair_s == cost.prefill_per_pair_s / 1.85
    assert tp2.prefill_fixed_s == cost.prefill_fixed_s


def test_unknown_profile_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="a100-llama3-8b, h100-llama3-8b, h200-llama3-8b"):
        resolve(SimConfig(profile="tpu"))
