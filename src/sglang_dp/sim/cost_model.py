"""Cost model of the simulated GPU: how long a prefill batch or a decode step takes.

    prefill batch = max(floor, fixed + Σ_r new_r / prefill_tokens_per_s + per_pair × Σ_r pairs_r)
    pairs_r       = new_r × cached_r + new_r (new_r + 1) / 2
    decode step   = decode_step_ms + decode_per_seq_ms × batch + decode_per_kv_token_ns × context

A prefill batch mixing fresh prompts, chunks and extends is costed as the sum over its requests:
request r computes `new_r` tokens (its chunk) over the `cached_r` tokens already in KV before it
(a cache hit, or its own earlier chunks), and each new token attends to every token before it
(`pairs_r`, causal attention). `fixed` is paid once a batch; `floor` is the launch-bound minimum
of eager kernels (0 for SGLang-like profiles). `context` is the total KV context of the running
requests (each decode step reads all of it). A run of n decode steps with batch B starting at
context c therefore lasts n·(base + per_seq·B + per_kv·c) + per_kv·B·n(n−1)/2 (the context
grows by B a step), which the scheduler uses to jump over uneventful steps in O(1).

KV capacity comes from GPU memory: (mem_fraction × gpu_mem × tp − weights) / kv_bytes_per_token.
TP divides the per-token and per-pair prefill costs by 1 + 0.85 (tp − 1) and the KV-read cost by
tp. Profiles (PROFILES):

- `h200-llama3-8b`: measured (benchmarks/h200-llama3-8b-measured.json, fitted by
  `sim.calibration`, `python benchmarks/fit_profiles.py`), with unfused PyTorch kernels: an
  upper bound on SGLang's step times on that GPU (FlashInfer/FA3 kernels, fusions and CUDA graphs
  make SGLang faster).
- `a100-llama3-8b`: prefill rate and KV bandwidth fitted to SGLang's published A100 pair.
- `h100-llama3-8b` (default): estimates for that hardware (reference/sglang-worker.md).

The A100 and H100 profiles take the attention term of the H200 measurement scaled by peak bf16
compute (same kernel shape, different GPU). Every number can be overridden by a flag.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from sglang_dp.sim.calibration import attention_pairs
from sglang_dp.sim.config import SimConfig

GIB = 1 << 30
# Peak dense bf16 TFLOP/s: the attention term of the H200 measurement scales by these.
PEAK_BF16_TFLOPS = {"h200": 989.0, "h100": 989.0, "a100": 312.0}
# Fitted from benchmarks/h200-llama3-8b-measured.json by `python benchmarks/fit_profiles.py`
# (tests/sim/test_calibration.py checks these against the fit).
H200_PREFILL_FLOOR_MS = 10.2314
H200_PREFILL_FIXED_MS = 1.80654
H200_PREFILL_PER_TOKEN_MS = 0.0259454
H200_PREFILL_PER_PAIR_NS = 1.58550
H200_DECODE_STEP_MS = 5.73419
H200_DECODE_PER_SEQ_MS = 0.0130607
H200_DECODE_PER_KV_TOKEN_NS = 45.3828


def attention_ns_per_pair(gpu: str) -> float:
    """The H200-measured attention cost per (new token × attended token), scaled to `gpu`."""
    return H200_PREFILL_PER_PAIR_NS * PEAK_BF16_TFLOPS["h200"] / PEAK_BF16_TFLOPS[gpu]


@dataclass(frozen=True)
class Profile:
    """Hardware + model figures behind the defaults."""

    gpu_mem_gib: float
    weights_gib: float
    prefill_tokens_per_s: float  # the per-new-token part (1 / its cost)
    prefill_per_pair_ns: float  # the attention part, per (new token × attended token)
    decode_step_ms: float
    decode_per_seq_ms: float
    decode_per_kv_token_ns: float  # kv_bytes_per_token / HBM bandwidth
    prefill_fixed_ms: float = 0.0
    prefill_floor_ms: float = 0.0
    kv_bytes_per_token: int = 131072  # Llama-3-8B: 32 layers × 8 KV heads × 128 × 2 × bf16
    mem_fraction_static: float = 0.9
    max_running_requests: int = 2048
    chunked_prefill_size: int = 8192
    context_length: int = 8192


PROFILES: dict[str, Profile] = {
    # H100 80 GB, Llama-3-8B bf16: 128 KiB of KV a token, ~3.35 TB/s HBM (2.5 TB/s achieved).
    "h100-llama3-8b": Profile(
        gpu_mem_gib=80,
        weights_gib=16,
        prefill_tokens_per_s=30000,
        prefill_per_pair_ns=attention_ns_per_pair("h100"),
        decode_step_ms=6.0,
        decode_per_seq_ms=0.02,
        decode_per_kv_token_ns=131072 / 2.5e3,
    ),
    # A100 80 GB. Two figures are fitted to the one published measurement of this kind (SGLang
    # v0.4 blog: 8×A100, Llama-3.1-8B, generated-shared-prefix 64×16 sent at once; round robin
    # 82,665 tok/s, cache-aware 158,596), the attention term being the H200 one scaled by
    # compute (5.03 ns a pair): a per-new-token prefill rate of 7,000 tokens/s (~36 % of peak
    # FLOPs once chunking and scheduling are paid) and KV reads at 1.85 TB/s of the 2.0 TB/s
    # HBM. With them, `bench --compare cache_aware,round_robin --simulate --dp 8 -- --profile
    # a100-llama3-8b` gives 158,716 and 82,415 tok/s (+0.1 %, -0.3 %). (Before the attention
    # term: 6,400 tokens/s and 1.85 TB/s, 155,500 and 79,800 tok/s.)
    "a100-llama3-8b": Profile(
        gpu_mem_gib=80,
        weights_gib=16,
        prefill_tokens_per_s=7000,
        prefill_per_pair_ns=attention_ns_per_pair("a100"),
        decode_step_ms=8.0,
        decode_per_seq_ms=0.03,
        decode_per_kv_token_ns=131072 / 1.85e3,
    ),
    # H200 141 GB (139.8 GiB usable), Llama-3-8B shape, bf16, MEASURED with plain PyTorch
    # kernels (SDPA attention, unfused RMSNorm/RoPE/SiLU, eager prefill, CUDA-graph decode):
    # an upper bound on SGLang's step times on this GPU. Prefill/extend: max(10.2 ms, 1.81 ms +
    # 25.9 µs × new tokens + 1.59 ns × attention pairs), the 10.2 ms floor being the eager
    # kernel launches; decode: 5.73 ms + 0.0131 ms × batch + 45.4 ns × KV tokens.
    "h200-llama3-8b": Profile(
        gpu_mem_gib=139.8,
        weights_gib=16.06e9 / GIB,
        prefill_tokens_per_s=1e3 / H200_PREFILL_PER_TOKEN_MS,
        prefill_per_pair_ns=H200_PREFILL_PER_PAIR_NS,
        prefill_fixed_ms=H200_PREFILL_FIXED_MS,
        prefill_floor_ms=H200_PREFILL_FLOOR_MS,
        decode_step_ms=H200_DECODE_STEP_MS,
        decode_per_seq_ms=H200_DECODE_PER_SEQ_MS,
        decode_per_kv_token_ns=H200_DECODE_PER_KV_TOKEN_NS,
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
    prefill_per_pair_s: float = 0.0
    prefill_fixed_s: float = 0.0
    prefill_floor_s: float = 0.0

    def prefill_seconds(self, requests: Iterable[tuple[int, int]]) -> float:
        """Time of a prefill batch; `requests` holds (cached before, new tokens) per request."""
        tokens = 0
        pairs = 0.0
        for cached, new in requests:
            tokens += new
            pairs += attention_pairs(cached, new)
        gpu = self.prefill_fixed_s + tokens / self.prefill_tokens_per_s
        return max(self.prefill_floor_s, gpu + self.prefill_per_pair_s * pairs)

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
    tp_speedup = 1 + 0.85 * (tp - 1)
    prefill = config.prefill_tokens_per_s or p.prefill_tokens_per_s * tp_speedup
    per_pair_ns = _given(config.prefill_per_pair_ns, p.prefill_per_pair_ns / tp_speedup)
    per_kv_ns = _given(config.decode_per_kv_token_ns, p.decode_per_kv_token_ns / tp)
    return CostModel(
        prefill_tokens_per_s=prefill,
        decode_step_s=_given(config.decode_step_ms, p.decode_step_ms) / 1e3,
        decode_per_seq_s=_given(config.decode_per_seq_ms, p.decode_per_seq_ms) / 1e3,
        decode_per_kv_token_s=per_kv_ns / 1e9,
        max_total_tokens=kv_tokens,
        max_running_requests=config.max_running_requests or p.max_running_requests,
        chunked_prefill_size=config.chunked_prefill_size or p.chunked_prefill_size,
        context_length=config.context_length or p.context_length,
        prefill_per_pair_s=per_pair_ns / 1e9,
        prefill_fixed_s=_given(config.prefill_fixed_ms, p.prefill_fixed_ms) / 1e3,
        prefill_floor_s=_given(config.prefill_floor_ms, p.prefill_floor_ms) / 1e3,
    )


def _given(flag: float | None, default: float) -> float:
    """A flag's value when set (0 included), else the profile's."""
    return default if flag is None else flag
