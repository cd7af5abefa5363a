"""All options of `sglang-dp bench`, declared once (flags are generated from these fields).

Workload sizes default to SGLang's own cache-routing benchmarks (see reference/sglang-worker.md):
shared-prefix is bench_serving's generated-shared-prefix (64 groups x 16 prompts, 2,048-token
system prompt, 128-token question, 256 output tokens); multi-turn is long_prompt_multi_turn
(128 conversations x 8 turns, 2,048-token system prompt, 32-token questions, 128-token answers).
Lengths are in tokens: words of a fixed vocabulary (one token each on a word-level tokenizer), or
tokens of `--tokenizer-path`.

Load shape: with neither `--request-rate` nor `--concurrency` every request is sent at once (what
bench_serving does by default); `--request-rate R` makes arrivals a Poisson process of R per
second (open loop); `--concurrency C` keeps at most C requests in flight and sends the next one as
soon as one finishes (closed loop); both together: Poisson arrivals that wait for a free slot.
Multi-turn counts a conversation as one arrival and one slot: its turns go one after another.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from sglang_dp.options import option
from sglang_dp.router.policies import POLICY_NAMES

SGLANG_ROUTER = "sglang-router:"

WORKLOADS = ("shared-prefix", "multi-turn", "random", "trace")
APIS = ("generate", "completions", "chat")
DISTRIBUTIONS = ("uniform", "zipf")
CLIENTS = ("lean", "aiohttp")

# Defaults that differ by workload (one option, two meanings; see the help texts).
SHARED_PREFIX_QUESTION_LEN = 128
MULTI_TURN_QUESTION_LEN = 32
RANDOM_NUM_REQUESTS = 1024


@dataclass(frozen=True)
class BenchConfig:
    """Options of one benchmark run (see the module docstring)."""

    url: str = option("http://127.0.0.1:30000", "Server to load: a router, or any SGLang server.")
    workload: str = option("shared-prefix", "What to send.", choices=WORKLOADS)
    api: str = option(
        "generate",
        "Route: /generate, /v1/completions or /v1/chat/completions.",
        choices=APIS,
    )
    # --- load shape and bounds
    concurrency: int | None = option(
        None,
        "Most requests in flight (closed loop; multi-turn: conversations). [unbounded]",
        type=int,
    )
    request_rate: float | None = option(
        None,
        "Poisson arrivals per second (open loop; multi-turn: conversations). [all at once]",
        type=float,
    )
    num_requests: int | None = option(
        None,
        f"Stop after sending this many requests. [the whole workload; random: "
        f"{RANDOM_NUM_REQUESTS}]",
        type=int,
    )
    max_duration: float | None = option(
        None,
        "Stop after this many seconds; requests still running are cancelled. [no limit]",
        type=float,
    )
    request_timeout: float = option(600.0, "A request with no progress for this long fails.")
    stream: bool = option(True, "Stream responses (needed for TTFT and inter-token latency).")
    seed: int = option(0, "Seed of the workload generator and the arrival process.")
    # --- shared-prefix
    num_groups: int = option(64, "shared-prefix: groups, each with its own system prompt.")
    prompts_per_group: int = option(16, "shared-prefix: questions per group (on average).")
    group_distribution: str = option(
        "uniform",
        "shared-prefix: exactly --prompts-per-group per group, or groups drawn from a Zipf law.",
        choices=DISTRIBUTIONS,
    )
    zipf_s: float = option(1.0, "shared-prefix: exponent of the Zipf law (weight of rank k: k^-s).")
    system_prompt_len: int = option(2048, "shared-prefix, multi-turn: system prompt tokens.")
    question_len: int | None = option(
        None,
        f"Question tokens. [shared-prefix {SHARED_PREFIX_QUESTION_LEN}, "
        f"multi-turn {MULTI_TURN_QUESTION_LEN}]",
        type=int,
    )
    output_len: int = option(256, "shared-prefix, random, trace (default): output tokens.")
    # --- multi-turn
    num_conversations: int = option(128, "multi-turn: conversations.")
    turns: int = option(8, "multi-turn: turns per conversation.")
    answer_len: int = option(128, "multi-turn: answer tokens per turn.")
    # --- random
    input_len: int = option(
        2176, "random: prompt tokens (default: a shared-prefix prompt's system + question)."
    )
    # --- trace
    trace_path: str | None = option(
        None,
        "trace: JSONL file, one request a line: timestamp (s), prompt or messages, max_tokens.",
        type=str,
    )
    trace_speed: float = option(1.0, "trace: replay this many times faster than recorded.")
    # --- client
    model: str | None = option(
        None, "Model name for OpenAI routes. [the server's first /v1/models entry]", type=str
    )
    api_key: str | None = option(None, "Bearer token to send.", type=str)
    tokenizer_path: str | None = option(
        None,
        "Local Hugging Face tokenizer folder: lengths in its tokens. [words, ~1 token each]",
        type=str,
    )
    client: str = option(
        "lean",
        "HTTP client: the router's lean one (cheapest; plain http) or aiohttp (https too).",
        choices=CLIENTS,
    )
    flush_cache: bool = option(
        False, "Flush the server's prefix cache (GET /flush_cache) before the run: a cold start."
    )
    output: str | None = option(
        None, "Write every figure and this configuration as JSON to this file.", type=str
    )

    def __post_init__(self) -> None:
        positive = {
            "--num-groups": self.num_groups,
            "--prompts-per-group": self.prompts_per_group,
            "--num-conversations": self.num_conversations,
            "--turns": self.turns,
            "--question-len": self.question_tokens,
            "--output-len": self.output_len,
            "--answer-len": self.answer_len,
            "--input-len": self.input_len,
            "--concurrency": 1 if self.concurrency is None else self.concurrency,
            "--num-requests": 1 if self.num_requests is None else self.num_requests,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be at least 1")
        if self.system_prompt_len < 0:
            raise ValueError("--system-prompt-len must be at least 0")
        rates = {
            "--request-rate": self.request_rate,
            "--max-duration": self.max_duration,
            "--request-timeout": self.request_timeout,
            "--trace-speed": self.trace_speed,
            "--zipf-s": self.zipf_s,
        }
        for flag, rate in rates.items():
            if rate is not None and (math.isnan(rate) or rate <= 0):
                raise ValueError(f"{flag} must be positive")
        if self.workload == "trace" and not self.trace_path:
            raise ValueError("--workload trace needs --trace-path FILE")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--url {self.url!r} must start with http:// or https://")
        if self.url.startswith("https://") and self.client == "lean":
            raise ValueError("the lean client speaks plain http: add --client aiohttp for https")

    @property
    def question_tokens(self) -> int:
        """--question-len, or the workload's default."""
        if self.question_len is not None:
            return self.question_len
        if self.workload == "multi-turn":
            return MULTI_TURN_QUESTION_LEN
        return SHARED_PREFIX_QUESTION_LEN


