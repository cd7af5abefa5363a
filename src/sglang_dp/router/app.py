"""The router's Starlette application: everything but the inference data path.

Routes (admin ones need `--admin-api-key`, default `--api-key`, when one is set):
  GET  /health                 the router is alive
  GET  /readiness              {"healthy_workers": N}; 503 when N == 0
  GET  /v1/models, /get_model_info, /get_server_info (and /model_info, /server_info)
                               asked of a healthy worker (inference key)
  GET  /metrics                Prometheus
  POST /flush_cache (GET too)  fan out to every worker; those that accept lose their tree share
  GET  /workers                workers with health and statistics       [admin]
  POST /workers {"url"}        add a worker (it takes requests once healthy)   [admin]
  DELETE /workers?url=U        remove a worker                          [admin]
  POST /add_worker?url=U, POST /remove_worker?url=U, GET /list_workers  sgl-router's names [admin]
  GET  /debug/tree?depth&top&worker  the tree, largest branches first     [admin]
  POST /debug/route            the decision for a request body, with no side effects [admin]
  GET  /debug/stats            the engine snapshot (+ "discovery": pods, state)   [admin]
With --service-discovery a discovered worker's record in /workers has its "pod".

`create_app(state)` routes to the bound methods of one `Routes(state)`; sgl-router's names
share `/workers`' code. `RouterState` is built whole by the router server; worker additions
and removals (`add_worker`, `remove_worker`) go through its event log.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sglang_dp.eventlog import EventLog
from sglang_dp.httpserver import error_body
from sglang_dp.router.admission import Admission
from sglang_dp.router.auth import bearer_header, bearer_matches
from sglang_dp.router.breaker import Breakers
from sglang_dp.router.config import RouterConfig, check_worker_url
from sglang_dp.router.engine import NoWorkerAvailable, RoutingEngine, WorkerStats
from sglang_dp.router.health import WorkerMonitor
from sglang_dp.router.keys import Encoder, InvalidRequest, route_request
from sglang_dp.router.metrics import RouterMetrics
from sglang_dp.router.stats import stats_payload, worker_stats_dict
from sglang_dp.router.tree import Branch, preview

if TYPE_CHECKING:
    import aiohttp

    from sglang_dp.router.kv_view import KvView

Endpoint = Callable[[Request], Awaitable[Response]]
INFO_PATHS = ("/v1/models", "/get_model_info", "/model_info", "/get_server_info", "/server_info")


def json_response(data: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), status, media_type="application/json"
    )


def error(message: str, status: int, kind: str = "BadRequestError") -> Response:
    return Response(error_body(message, kind, status), status, media_type="application/json")


class PodView(Protocol):
    """What the routes show of service discovery (discovery.PodDiscovery)."""

    def pod_record(self, url: str) -> dict[str, Any] | None: ...
    def status(self) -> dict[str, Any]: ...


@dataclasses.dataclass
class RouterState:
    """What the routes work with (no globals: one per router)."""

    config: RouterConfig
    engine: RoutingEngine
    monitor: WorkerMonitor
    metrics: RouterMetrics
    clock: Callable[[], float]
    session: Callable[[], aiohttp.ClientSession]
    encode: Encoder | None = None
    # closes the pooled connections to a removed worker (the upstream pool's drop_host)
    drop_connections: Callable[[str], None] = lambda url: None
    started_at: float = 0.0
    events: EventLog = dataclasses.field(default_factory=EventLog)
    discovery: PodView | None = None
    admission: Admission[Any] | None = None
    breakers: Breakers | None = None
    kv_view: KvView | None = None


def _guard(key: str | None, endpoint: Endpoint) -> Endpoint:
    if key is None:
        return endpoint
    expected = key.encode()

    async def guarded(request: Request) -> Response:
        if not bearer_matches(request.headers.get("authorization"), expected):
            return error("missing or wrong API key", 401, "Unauthorized")
        return await endpoint(request)

    return guarded


def create_app(state: RouterState) -> Starlette:
    admin, inference = state.config.admin_key, state.config.api_key
    r = Routes(state)
    routes = [
        Route("/health", r.health),
        Route("/readiness", r.readiness),
        Route("/metrics", r.metrics),
        *(Route(path, _guard(inference, r.info)) for path in INFO_PATHS),
        Route("/flush_cache", _guard(admin, r.flush), methods=["GET", "POST"]),
        Route("/workers", _guard(admin, r.workers), methods=["GET", "POST", "DELETE"]),
        Route("/add_worker", _guard(admin, r.legacy_add), methods=["POST"]),
        Route("/remove_worker", _guard(admin, r.legacy_remove), methods=["POST"]),
        Route("/list_workers", _guard(admin, r.list_workers)),
        Route("/debug/tree", _guard(admin, r.debug_tree)),
        Route("/debug/route", _guard(admin, r.debug_route), methods=["POST"]),
        Route("/debug/stats", _guard(admin, r.debug_stats)),
    ]
    return Starlette(routes=routes)


class Routes:
    """The application's endpoints, bound to one router's state."""

    def __init__(self, state: RouterState) -> None:
        self.state = state

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readiness(self, request: Request) -> Response:
        healthy = len(self.state.engine.healthy_workers())
        return json_response({"healthy_workers": healthy}, 200 if healthy else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(self.state.metrics.render(), media_type="text/plain; version=0.0.4")

    async def info(self, request: Request) -> Response:
        """The same path asked of the first healthy worker that answers."""
        import aiohttp

        state, path = self.state, request.url.path
        for url in state.engine.healthy_workers():
            try:
                async with state.session().get(url + path, headers=self._headers) as reply:
                    body = await reply.read()
                    return Response(body, reply.status, media_type="application/json")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                continue
        return error("no healthy worker to ask", 503, "NoWorker")

    @property
    def _headers(self) -> dict[str, str]:
        return bearer_header(self.state.config.api_key)

    async def flush(self, request: Request) -> Response:
        urls = self.state.engine.workers
        results = await asyncio.gather(*(self._flush_one(url) for url in urls))
        report = dict(zip(urls, results))
        failed = {url: r for url, r in report.items() if r != "flushed"}
        return json_response({"workers": report}, 200 if not failed else 502)

    async def _flush_one(self, url: str) -> str:
        import aiohttp

        try:
            async with self.state.session().post(
                url + "/flush_cache", headers=self._headers
            ) as reply:
                text = (await reply.text()).strip()
                if reply.status == 200:
                    self.state.engine.reset_worker(url)
                    return "flushed"
                return f"refused ({reply.status}): {text[:200]}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return f"unreachable: {type(exc).__name__}"

    def _records(self, urls: list[str]) -> list[dict[str, Any]]:
        """Health and statistics of these workers, from one engine snapshot."""
        snap = {w.url: w for w in self.state.engine.snapshot(self.state.clock()).workers}
        return [self._record(url, snap.get(url)) for url in urls]

    def _record(self, url: str, stats: WorkerStats | None) -> dict[str, Any]:
        state = self.state
        health = state.monitor.workers.get(url)
        record: dict[str, Any] = {"url": url, "state": health.state if health else "unknown"}
        if health is not None and health.last_error:
            record["last_error"] = health.last_error
        if stats is not None:
            record.update(worker_stats_dict(stats))
        pod = state.discovery.pod_record(url) if state.discovery else None
        if pod is not None:
            record["pod"] = pod
        return record

    async def workers(self, request: Request) -> Response:
        if request.method == "GET":
            return json_response({"workers": self._records(self.state.engine.workers)})
        return await self._add_or_remove(request, add=request.method == "POST", legacy=False)

    async def legacy_add(self, request: Request) -> Response:
        """sgl-router's `/add_worker`: `POST /workers` answering in its own words."""
        return await self._add_or_remove(request, add=True, legacy=True)

    async def legacy_remove(self, request: Request) -> Response:
        """sgl-router's `/remove_worker`: `DELETE /workers`."""
        return await self._add_or_remove(request, add=False, legacy=True)

    async def _add_or_remove(self, request: Request, add: bool, legacy: bool) -> Response:
        try:
            url = check_worker_url(await _url_from(request))
        except ValueError as exc:
            return error(str(exc), 400)
        if add:
            add_worker(self.state, url)
            if legacy:
                return json_response({"added": url})
            return json_response(self._records([url])[0], 201)
        if url not in self.state.monitor.workers:
            return error(f"{url} is not a worker of this router", 404, "NotFound")
        remove_worker(self.state, url)
        return json_response({"removed": url})

    async def list_workers(self, request: Request) -> Response:
        return json_response({"urls": self.state.engine.workers})

    async def debug_tree(self, request: Request) -> Response:
        try:
            depth = _int_param(request, "depth", 4, 64)
            top = _int_param(request, "top", 8, 1000)
        except ValueError as exc:
            return error(str(exc), 400)
        worker = request.query_params.get("worker")
        now, tree = self.state.clock(), self.state.engine.tree
        branches = tree.branches(depth, top, worker)
        return json_response(
            {
                "now": now,
                "total_size": tree.total_size,
                "nodes": tree.node_count,
                "sizes": {url: tree.size(url) for url in self.state.engine.workers},
                "branches": [branch_dict(b, now) for b in branches],
            }
        )

    async def debug_route(self, request: Request) -> Response:
        state = self.state
        path = request.query_params.get("path", "")
        raw = await request.body()
        if not path:
            path = _guess_path(raw)
        try:
            routed = route_request(path, raw, state.encode)
            explanation = state.engine.explain(routed.key, now=state.clock())
        except InvalidRequest as exc:
            return error(str(exc), 400)
        except NoWorkerAvailable as exc:
            return error(f"no worker available: {exc}", 503, "NoWorker")
        decision = explanation.decision
        return json_response(
            {
                "path": path,
                "key_length": decision.key_length,
                "key_unit": "characters" if isinstance(routed.key, str) else "tokens",
                "decision": {
                    "worker": decision.worker,
                    "reason": decision.reason,
                    "policy": decision.policy,
                    "matched": decision.matched,
                    "match_rate": round(decision.match_rate, 4),
                    "view": explanation.views[decision.worker],
                },
                "workers": [
                    {
                        "url": url,
                        "matched": explanation.matches[url],
                        "view": explanation.views[url],
                        "load": load,
                        "pending": explanation.pending[url],
                        "estimate": estimate_dict(explanation.estimates[url]),
                    }
                    for url, load in explanation.loads.items()
                ],
                "settings": dataclasses.asdict(state.config.engine.policy),
            }
        )

    async def debug_stats(self, request: Request) -> Response:
        return json_response(router_stats(self.state))


