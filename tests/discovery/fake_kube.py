"""A fake Kubernetes API server for pods, speaking the real protocol (test and benchmark helper).

No API server can run here, so this one answers what a router's pod discovery asks, the way
kube-apiserver does:

- `GET /api/v1/pods` and `/api/v1/namespaces/{ns}/pods` with `labelSelector` (k=v,k=v): a
  PodList whose `metadata.resourceVersion` is the store's;
- the same with `watch=1&resourceVersion=RV`: a chunked stream of one JSON event per line
  (ADDED / MODIFIED / DELETED after RV, then live ones; BOOKMARK every `bookmark_s` when
  `allowWatchBookmarks`; the stream ends after `timeoutSeconds`). A watch from a compacted RV
  gets HTTP 200 and an ERROR event with a 410 Status, as kube-apiserver answers;
- `forbidden = True`: every request gets 403 with a Status body, as wrong RBAC does.

Controls for tests (thread-safe: the server runs on its own loop in a thread): `add_pod`,
`set_ready`, `terminate` (deletionTimestamp), `delete`, `replace` (same name and IP, new UID),
`expire` (compact history; open watches get ERROR 410), `sever` (open watches are cut
mid-stream), `restart(down_s)` (stop listening, drop every connection, come back on the same
port with the same store, as an API server restarting over etcd). `requests` counts what came.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")
EXPIRE = "expire"
SEVER = "sever"


@dataclass(eq=False)
class _Watch:
    namespace: str | None
    labels: dict[str, str]
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


class FakeKube:
    """See the module docstring. Use as a context manager: `with FakeKube() as kube: ...`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, bookmark_s: float = 0.5) -> None:
        self.host, self.port = host, port
        self.bookmark_s = bookmark_s
        self.forbidden = False
        self.requests: Counter[str] = Counter()  # "list", "watch", "forbidden"
        self._pods: dict[str, dict[str, Any]] = {}  # "ns/name" → pod object
        self._rv = 100
        self._history: list[tuple[int, str, dict[str, Any]]] = []
        self._compacted = 0
        self._watches: set[_Watch] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> FakeKube:
        self._thread.start()
        self._call(self._up)
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._down)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def kubeconfig(self, path: str) -> str:
        """Write a kubeconfig pointing at this server (a bearer token, no TLS); returns path."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "router", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "router"}}],
            "current-context": "fake",
        }
        with open(path, "w") as out:
            json.dump(config, out)  # JSON is YAML
        return path

    def restart(self, down_s: float = 0.0) -> None:
        """Stop listening (every connection dropped), wait `down_s`, listen again."""
        self._call(self._down)
        time.sleep(down_s)  # the outage itself, not a synchronisation
        self._call(self._up)

    # --- the store -------------------------------------------------------------------------
    def add_pod(
        self,
        name: str,
        ip: str,
        labels: dict[str, str],
        namespace: str = "default",
        ready: bool = True,
    ) -> str:
        """A pod (Running, Ready or not) on `ip`; returns its UID."""
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "labels": dict(labels),
            },
            "spec": {"containers": [{"name": "sglang", "image": "lmsysorg/sglang"}]},
            "status": {"phase": "Running", "podIP": ip, "conditions": _conditions(ready)},
        }
        self._call(lambda: self._commit("ADDED", pod))
        return str(pod["metadata"]["uid"])

    def set_ready(self, name: str, ready: bool, namespace: str = "default") -> None:
        def change(pod: dict[str, Any]) -> None:
            pod["status"]["conditions"] = _conditions(ready)

        self._modify(namespace, name, change)

    def terminate(self, name: str, namespace: str = "default") -> None:
        """Graceful deletion begins: deletionTimestamp set, the pod still exists."""

        def change(pod: dict[str, Any]) -> None:
            pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
            pod["status"]["conditions"] = _conditions(False)

        self._modify(namespace, name, change)

    def delete(self, name: str, namespace: str = "default") -> None:
        def remove() -> None:
            pod = self._pods.pop(f"{namespace}/{name}")
            self._commit("DELETED", pod, store=False)

        self._call(remove)

    def replace(self, name: str, namespace: str = "default") -> str:
        """The pod is deleted and a new one (new UID) comes Ready on the same IP at once."""
        old = self._call(lambda: copy.deepcopy(self._pods[f"{namespace}/{name}"]))
        self.delete(name, namespace)
        meta = old["metadata"]
        return self.add_pod(name, old["status"]["podIP"], meta["labels"], namespace)

    def pods(self) -> list[dict[str, Any]]:
        return self._call(lambda: copy.deepcopy(list(self._pods.values())))

    def expire(self) -> None:
        """History compacted: open watches get ERROR 410; watching from before now is 410."""

        def compact() -> None:
            self._compacted = self._rv
            self._history.clear()
            for watch in self._watches:
                watch.queue.put_nowait(EXPIRE)

        self._call(compact)

    def sever(self) -> None:
        """Cut every open watch mid-stream (no terminating chunk)."""
        self._call(lambda: [w.queue.put_nowait(SEVER) for w in self._watches])

    def resource_version(self) -> str:
        return str(self._call(lambda: self._rv))

    def open_watches(self) -> int:
        return self._call(lambda: len(self._watches))

    # --- internals -------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            result = fn()
            if asyncio.iscoroutine(result):
                return await result  # type: ignore[no-any-return]
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def _modify(self, namespace: str, name: str, change: Callable[[dict[str, Any]], None]) -> None:
        def modify() -> None:
            pod = copy.deepcopy(self._pods[f"{namespace}/{name}"])
            change(pod)
            self._commit("MODIFIED", pod)

        self._call(modify)

    def _commit(self, kind: str, pod: dict[str, Any], store: bool = True) -> None:
        self._rv += 1
        pod = copy.deepcopy(pod)
        pod["metadata"]["resourceVersion"] = str(self._rv)
        meta = pod["metadata"]
        if store:
            self._pods[f"{meta['namespace']}/{meta['name']}"] = pod
        self._history.append((self._rv, kind, pod))
        for watch in self._watches:
            if _matches(pod, watch.namespace, watch.labels):
                watch.queue.put_nowait((kind, pod))

    async def _up(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/pods", self._pods_route)
        app.router.add_get("/api/v1/namespaces/{namespace}/pods", self._pods_route)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def _down(self) -> None:
        for watch in list(self._watches):
            watch.queue.put_nowait(SEVER)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _pods_route(self, request: web.Request) -> web.StreamResponse:
        if self.forbidden:
            self.requests["forbidden"] += 1
            return _status(403, "Forbidden", _forbidden_message(request))
        namespace = request.match_info.get("namespace")
        try:
            labels = _selector(request.query.get("labelSelector", ""))
        except ValueError as exc:
            return _status(400, "BadRequest", str(exc))
        if request.query.get("watch", "").lower() in ("1", "true"):
            self.requests["watch"] += 1
            return await self._watch(request, namespace, labels)
        self.requests["list"] += 1
        items = [p for p in self._pods.values() if _matches(p, namespace, labels)]
        body = {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }
        return web.json_response(body)

    async def _watch(
        self, request: web.Request, namespace: str | None, labels: dict[str, str]
    ) -> web.StreamResponse:
        since = request.query.get("resourceVersion", "")
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        bookmarks = request.query.get("allowWatchBookmarks", "").lower() in ("1", "true")
        reply = web.StreamResponse(headers={"Content-Type": "application/json"})
        reply.enable_chunked_encoding()
        await reply.prepare(request)
        if since and int(since) < self._compacted:
            await _send(reply, _expired(since))
            return reply
        watch = _Watch(namespace, labels)
        if since:
            for rv, kind, pod in self._history:
                if rv > int(since) and _matches(pod, namespace, labels):
                    watch.queue.put_nowait((kind, pod))
        else:  # from "now": the current objects as ADDED
            for pod in self._pods.values():
                if _matches(pod, namespace, labels):
                    watch.queue.put_nowait(("ADDED", pod))
        self._watches.add(watch)
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                wait = min(left, self.bookmark_s) if bookmarks else left
                try:
                    item = await asyncio.wait_for(watch.queue.get(), wait)
                except asyncio.TimeoutError:
                    if bookmarks and time.monotonic() < deadline:
                        await _send(reply, _bookmark(self._rv))
                    continue
                if item == SEVER:
                    if request.transport is not None:
                        request.transport.abort()
                    return reply
                if item == EXPIRE:
                    await _send(reply, _expired(since))
                    return reply
                kind, pod = item
                await _send(reply, {"type": kind, "object": pod})
        except (ConnectionResetError, asyncio.CancelledError):
            return reply
        finally:
            self._watches.discard(watch)
        await reply.write_eof()
        return reply


def _conditions(ready: bool) -> list[dict[str, str]]:
    status = "True" if ready else "False"
    return [{"type": "Ready", "status": status}, {"type": "ContainersReady", "status": status}]


def _selector(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"unable to parse requirement: {part!r}")
        labels[key] = value
    return labels


def _matches(pod: dict[str, Any], namespace: str | None, labels: dict[str, str]) -> bool:
    meta = pod["metadata"]
    if namespace is not None and meta["namespace"] != namespace:
        return False
    have = meta.get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


async def _send(reply: web.StreamResponse, event: dict[str, Any]) -> None:
    await reply.write(json.dumps(event).encode() + b"\n")


def _bookmark(rv: int) -> dict[str, Any]:
    return {
        "type": "BOOKMARK",
        "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}},
    }


def _expired(since: str) -> dict[str, Any]:
    message = f"too old resource version: {since}"
    return {"type": "ERROR", "object": _status_body(410, "Expired", message)}


def _status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(_status_body(code, reason, message), status=code)


def _forbidden_message(request: web.Request) -> str:
    namespace = request.match_info.get("namespace")
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return (
        'pods is forbidden: User "system:serviceaccount:default:sglang-router" cannot '
        f'list resource "pods" in API group "" {scope}'
    )
