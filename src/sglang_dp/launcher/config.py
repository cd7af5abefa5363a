"""All options of `sglang-dp launch`, declared once (flags are generated from these fields).

The router's own options (`RouterConfig`: host, port, policy and its thresholds, keys, timeouts)
are nested and keep their `sglang-dp router` names; `--worker-urls` is the launcher's business and
not an option here. Everything after `--` goes to every worker unchanged (`worker_args`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sglang_dp.discovery.config import DISCOVERY_FLAGS
from sglang_dp.launcher.plan import flag_value
from sglang_dp.launcher.ray_plan import PLACEMENTS
from sglang_dp.options import nested, option
from sglang_dp.router.config import RouterConfig
from sglang_dp.sim.config import SIMULATED_MODEL

EXCLUDED_FLAGS = ("worker_urls", *DISCOVERY_FLAGS)  # launch starts its workers: none to discover
RAY_LOCAL = "local"  # --ray without an address (ray.init's own name for a new local instance)


@dataclass(frozen=True)
class LaunchConfig:
    model_path: str | None = option(
        None, "Model to serve (a Hugging Face name or a local folder).", type=str
    )
    dp: int = option(1, "Number of workers (data-parallel replicas).")
    tp: int = option(1, "GPUs per worker (tensor parallelism).")
    gpus: str | None = option(
        None,
        "GPU ids to use, e.g. 0,1,2,3 or 0-7 (default: CUDA_VISIBLE_DEVICES, else all).",
        type=str,
    )
    worker_base_port: int | None = option(
        None, "First worker HTTP port (default: router port + 1000).", type=int
    )
    log_dir: str = option("sglang-dp-logs", "Folder for worker-<i>.log and router.log.")
    startup_timeout_secs: float = option(
        3600.0, "How long a worker may take to become healthy (big models take minutes)."
    )
    allow_partial: bool = option(
        False, "Start routing with the workers that are healthy; add the rest as they come."
    )
    max_restarts: int = option(
        5,
        "Restarts in a row before a worker is given up on; it is then retried every "
        "--retry-failed-secs.",
    )
    retry_failed_secs: float = option(
        300.0, "How often a worker that exhausted --max-restarts is tried again (0 = never)."
    )
    unhealthy_restart_secs: float = option(
        60.0,
        "Restart a worker that runs but has failed its health checks for this long (a hung "
        "collective, a wedged scheduler); 0 = never.",
    )
    kill_stale: bool = option(
        False,
        "Kill processes that an earlier launch with this --log-dir left running (recorded in "
        "DIR/worker-<i>.log.pids) instead of refusing to start.",
    )
    log_max_mb: float = option(
        1024.0, "Rotate each worker's log and router.log past this size in MB (0 = never)."
    )
    log_keep: int = option(3, "Rotated logs kept per file (worker-0.log.1 … .N).")
    shutdown_grace_secs: float = option(
        10.0, "On Ctrl-C / SIGTERM, how long requests in flight may take to finish."
    )
    simulate: bool = option(
        False, "Run simulated CPU-only workers (python -m sglang_dp.sim) instead of SGLang."
    )
    kv_events: bool = option(
        True,
        "Have every worker publish its KV cache events (SGLang's --kv-events-config, on ports "
        "of its own band, with --page-size 16 unless given) so that the router routes on exact "
        "cache state; it then keys prompts on the model's tokenizer (--no-kv-events: the "
        "approximate tree on characters alone).",
    )
    dashboard: bool = option(True, "Show the live dashboard (else a status line every 5 s).")
    worker_host: str = option(
        "127.0.0.1",
        "Address the workers listen on and are reached at (a LAN address for --register-with).",
    )
    no_router: bool = option(False, "Start only the workers (with --register-with).")
    register_with: str | None = option(
        None,
        "Register the workers with the router at this URL (its /workers route, with "
        "--admin-api-key or --api-key) and deregister them on shutdown.",
        type=str,
    )
    ray: str | None = option(
        None,
        "Run every worker as a Ray actor on a Ray cluster: ADDRESS as ray.init takes it (auto: "
        "the cluster this machine belongs to); --ray alone starts a local Ray instance "
        "(loopback only while --worker-host is). Needs pip install 'sglang-dp[ray]'.",
        type=str,
        flag_value=RAY_LOCAL,
        metavar="[ADDRESS]",
    )
    placement: str = option(
        "pack",
        "With --ray: pack (as few nodes as possible), spread (over as many nodes as possible) "
        "or strict-spread (one worker per node, or fail).",
        choices=PLACEMENTS,
    )
    router: RouterConfig = nested(RouterConfig)
    worker_args: tuple[str, ...] = option((), "Flags after `--`, for every worker.", cli=False)

    def __post_init__(self) -> None:
        if self.dp < 1 or self.tp < 1:
            raise ValueError("--dp and --tp must be at least 1")
        if self.model_path is None and not self.simulate:
            raise ValueError("--model-path is required (or --simulate to run without GPUs)")
        if self.register_with and not self.no_router:
            raise ValueError("--register-with goes with --no-router (this node runs no router)")
        if self.max_restarts < 0 or self.startup_timeout_secs <= 0:
            raise ValueError("--max-restarts must be >= 0 and --startup-timeout-secs positive")
        if min(self.retry_failed_secs, self.unhealthy_restart_secs, self.log_max_mb) < 0:
            raise ValueError(
                "--retry-failed-secs, --unhealthy-restart-secs and --log-max-mb must be >= 0"
            )
        if self.log_keep < 0:
            raise ValueError("--log-keep must be >= 0")
        self._check_ray()

    @property
    def all_worker_args(self) -> tuple[str, ...]:
        """Every worker's extra flags: the cache report the router corrects from, then ours."""
        return ("--enable-cache-report", *self.worker_args)

    def _check_ray(self) -> None:
        if self.ray is None:
            if self.placement != "pack":
                raise ValueError("--placement goes with --ray")
            return
        if self.no_router:
            raise ValueError("--ray runs the router on this machine: drop --no-router")
        if self.gpus is not None:
            raise ValueError("--gpus does not go with --ray: Ray assigns each worker its GPUs")

    def router_settings(self, kv_events: bool) -> RouterConfig:
        """The embedded router's settings: with the workers' KV events (`kv_events`: the
        workers were told to publish), keys of token ids unless the user chose a key —
        the simulated workers' word tokenizer, else the workers' own tokenizer — and a worker
        that does not publish after all is reported (`--cache-view events`)."""
        router = dataclasses.replace(self.router, worker_urls=())
        if not kv_events or router.cache_view == "approx":
            return router
        if router.cache_view == "auto":
            router = dataclasses.replace(router, cache_view="events")
        if router.routing_key != "chars":
            return router
        tokenizer = router.tokenizer_path or flag_value(self.worker_args, "--tokenizer-path")
        if self.simulate and tokenizer is None:
            return dataclasses.replace(router, routing_key="words")
        return dataclasses.replace(
            router, routing_key="tokens", tokenizer_path=tokenizer or self.model
        )

    @property
    def model(self) -> str:
        return self.model_path or SIMULATED_MODEL

    @property
    def base_port(self) -> int:
        return self.worker_base_port or self.router.port + 1000

    @property
    def log_rotation_bytes(self) -> int:
        return int(self.log_max_mb * 1024 * 1024)