def remove_worker(state: RouterState, url: str) -> None:
    """Out of routing and of the tree; its pooled connections are closed."""
    state.monitor.remove(url)
    state.drop_connections(url)
    if state.breakers is not None:
        state.breakers.forget(url)
    state.events.record(f"{url} removed")


def add_worker(state: RouterState, url: str) -> str:
    normal = check_worker_url(url)
    state.monitor.add(normal)
    state.events.record(f"{normal} added")
    return normal


async def _url_from(request: Request) -> str:
    url = request.query_params.get("url")
    if url is None and request.method == "POST":
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            raise ValueError("the request body is not valid JSON") from None
        url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url:
        raise ValueError("a worker 'url' is required (query ?url= or JSON {\"url\": ...})")
    return url


def branch_dict(branch: Branch, now: float) -> dict[str, Any]:
    return {
        "text": preview(branch.label, 80),
        "length": len(branch.label),
        "prefix_length": branch.prefix_length,
        "subtree_size": branch.subtree_size,
        "workers": [{"url": t, "idle_s": round(max(now - at, 0.0), 3)} for t, at in branch.tenants],
        "hidden_children": branch.hidden_children,
        "children": [branch_dict(child, now) for child in branch.children],
    }


def _int_param(request: Request, name: str, default: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 0 < int(raw) <= high:
        raise ValueError(f"'{name}' must be a whole number from 1 to {high}")
    return int(raw)


def estimate_dict(parts: tuple[float, float, float, float, float]) -> dict[str, float]:
    """A worker's estimated first token (s) with its parts, and the time to generate the answer
    there (`prices.estimate_parts`), as `/debug/route` shows them."""
    base, queue, prefill, running, decode = parts
    return {
        "ttft_s": round(base + queue + prefill + running, 6),
        "base_s": round(base, 6),
        "queue_s": round(queue, 6),
        "prefill_s": round(prefill, 6),
        "running_s": round(running, 6),
        "decode_s": round(decode, 6),
    }


def _guess_path(raw: bytes) -> str:
    """A body with messages is chat; with a prompt, completions; else /generate."""
    if b'"messages"' in raw:
        return "/v1/chat/completions"
    if b'"prompt"' in raw:
        return "/v1/completions"
    return "/generate"


def router_stats(state: RouterState) -> dict[str, Any]:
    """`/debug/stats`, and what `launch`'s dashboard draws in the same process: the engine's
    stats with service discovery's and admission control's."""
    payload = stats_payload(state)
    if state.discovery is not None:
        payload["discovery"] = state.discovery.status()
    if state.kv_view is not None and state.kv_view.mode != "approx":
        payload["kv_events"] = state.kv_view.status()
    if state.admission is not None and state.breakers is not None:
        payload["admission"] = overload_stats(
            state.admission, state.breakers, state.engine.workers, state.clock()
        )
    return payload


def overload_stats(
    admission: Admission[Any], breakers: Breakers, workers: list[str], now: float
) -> dict[str, Any]:
    """Admission control and circuit breakers, for `/debug/stats` (and so the dashboard)."""
    return {
        "in_flight": admission.in_flight,
        "cap": admission.cap,
        "waiting": admission.waiting,
        "queue_size": admission.config.queue_size,
        "refused_full": admission.refused_full,
        "refused_overloaded": admission.refused_overloaded,
        "timed_out": admission.timed_out,
        "breakers": {w: breakers.state(w, now).value for w in workers},
    }
