"""LIST + WATCH of pods through the Kubernetes API, with the error paths owned here.

    ┌─▶ LIST (labelSelector) ── items, resourceVersion ──▶ replace the cache
    │     └─▶ WATCH from resourceVersion (allowWatchBookmarks, timeoutSeconds ≈ 4-5 min)
    │           ADDED / MODIFIED ▶ cache[uid] = pod        BOOKMARK ▶ only the resourceVersion
    │           DELETED ▶ drop it                           stream ends / is severed ▶ WATCH again
    │           410 Gone (an ERROR event or the status) ─────────────────────────▶ LIST again
    └── any other failure (refused, 5xx, 403 later on, timeout): "stale", back off, LIST again

The client is kubernetes_asyncio (aiohttp, like the rest of the router's clients): it loads the
configuration (the pod's service account, or a kubeconfig, with whatever auth it names) and
sends the requests; the answers are read raw (`_preload_content=False`) so every status, the
410 path included, is ours, and pods stay plain dicts instead of generated model objects.
While stale nothing changes: workers stay routed as they were, and `state` says so.

The first LIST is done by `first_sync()` before the router listens: 401/403 there is a
`DiscoveryError` (the router exits with it) rather than a silently empty router. Later failures
only make the watcher stale. Backoff after a failure: a random wait between half and all of
0.2 s · 2^n (n failures in a row), capped at 30 s, reset by a success. A watch that ends having
delivered nothing waits the same backoff before the next one, so a server that accepts and
drops at once is not hammered; a line that is no watch event counts as a failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from sglang_dp.discovery.config import DiscoveryConfig, selector_query
from sglang_dp.discovery.pods import InvalidPod, Pod, parse_pod

log = logging.getLogger("sglang_dp.discovery")

WATCH_TIMEOUT_S = 240  # the server ends each watch after this (+ jitter up to a quarter)
LIST_TIMEOUT_S = 30.0
BACKOFF_INITIAL_S = 0.2
BACKOFF_CAP_S = 30.0
EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")


class DiscoveryError(Exception):
    """Discovery cannot start: no client, no configuration, or no right to list pods."""


class ApiError(Exception):
    """The API server answered with an error status (0: it could not be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}" if status else message)
        self.status = status


class Expired(ApiError):
    """410 Gone: the resourceVersion is too old to watch from; LIST again."""


class PodApi(Protocol):
    """The two requests discovery makes (KubePodApi; tests may give a fake server's URL to it)."""

    async def list(self) -> tuple[list[dict[str, Any]], str]: ...
    def watch(self, resource_version: str, timeout_s: int) -> AsyncIterator[dict[str, Any]]: ...
    async def close(self) -> None: ...


class KubePodApi:
    """PodApi over kubernetes_asyncio's client (see the module docstring)."""

    def __init__(self, api_client: Any, labels: dict[str, str], namespace: str | None) -> None:
        from kubernetes_asyncio import client

        self._client = api_client
        self._core = client.CoreV1Api(api_client)
        self._selector = selector_query(labels)
        self._namespace = namespace

    def _call(self, **kwargs: Any) -> Any:
        kwargs.update(label_selector=self._selector, _preload_content=False)
        if self._namespace:
            return self._core.list_namespaced_pod(self._namespace, **kwargs)
        return self._core.list_pod_for_all_namespaces(**kwargs)

    async def list(self) -> tuple[list[dict[str, Any]], str]:
        import aiohttp

        try:
            reply = await self._call(_request_timeout=aiohttp.ClientTimeout(total=LIST_TIMEOUT_S))
            async with reply:
                body = await reply.read()
                status = reply.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ApiError(0, f"cannot reach the API server: {type(exc).__name__} {exc}") from exc
        if status != 200:
            raise _status_error(status, body)
        data = orjson.loads(body)
        items = data.get("items") or []
        return list(items), str(data.get("metadata", {}).get("resourceVersion", ""))

    async def watch(self, resource_version: str, timeout_s: int) -> AsyncIterator[dict[str, Any]]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_s + 30)
        try:
            reply = await self._call(
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_s,
                _request_timeout=timeout,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ApiError(0, f"cannot reach the API server: {type(exc).__name__} {exc}") from exc
        async with reply:
            if reply.status != 200:
                raise _status_error(reply.status, await reply.read())
            try:
                async for line in reply.content:
                    if line.strip():
                        yield orjson.loads(line)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError):
                return  # severed: the caller watches again from where it got to

    async def close(self) -> None:
        await self._client.close()


def _status_error(status: int, body: bytes) -> ApiError:
    try:
        message = str(orjson.loads(body).get("message", ""))
    except (orjson.JSONDecodeError, AttributeError):
        message = body[:200].decode(errors="replace")
    return (Expired if status == 410 else ApiError)(status, message)


