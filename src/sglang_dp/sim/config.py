"""All options of the simulated worker, declared once (pure: no click; the command built from
them is `sim.command`).

`SimConfig` is one frozen dataclass. Every field carries its default and its help text; the
click options of `sglang-dp sim-worker` and `python -m sglang_dp.sim` are generated from the
fields (flag = field name with dashes), so an option is never written twice.

SGLang's own flags keep SGLang's names and defaults (`--port 30000`, `--host 127.0.0.1`,
`--schedule-policy fcfs`, ...). Options SGLang has that the simulator does not model are accepted
and ignored with one warning, so users can pass their real `sglang.launch_server` argv unchanged.
Sizes left unset (`--max-total-tokens`, `--max-running-requests`, ...) come from the cost-model
profile (`cost_model.PROFILES`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sglang_dp.options import LOG_LEVELS, option

SCHEDULE_POLICIES = ("fcfs", "lpm")
HTTP_SERVERS = ("lean", "uvicorn")
SIMULATED_MODEL = "sglang-dp/sim-llama3-8b"  # what a simulated worker serves unless told


@dataclass(frozen=True)
class SimConfig:
    """Options of one simulated worker (see the module docstring)."""

    # --- SGLang server flags that matter to the simulator
    model_path: str = option(SIMULATED_MODEL, "Model name or local folder (reported, not loaded).")
    host: str = option("127.0.0.1", "Address to bind.")
    port: int = option(30000, "HTTP port.")
    tp_size: int = option(
        1, "Tensor-parallel size: scales KV memory and prefill rate.", aliases=["--tp"]
    )
    base_gpu_id: int = option(0, "First GPU id (reported only).")
    mem_fraction_static: float | None = option(
        None, "GPU memory fraction for weights + KV; sizes the KV cache. [profile]", type=float
    )
    max_running_requests: int | None = option(
        None, "Most requests decoding at once. [profile]", type=int
    )
    max_total_tokens: int | None = option(
        None, "KV cache capacity in tokens. [from profile and --mem-fraction-static]", type=int
    )
    chunked_prefill_size: int | None = option(
        None,
        "Most prompt tokens in one prefill batch; longer prompts are chunked. [profile]",
        type=int,
    )
    context_length: int | None = option(None, "Model context length. [profile]", type=int)
    schedule_policy: str = option(
        "fcfs", "Waiting-queue order: fcfs or lpm (SGLang's other policies run as fcfs)."
    )
    disable_radix_cache: bool = option(False, "No prefix caching (every prompt is computed).")
    page_size: int = option(
        1,
        "Tokens per KV page: the radix cache holds whole pages only, and KV events carry one "
        "block per page.",
    )
    kv_events_config: str | None = option(
        None,
        'Publish KV cache events, as SGLang\'s JSON: e.g. \'{"publisher": "zmq", '
        '"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}\' (fields '
        "and defaults of SGLang's KVEventsConfig; a * host binds --host).",
        type=str,
    )
    enable_metrics: bool = option(False, "Serve Prometheus metrics at /metrics.")
    enable_cache_report: bool = option(
        False, "Report usage.prompt_tokens_details.cached_tokens on OpenAI routes."
    )
    api_key: str | None = option(
        None, "Require `Authorization: Bearer KEY` (not on /health*, /metrics).", type=str
    )
    served_model_name: str | None = option(
        None, "Model name in OpenAI responses. [model-path]", type=str
    )
    tokenizer_path: str | None = option(
        None,
        "Local Hugging Face tokenizer folder (else the model path's, if a local folder; "
        "else a built-in word-level tokenizer).",
        type=str,
    )
    nccl_port: int | None = option(None, "Accepted for compatibility (nothing is bound).", type=int)
    log_level: str = option("info", "Logging level.", choices=LOG_LEVELS)
    stream_interval: int = option(1, "Streaming: one event every N generated tokens.")
    random_seed: int = option(0, "Seed of the deterministic outputs and fault injection.")
    skip_server_warmup: bool = option(False, "Skip the warm-up request after start-up.")
    # --- cost model
    profile: str = option(
        "h100-llama3-8b",
        "Cost-model profile: h100-llama3-8b (estimates), a100-llama3-8b (fitted to SGLang's "
        "published A100 figures) or h200-llama3-8b (measured, unfused PyTorch kernels: an "
        "upper bound on SGLang's step times).",
    )
    prefill_tokens_per_s: float | None = option(
        None, "Prefill rate of the per-new-token part, tokens/s. [profile]", type=float
    )
    prefill_per_pair_ns: float | None = option(
        None,
        "Prefill attention time per (new token × token it attends to) in ns. [profile]",
        type=float,
    )
    prefill_fixed_ms: float | None = option(
        None, "Fixed time of one prefill batch in ms. [profile]", type=float
    )
    prefill_floor_ms: float | None = option(
        None, "Shortest prefill batch in ms (kernel-launch bound). [profile]", type=float
    )
    decode_step_ms: float | None = option(
        None, "Fixed time of one decode step in ms. [profile]", type=float
    )
    decode_per_seq_ms: float | None = option(
        None,
        "Extra decode-step time per running request in ms. [profile]",
        type=float,
    )
    decode_per_kv_token_ns: float | None = option(
        None,
        "Extra decode-step time per cached context token in ns (KV reads). [profile]",
        type=float,
    )
    time_scale: float = option(1.0, "Run K times faster than the modelled hardware.")
    startup_seconds: float = option(
        0.0,
        "Simulated model-loading time (modelled seconds) from process start: the simulator's "
        "own imports count towards it, as a real worker's imports do.",
    )
    # --- fault injection
    fail_rate: float = option(0.0, "Fraction of generation requests answered with HTTP 500.")
    kv_events_drop_rate: float = option(
        0.0,
        "Fraction of KV event batches not sent (as past a full ZMQ high-water mark); they keep "
        "their seq and stay in the replay buffer.",
    )
    crash_after: int | None = option(
        None,
        "Exit the process when generation request N+1 arrives.",
        type=int,
    )
    hang_rate: float = option(0.0, "Fraction of generation requests never answered.")
    garble_rate: float = option(
        0.0,
        "Fraction of generation requests answered with a head, one SSE event, then bytes that "
        "are no valid chunk (the connection is left open).",
    )
    close_after_head: float = option(
        0.0, "Fraction of generation requests answered with a head, then a closed connection."
    )
    truncate_rate: float = option(
        0.0,
        "Fraction of generation requests answered with a head whose content-length the body "
        "falls short of (half of it is sent), then a closed connection.",
    )
    reset_rate: float = option(
        0.0,
        "Fraction of generation requests answered with a head and part of a body (one SSE "
        "event for streams), then a TCP reset (SO_LINGER 0 close).",
    )
    stall_after_tokens: int | None = option(
        None,
        "Streams: after this many tokens, send nothing for --stall-secs (then go on); whole "
        "answers of more tokens come --stall-secs late.",
        type=int,
    )
    stall_secs: float = option(0.0, "Length of the stall of --stall-after-tokens, in real seconds.")
    instant: bool = option(
        False,
        "Answer at once, no cost model (router-overhead benchmarks).",
    )
    # --- serving
    http_server: str = option(
        "lean",
        "HTTP server: lean (our own, on uvloop + httptools; the cheapest) or uvicorn "
        "(uvicorn + Starlette, the stack SGLang serves with: its framing, keep-alive and "
        "disconnects).",
        choices=HTTP_SERVERS,
    )

    @property
    def model_name(self) -> str:
        """The name OpenAI routes report (SGLang: served-model-name, else model-path)."""
        return self.served_model_name or self.model_path

    def replace(self, **changes: Any) -> SimConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
