"""All options of the router server, declared once (flags are generated from these fields).

Names shared with sgl-router (`--worker-urls`, `--policy`, `--cache-threshold`,
`--balance-abs-threshold`, `--balance-rel-threshold`, `--max-tree-size`, `--api-key`,
`--max-payload-size`, `--request-timeout-secs`, `--health-check-interval-secs`, and service
discovery's `--service-discovery`, `--selector`, `--service-discovery-port`,
`--service-discovery-namespace`) mean the same; so do SMG's admission and circuit-breaker flags
(`admission.AdmissionConfig`, `breaker.BreakerConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from sglang_dp.discovery.config import DiscoveryConfig
from sglang_dp.options import LOG_LEVELS, nested, option
from sglang_dp.router.admission import AdmissionConfig
from sglang_dp.router.breaker import BreakerConfig
from sglang_dp.router.engine import EngineConfig
from sglang_dp.router.kv_view import CACHE_VIEWS


@dataclass(frozen=True)
class RouterConfig:
    worker_urls: tuple[str, ...] = option(
        (), "Worker URLs (http://host:port), space-separated or repeated.", metavar="URL"
    )
    host: str = option("127.0.0.1", "Address to listen on (loopback unless told otherwise).")
    port: int = option(30000, "Port to listen on.")
    engine: EngineConfig = nested(EngineConfig)
    discovery: DiscoveryConfig = nested(DiscoveryConfig)
    admission: AdmissionConfig = nested(AdmissionConfig)
    breaker: BreakerConfig = nested(BreakerConfig)
    routing_key: str = option(
        "chars",
        "Route on characters, on token ids (needs --tokenizer-path), or on the token ids of "
        "the simulated workers' built-in word tokenizer (words).",
        choices=("chars", "tokens", "words"),
    )
    cache_view: str = option(
        "auto",
        "What routing matches prompts against: the workers' KV events (events: exact, SGLang's "
        "--kv-events-config; needs token keys), the router's own approximate tree (approx), or "
        "events where a worker publishes them and the tree elsewhere (auto).",
        choices=CACHE_VIEWS,
    )
    tokenizer_path: str | None = option(
        None, "Local Hugging Face tokenizer folder for --routing-key tokens.", type=str
    )
    tokenizer_threads: int | None = option(
        None,
        "Threads that encode long prompts off the event loop with --tokenizer-path "
        "(default: one per CPU but the loop's, 1 to 4; 0: encode on the loop).",
        type=int,
    )
    api_key: str | None = option(
        None, "Bearer token required on inference routes; also sent to the workers.", type=str
    )
    admin_api_key: str | None = option(
        None, "Bearer token for admin and debug routes (default: --api-key).", type=str
    )
    max_payload_size: int = option(256 * 1024 * 1024, "Largest request body in bytes (413 above).")
    request_timeout_secs: float = option(
        1800.0, "Longest wait for a worker's answer to start, or between streamed chunks."
    )
    health_check_interval_secs: float = option(5.0, "Seconds between health checks.")
    health_check_timeout_secs: float = option(5.0, "A health check slower than this fails.")
    retries: int = option(
        2, "Retries on another worker when one fails before anything was sent to the client."
    )
    log_level: str = option("info", "Log level.", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        for url in self.worker_urls:
            check_worker_url(url)
        if self.routing_key == "tokens" and not self.tokenizer_path:
            raise ValueError("--routing-key tokens needs --tokenizer-path (a local folder)")
        if self.tokenizer_threads is not None and self.tokenizer_threads < 0:
            raise ValueError(f"--tokenizer-threads must be >= 0, not {self.tokenizer_threads}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be between 1 and 65535, not {self.port}")
        if self.retries < 0 or self.max_payload_size <= 0 or self.request_timeout_secs <= 0:
            raise ValueError("--retries must be >= 0; sizes and timeouts must be positive")

    @property
    def admin_key(self) -> str | None:
        return self.admin_api_key or self.api_key


def check_worker_url(url: str) -> str:
    """A worker URL must be http://host:port with nothing after it; returns it normalised."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"worker URL {url!r} must look like http://host:port")
    if parts.port is None:
        raise ValueError(f"worker URL {url!r} needs a port")
    return f"http://{parts.hostname}:{parts.port}"