@dataclass(frozen=True)
class CompareConfig:
    """Options of `bench --compare` (the load itself is the BenchConfig)."""

    compare: str | None = option(
        None,
        "Compare policies, e.g. cache_aware,variance,round_robin (ratios against the last); "
        "sglang-router:cache_aware for sgl-router.",
        type=str,
    )
    simulate: bool = option(False, "With --compare: run each policy on a fresh simulated cluster.")
    dp: int = option(8, "With --compare: workers in each cluster.")
    plot: str | None = option(None, "With --compare: draw the comparison to this PNG.", type=str)
    worker_args: tuple[str, ...] = option((), "Flags after `--`, for every worker.", cli=False)

    def entries(self) -> list[str]:
        """The policies to compare, validated."""
        names = [name.strip() for name in (self.compare or "").split(",") if name.strip()]
        if len(names) < 1:
            raise ValueError("--compare needs at least one policy")
        for name in names:
            policy = name.removeprefix(SGLANG_ROUTER)
            if name.startswith(SGLANG_ROUTER):
                if importlib.util.find_spec("sglang_router") is None:
                    raise ValueError(f"{name}: the sglang_router package is not installed")
            elif policy not in POLICY_NAMES:
                raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
        if not self.simulate:
            raise ValueError("--compare starts its own clusters: add --simulate (no GPUs needed)")
        return names