async def connect(config: DiscoveryConfig) -> KubePodApi:
    """A client from the service account (in a cluster) or a kubeconfig; DiscoveryError if none."""
    try:
        from kubernetes_asyncio import client
        from kubernetes_asyncio import config as kube_config
    except ImportError:
        raise DiscoveryError(
            "--service-discovery needs the Kubernetes client: pip install 'sglang-dp[kubernetes]'"
        ) from None
    configuration = client.Configuration()
    in_cluster = config.kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        if in_cluster:
            kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await kube_config.load_kube_config(
                config_file=config.kubeconfig, client_configuration=configuration
            )
    except (kube_config.ConfigException, OSError, ValueError, TypeError) as exc:
        if in_cluster:
            raise DiscoveryError(
                f"in a cluster, but the pod's service account did not load ({exc}); is "
                "automountServiceAccountToken off? (or give --kubeconfig)"
            ) from exc
        where = config.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise DiscoveryError(
            f"no Kubernetes configuration: not in a cluster and {where} did not load ({exc}); "
            "give --kubeconfig"
        ) from exc
    return KubePodApi(
        client.ApiClient(configuration), config.labels, config.service_discovery_namespace
    )


@dataclass
class Backoff:
    """Exponential backoff with jitter: a random wait in [c/2, c], c = min(cap, initial · 2^n)."""

    initial: float = BACKOFF_INITIAL_S
    cap: float = BACKOFF_CAP_S
    failures: int = 0

    def next(self, rng: random.Random) -> float:
        ceiling = min(self.cap, self.initial * 2 ** min(self.failures, 30))
        self.failures += 1
        return rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


class PodWatcher:
    """The pods matching the selector, kept current (see the module docstring).

    `pods` maps UID → Pod; `on_change()` is called after every change of it; `state` is
    "starting", "synced" or "stale" (with `last_error`), and `on_state(state, error)` is called
    on each change of state or of the kind of error (logged once, not per attempt).
    """

    def __init__(
        self,
        api: PodApi,
        on_change: Callable[[], None],
        on_state: Callable[[str, str], None] = lambda state, error: None,
        rng: random.Random | None = None,
    ) -> None:
        self._api = api
        self._on_change = on_change
        self._on_state = on_state
        self._rng = rng or random.Random()
        self.pods: dict[str, Pod] = {}
        self.resource_version = ""
        self.state = "starting"
        self.last_error = ""
        self.lists = 0  # LIST requests made (tests and /debug/stats)
        self.watches = 0
        self._backoff = Backoff()

    async def first_sync(self) -> None:
        """The first LIST: forbidden or unauthorised is a DiscoveryError; anything else only
        leaves the watcher stale (`run` keeps trying)."""
        try:
            await self._list()
        except ApiError as exc:
            if exc.status in (401, 403):
                raise DiscoveryError(
                    f"the API server refused to list pods ({exc}); the router's service "
                    "account needs a Role with pods: get, list, watch in the namespace it "
                    "watches (a ClusterRole for all namespaces)"
                ) from exc
            self._set_state("stale", str(exc))

    async def run(self) -> None:
        """LIST (unless `first_sync` just did) and WATCH until cancelled."""
        listed = self.state == "synced"
        while True:
            try:
                if not listed:
                    await self._list()
                listed = False  # the watch below only ends by raising: LIST again after it
                await self._watch_until_expired()
            except Expired as exc:
                log.info("pod watch expired (%s): listing again", exc)
            except ApiError as exc:
                self._set_state("stale", str(exc))
                await asyncio.sleep(self._backoff.next(self._rng))

    async def _list(self) -> None:
        self.lists += 1
        items, version = await self._api.list()
        pods: dict[str, Pod] = {}
        for item in items:
            pod = _parse(item)
            if pod is not None:
                pods[pod.uid] = pod
        self.pods, self.resource_version = pods, version
        self._backoff.reset()
        self._set_state("synced", "")
        self._on_change()

    async def _watch_until_expired(self) -> None:
        """WATCH again and again from the last resourceVersion; returns only by raising."""
        while True:
            self.watches += 1
            timeout = WATCH_TIMEOUT_S + self._rng.randrange(WATCH_TIMEOUT_S // 4 + 1)
            delivered = False
            async for event in self._api.watch(self.resource_version, timeout):
                delivered = True
                self._apply(event)
            if self.state != "synced":
                self._set_state("synced", "")  # a watch answered after a failure
            if delivered:
                self._backoff.reset()
            else:
                await asyncio.sleep(self._backoff.next(self._rng))

    def _apply(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind not in EVENT_TYPES or not isinstance(obj, dict):
            raise ApiError(0, f"not a watch event: {str(event)[:200]}")
        if kind == "ERROR":
            code = obj.get("code", 0)
            code = code if isinstance(code, int) else 0
            message = str(obj.get("message") or f"watch ERROR event: {str(obj)[:200]}")
            raise (Expired if code == 410 else ApiError)(code, message)
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)
        if kind == "BOOKMARK":
            return
        pod = _parse(obj)
        if pod is None:
            return
        if kind == "DELETED":
            self.pods.pop(pod.uid, None)
        else:
            self.pods[pod.uid] = pod
        self._on_change()

    def _set_state(self, state: str, error: str) -> None:
        changed = state != self.state or _kind(error) != _kind(self.last_error)
        self.state, self.last_error = state, error
        if changed:
            self._on_state(state, error)


def _parse(obj: Any) -> Pod | None:
    try:
        return parse_pod(obj) if isinstance(obj, dict) else None
    except InvalidPod as exc:
        log.debug("skipped: %s", exc)
        return None


def _kind(error: str) -> str:
    """What makes two errors "the same" for logging: the status or the exception's name."""
    return error.split(" ", 1)[0] if error else ""
