"""The router server: the lean HTTP front, the data path, the Starlette app, health checks.

    client ─▶ lean HTTP/1.1 server ─POST inference─▶ Proxy ─▶ UpstreamPool ─▶ worker
              (httptools)          └─anything else─▶ Starlette app (ASGI bridge)

Inference requests skip the general-purpose request machinery (measured: 3–4× the CPU of the
lean path); everything else goes to the Starlette application. `RouterServer` runs in any
asyncio loop (its own with `run_router`, or the launcher's): `start()` binds and starts health
checks, `stop(grace)` stops accepting, lets requests in flight finish for up to `grace` seconds,
then closes everything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sglang_dp.eventlog import EventLog
from sglang_dp.httpserver import (
    MAX_CONNECTIONS,
    HttpRequest,
    HttpServer,
    Responder,
    error_body,
    serve,
)
from sglang_dp.router.admission import Admission, LoadReports
from sglang_dp.router.app import RouterState, add_worker, create_app, remove_worker
from sglang_dp.router.auth import bearer_header
from sglang_dp.router.breaker import Breakers
from sglang_dp.router.config import RouterConfig
from sglang_dp.router.encoding import EncodingPool, default_threads
from sglang_dp.router.engine import RoutingEngine
from sglang_dp.router.health import WorkerMonitor
from sglang_dp.router.keys import Encoder
from sglang_dp.router.kv_view import KvView
from sglang_dp.router.metrics import RouterMetrics
from sglang_dp.router.proxy import Proxy
from sglang_dp.router.stats import watch_imbalance
from sglang_dp.router.upstream import UpstreamPool
from sglang_dp.sglang_api import INFERENCE_PATHS
from sglang_dp.tokenizer import load_encoder

if TYPE_CHECKING:
    import aiohttp
    from starlette.applications import Starlette

    from sglang_dp.discovery.discovery import PodDiscovery

log = logging.getLogger("sglang_dp.router")

FILES_RESERVED = 64  # file descriptors kept for the router's own use (logs, health checks, ...)


class RouterServer:
    """One router: see the module docstring."""

    def __init__(
        self,
        config: RouterConfig,
        engine: RoutingEngine | None = None,
        clock: Callable[[], float] = time.monotonic,
        events: EventLog | None = None,
    ) -> None:
        self.config = config
        token_keys = config.routing_key in ("tokens", "words")
        self.engine = engine or RoutingEngine(
            dataclasses.replace(config.engine, token_keys=token_keys)
        )
        self.events = EventLog() if events is None else events  # the launcher's, if any
        self.kv_view = KvView(config.cache_view, self.engine, token_keys, clock, self.events.record)
        self.monitor = WorkerMonitor(
            self.engine,
            interval=config.health_check_interval_secs,
            timeout=config.health_check_timeout_secs,
            api_key=config.api_key,
            on_event=self.events.record,
            on_server_info=self.kv_view.server_info,
        )
        self.metrics = RouterMetrics(self.engine, clock)
        self.admission: Admission[Any] = Admission(config.admission)
        self.breakers = Breakers(config.breaker)
        self.loads = LoadReports(max_age_s=3 * config.admission.load_report_interval_secs)
        self.metrics.watch_admission(self.admission, self.breakers, clock)
        if config.cache_view != "approx":
            self.metrics.watch_kv_events(self.kv_view.status)
        self.pool = UpstreamPool()
        encode: Encoder | None = None
        if config.routing_key == "words":
            from sglang_dp.sim.tokenizer import WordEncoder

            encode = WordEncoder()
        elif config.tokenizer_path:
            encode = load_encoder(config.tokenizer_path)
        threads = config.tokenizer_threads
        threads = default_threads() if threads is None else threads
        # the word tokenizer is pure Python: a thread would hold the GIL the loop needs
        pooled = encode is not None and config.routing_key != "words" and threads > 0
        self.encoding = EncodingPool(threads) if pooled else None
        self._session: aiohttp.ClientSession | None = None
        self.state = RouterState(
            config,
            self.engine,
            self.monitor,
            self.metrics,
            clock,
            self._get_session,
            encode,
            drop_connections=self.pool.drop_host,
            started_at=clock(),
            events=self.events,
            admission=self.admission,
            breakers=self.breakers,
            kv_view=self.kv_view,
        )
        self.app: Starlette = create_app(self.state)
        self.proxy = Proxy(
            config,
            self.engine,
            self.pool,
            self.monitor,
            self.metrics,
            clock,
            encode,
            self.admission,
            self.breakers,
            self.loads,
            self.encoding,
        )
        self._server: HttpServer | None = None
        self._bridged: set[asyncio.Task[None]] = set()
        self._imbalance: asyncio.Task[None] | None = None  # events, whoever reads the stats
        self.discovery: PodDiscovery | None = None
        if config.discovery.service_discovery:
            from sglang_dp.discovery.discovery import PodDiscovery

            self.discovery = PodDiscovery(config.discovery, self.state)
            self.state.discovery = self.discovery  # the one back-reference: it needs the state
        self._load_reports: asyncio.Task[None] | None = None
        self.port = config.port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def _get_session(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.config.health_check_timeout_secs * 2)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def start(self) -> None:
        """Check the workers once (so routing starts with the healthy ones), then listen.
        With service discovery the Ready pods are listed first (DiscoveryError: not allowed)."""
        for url in self.config.worker_urls:
            add_worker(self.state, url)
        await self.monitor.start()
        await self.kv_view.start()
        if self.discovery is not None:
            try:
                await self.discovery.start()
            except BaseException:
                await self.kv_view.close()
                await self.monitor.stop()
                raise
        await self.monitor.check_now()
        self._imbalance = asyncio.get_running_loop().create_task(
            watch_imbalance(self.engine, self.events.record)
        )
        if self.config.admission.load_report_interval_secs > 0:
            self._load_reports = asyncio.get_running_loop().create_task(self._read_loads())
        files = raise_open_files_limit()
        # every client connection may need one to a worker, and the router some of its own
        connections = max(16, min(MAX_CONNECTIONS, (files - FILES_RESERVED) // 2))
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            self.config.max_payload_size,
            max_connections=connections,
        )
        self.port = self._server.port

    def add_worker(self, url: str) -> str:
        """Register a worker; it takes requests once a health check passes."""
        return add_worker(self.state, url)

    def worker_down(self, url: str, reason: str) -> None:
        """The launcher saw the worker's process die: out of routing, its cache is gone."""
        self.monitor.report_failure(url, reason, refused=True)
        self.engine.reset_worker(url)
        self.breakers.forget(url)  # its replacement starts with a closed breaker
        self.loads.forget(url)  # and without the dead process's last load report

    def remove_worker(self, url: str) -> None:
        remove_worker(self.state, url)
        self.loads.forget(url)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; let the responses in flight finish for up to `grace` s (requests
        arriving meanwhile on open connections get a 503 + close; idle connections close at
        once); close everything."""
        if self._server is not None:
            await self._server.shutdown(grace)
        if self.encoding is not None:
            await self.encoding.close()
        for task in list(self._bridged):
            task.cancel()
        for watcher in (self._imbalance, self._load_reports):
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
        if self.discovery is not None:
            await self.discovery.stop()
        await self.monitor.stop()
        await self.kv_view.close()
        await self.pool.close()
        if self._session is not None:
            await self._session.close()

    async def _read_loads(self) -> None:
        """Every interval, each healthy worker's own load report (off the request path); a
        worker without `/get_load` (404) is not asked again."""
        interval = self.config.admission.load_report_interval_secs
        headers = bearer_header(self.config.api_key)
        unsupported: set[str] = set()

        import aiohttp

        async def read(url: str) -> None:
            session = self._get_session()
            try:
                async with session.get(url + "/get_load", headers=headers) as reply:
                    if reply.status == 404:
                        unsupported.add(url)
                    if reply.status != 200:
                        return
                    ranks: list[dict[str, Any]] = await reply.json(content_type=None)
                waiting = sum(int(rank.get("num_waiting_reqs", 0)) for rank in ranks)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, TypeError):
                return  # no report this round: the old one ages out
            except AttributeError:
                return  # not SGLang's shape
            self.loads.record(url, waiting, self.state.clock())

        while True:
            urls = [u for u in self.engine.healthy_workers() if u not in unsupported]
            await asyncio.gather(*(read(url) for url in urls))
            await asyncio.sleep(interval)

    def _handle(self, request: HttpRequest, responder: Responder) -> None:
        if request.path in INFERENCE_PATHS:
            if request.method != "POST":
                message = f"{request.path} takes POST, not {request.method}"
                responder.send(405, error_body(message, "MethodNotAllowed", 405))
                return
            self.proxy.handle(request, responder)
            return
        task = asyncio.get_running_loop().create_task(call_asgi(self.app, request, responder))
        self._bridged.add(task)
        task.add_done_callback(self._bridged.discard)


async def call_asgi(app: Any, request: HttpRequest, responder: Responder) -> None:
    """Run one buffered request through an ASGI app and send its (buffered) response."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query.encode("latin-1"),
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()],
        "client": None,
        "server": None,
    }
    delivered = False
    status = 500
    head: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, head
        if message["type"] == "http.response.start":
            status, head = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except Exception:  # a bug in a route must not leave the client hanging
        log.exception("%s %s failed", request.method, request.path)
        responder.send(500, error_body("internal error in the router", "InternalError", 500))
        return
    content_type = b"application/json"
    extra = b""
    for name, value in head:
        lowered = name.lower()
        if lowered == b"content-type":
            content_type = value
        elif lowered != b"content-length":
            extra += lowered + b": " + value + b"\r\n"
    responder.send(status, b"".join(chunks), content_type, extra)


def raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one (as SGLang does): a router holds two
    sockets per request in flight. Returns the limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # pragma: no cover - a platform that refuses
            log.warning("could not raise the open files limit from %d: %s", soft, exc)
    return soft if soft != resource.RLIM_INFINITY else MAX_CONNECTIONS * 2 + FILES_RESERVED


def run_router(config: RouterConfig) -> None:
    """`sglang-dp router`: serve until SIGINT/SIGTERM, then drain and stop."""
    import uvloop

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(message)s")
    uvloop.run(_serve_forever(config))


async def _serve_forever(config: RouterConfig) -> None:
    from sglang_dp.discovery.kube import DiscoveryError

    server = RouterServer(config)
    try:
        await server.start()
    except DiscoveryError as exc:
        log.error("service discovery: %s", exc)
        raise SystemExit(2) from None
    log.info("router listening on %s (%d workers)", server.url, len(server.engine.workers))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining requests in flight")
    await server.stop(grace=10.0)
