"""How the bench talks HTTP: one `Client` protocol, two clients behind it.

`lean` (default) is the router's own `UpstreamPool` (uvloop protocols + httptools: the cheapest
per request, which matters when the client shares two cores with eight workers and a router);
`aiohttp` (one session, connector limit = concurrency) also speaks https. A client hands each
response to a `Sink` (its head, then body bytes as they arrive) and raises `Failure` (how the
failed request is counted, and what was said) for anything but a 200 answered to the end. The
`x-sglang-dp-worker` response header names the worker behind a router.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol
from urllib.parse import urlsplit

import orjson

from sglang_dp.bench.config import BenchConfig

WORKER_HEADER = "x-sglang-dp-worker"


class Failure(Exception):
    """One request failed: `reason` is how it is counted, `detail` what was said."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Sink(Protocol):
    """Where a client hands a response: its head, then body bytes as they arrive."""

    def head(self, status: int, worker: str | None) -> None: ...

    def chunk(self, data: bytes) -> None: ...


class Client(Protocol):
    async def post(self, path: str, body: bytes, sink: Sink) -> None: ...

    async def get(self, path: str) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


def _split_url(url: str) -> tuple[str, str]:
    """(scheme://host:port, path prefix) of a server URL."""
    parts = urlsplit(url.rstrip("/"))
    return f"{parts.scheme}://{parts.netloc}", parts.path


def _error_detail(body: bytes) -> str:
    return body[:300].decode(errors="replace").strip()


class LeanClient:
    """Plain-http client on the router's `UpstreamPool` (see the module docstring)."""

    def __init__(self, url: str, headers: list[tuple[bytes, bytes]], timeout: float) -> None:
        from sglang_dp.router.upstream import UpstreamPool

        self._origin, self._prefix = _split_url(url)
        self._headers = headers
        self._timeout = timeout
        self._pool = UpstreamPool(max_idle_per_host=4096)

    async def post(self, path: str, body: bytes, sink: Sink) -> None:
        from sglang_dp.router import upstream

        try:
            resp = await self._pool.request(
                self._origin,
                "POST",
                self._prefix + path,
                self._headers,
                body,
                timeout=self._timeout,
            )
            worker = resp.header(WORKER_HEADER.encode())
            sink.head(resp.status, worker.decode() if worker else None)
            if resp.status != 200:
                raise Failure(f"http {resp.status}", _error_detail(await resp.read()))
            async for data in resp:
                sink.chunk(data)
        except upstream.ConnectTimeout as exc:
            raise Failure("connect timeout", str(exc)) from None
        except upstream.ConnectError as exc:
            raise Failure("connect error", str(exc)) from None
        except upstream.UpstreamTimeout as exc:
            raise Failure("timeout", str(exc)) from None
        except upstream.UpstreamClosed as exc:
            raise Failure("disconnected", str(exc)) from None
        except upstream.UpstreamError as exc:
            raise Failure("protocol error", str(exc)) from None

    async def get(self, path: str) -> tuple[int, bytes]:
        from sglang_dp.router.upstream import UpstreamError

        try:
            resp = await self._pool.request(
                self._origin, "GET", self._prefix + path, self._headers, b"", timeout=10.0
            )
            return resp.status, await resp.read()
        except UpstreamError as exc:
            raise Failure("connect error", str(exc)) from None

    async def close(self) -> None:
        await self._pool.close()


class AiohttpClient:
    """aiohttp client: one session, at most `limit` connections (0: no limit)."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float, limit: int) -> None:
        import aiohttp

        self._url = url.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=timeout),
            headers=headers,
        )

    async def post(self, path: str, body: bytes, sink: Sink) -> None:
        import aiohttp

        try:
            async with self._session.post(self._url + path, data=body) as resp:
                sink.head(resp.status, resp.headers.get(WORKER_HEADER))
                if resp.status != 200:
                    raise Failure(f"http {resp.status}", _error_detail(await resp.read()))
                async for data in resp.content.iter_any():
                    sink.chunk(data)
        except aiohttp.ClientConnectorError as exc:
            raise Failure("connect error", str(exc)) from None
        except asyncio.TimeoutError:
            raise Failure("timeout", "no progress within --request-timeout") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise Failure("disconnected", str(exc)) from None
        except aiohttp.ClientError as exc:
            raise Failure("client error", str(exc) or type(exc).__name__) from None

    async def get(self, path: str) -> tuple[int, bytes]:
        import aiohttp

        try:
            async with self._session.get(self._url + path) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise Failure("connect error", str(exc) or type(exc).__name__) from None

    async def close(self) -> None:
        await self._session.close()


def make_client(config: BenchConfig, url: str) -> Client:
    """The client `config.client` names, sending the API key and JSON content type."""
    headers = {"content-type": "application/json"}
    if config.api_key:
        headers["authorization"] = f"Bearer {config.api_key}"
    if config.client == "aiohttp":
        return AiohttpClient(url, headers, config.request_timeout, config.concurrency or 0)
    encoded = [(k.encode(), v.encode()) for k, v in headers.items()]
    return LeanClient(url, encoded, config.request_timeout)


async def server_model(client: Client) -> str:
    """The first model a server lists at /v1/models, or "default"."""
    with contextlib.suppress(Failure, orjson.JSONDecodeError, LookupError, TypeError):
        status, body = await client.get("/v1/models")
        if status == 200:
            return str(orjson.loads(body)["data"][0]["id"])
    return "default"


async def flush_cache(client: Client) -> str:
    """Ask the server to drop its prefix cache; an empty string, or a note saying it refused."""
    try:
        status, body = await client.get("/flush_cache")
    except Failure as exc:
        return f"could not flush the cache: {exc.detail}"
    if status != 200:
        return f"the server refused to flush its cache ({status}): {_error_detail(body)}"
    return ""
