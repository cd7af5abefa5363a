"""Cost model of the simulated GPU: how long a prefill batch or a decode step takes.

    prefill batch  = new (uncached) prompt tokens / prefill_tokens_per_s
    decode step    = decode_step_ms + decode_per_seq_ms × batch + decode_per_kv_token_ns × context

where `context` is the total KV context of the running requests (each decode step reads all of
it). A run of n decode steps with batch B starting at context c therefore lasts
n·(base + per_seq·B + per_kv·c) + per_kv·B·n(n−1)/2 (the context grows by B a step), which the
scheduler uses to jump over uneventful steps in O(1).

KV capacity comes from GPU memory: (mem_fraction × gpu_mem × tp − weights) / kv_bytes_per_token.
Profiles are estimates for the named hardware (reference/sglang-worker.md); the A100 one is
calibrated on SGLang's published shared-prefix figures (see PROFILES). Every number can be
overridden by a flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sglang_dp.sim.config import SimConfig

GIB = 1 << 30


@dataclass(frozen=True)
class Profile:
    """Hardware + model estimates behind the defaults."""

    gpu_mem_gib: float
    weights_gib: float
    kv_bytes_per_token: int
    mem_fraction_static: float
    prefill_tokens_per_s: float
    decode_step_ms: float
    decode_per_seq_ms: float
    decode_per_kv_token_ns: float  # kv_bytes_per_token / HBM bandwidth
    max_running_requests: int
    chunked_prefill_size: int
    context_length: int


PROFILES: dict[str, Profile] = {
    # H100 80 GB, Llama-3-8B bf16: 128 KiB of KV a token, ~3.35 TB/s HBM (2.5 TB/s achieved).
    "h100-llama3-8b": Profile(
        80, 16, 131072, 0.9, 30000, 6.0, 0.02, 131072 / 2.5e3, 2048, 8192, 8192
    ),
    # A100 80 GB. Two figures are fitted to the one published measurement of this kind (SGLang
    # v0.4 blog: 8×A100, Llama-3.1-8B, generated-shared-prefix 64×16 sent at once; round robin
    # 82,665 tok/s, cache-aware 158,596): an effective prefill rate of 6,400 tokens/s (~35 % of
    # peak FLOPs once chunking, attention over 2k-token prefixes and scheduling are paid) and KV
    # reads at 1.85 TB/s of the 2.0 TB/s HBM. With them,
    # `bench --compare` on 8 simulated workers gives 79,800 and 155,500 tok/s (-3 %, -2 %).
    "a100-llama3-8b": Profile(
        80, 16, 131072, 0.9, 6400, 8.0, 0.03, 131072 / 1.85e3, 2048, 8192, 8192
    ),
}


@dataclass(frozen=True)
class CostModel:
    """Resolved sizes and rates of one worker (profile defaults overridden by flags)."""

    prefill_tokens_per_s: float
    decode_step_s: float
    decode_per_seq_s: float
    decode_per_kv_token_s: float
    max_total_tokens: int
    max_running_requests: int
    chunked_prefill_size: int
    context_length: int

    def prefill_seconds(self, tokens: int) -> float:
        """Time of a prefill batch computing `tokens` new tokens."""
        return tokens / self.prefill_tokens_per_s

    def decode_first_step(self, batch: int, context: int) -> float:
        """Time of one decode step of `batch` requests holding `context` KV tokens in total."""
        return (
            self.decode_step_s
            + self.decode_per_seq_s * batch
            + self.decode_per_kv_token_s * context
        )

    def decode_run_seconds(self, batch: int, context: int, steps: int) -> float:
        """Time of `steps` consecutive decode steps (the context grows by `batch` a step)."""
        first = self.decode_first_step(batch, context)
        growth = self.decode_per_kv_token_s * batch
        return steps * first + growth * steps * (steps - 1) / 2

    def decode_steps_within(self, batch: int, context: int, seconds: float) -> int:
        """How many whole decode steps fit in `seconds` (inverse of decode_run_seconds)."""
        if seconds <= 0:
            return 0
        # a wake-up at start + decode_run_seconds(n) must see n steps despite float rounding
        seconds += 1e-9
        first = self.decode_first_step(batch, context)
        growth = self.decode_per_kv_token_s * batch
        if growth <= 0:
            steps = int(seconds / first)
        else:
            b = first - growth / 2
            steps = int((-b + math.sqrt(b * b + 2 * growth * seconds)) / growth)
        # floating point: settle on the exact boundary
        while steps > 0 and self.decode_run_seconds(batch, context, steps) > seconds:
            steps -= 1
        while self.decode_run_seconds(batch, context, steps + 1) <= seconds:
            steps += 1
        return steps


def resolve(config: SimConfig) -> CostModel:
    """The cost model and sizes of a worker: its profile, scaled by TP, overridden by flags."""
    try:
        p = PROFILES[config.profile]
    except KeyError:
        raise ValueError(
            f"unknown profile {config.profile!r}; choose one of {', '.join(sorted(PROFILES))}"
        ) from None
    tp = max(1, config.tp_size)
    mem_fraction = config.mem_fraction_static or p.mem_fraction_static
    kv_bytes = mem_fraction * p.gpu_mem_gib * tp * GIB - p.weights_gib * GIB
    kv_tokens = config.max_total_tokens or max(1024, int(kv_bytes / p.kv_bytes_per_token))
    # TP splits every layer: prefill scales with GPUs at ~85 % efficiency.
    prefill = config.prefill_tokens_per_s or p.prefill_tokens_per_s * (1 + 0.85 * (tp - 1))
    per_kv_ns = config.decode_per_kv_token_ns
    if per_kv_ns is None:
        per_kv_ns = p.decode_per_kv_token_ns / tp
    return CostModel(
        prefill_tokens_per_s=prefill,
        decode_step_s=(
            config.decode_step_ms if config.decode_step_ms is not None else p.decode_step_ms
        )
        / 1e3,
        decode_per_seq_s=(
            config.decode_per_seq_ms
            if config.decode_per_seq_ms is not None
            else p.decode_per_seq_ms
        )
        / 1e3,
        decode_per_kv_token_s=per_kv_ns / 1e9,
        max_total_tokens=kv_tokens,
        max_running_requests=config.max_running_requests or p.max_running_requests,
        chunked_prefill_size=config.chunked_prefill_size or p.chunked_prefill_size,
        context_length=config.context_length or p.context_length,
    )
