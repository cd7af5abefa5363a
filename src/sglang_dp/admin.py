"""The client of a router's admin routes: what `top`, `inspect-tree` and `launch --register-with`
ask of a router (`/debug/*`, `/workers`), on aiohttp, with the admin key as a Bearer token.

`AdminClient(url, key, timeout_s, key_option)` (10 s; the flag named when refused), used as
an async context manager: `call(method, path, params=..., json=..., body=...)` returns the
decoded JSON answer or raises `AdminError` with one of three messages: the router refused the
key (401), answered another status (with the first 300 characters of its body), or could not
be reached.

Also `print_error(console, message)`: how every command shows a failure, with the message's own
square brackets escaped so that rich does not take them for markup.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Console
from rich.markup import escape

from sglang_dp.router.auth import bearer_header

if TYPE_CHECKING:
    import aiohttp

TIMEOUT_S = 10.0
DETAIL_CHARS = 300  # of an error answer's body, in the message


class AdminError(Exception):
    """The router could not be asked, or refused; the message says which."""


class AdminClient:
    """One router's admin API (see the module docstring)."""

    def __init__(
        self, url: str, key: str | None, timeout_s: float = TIMEOUT_S, key_option: str = "--api-key"
    ) -> None:
        self.url = url.rstrip("/")
        self._headers = bearer_header(key)
        self._key_option = key_option  # named in the refusal: the caller's own flag
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self._timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def call(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        json: Any = None,
        body: bytes | None = None,
    ) -> Any:
        """The answer's JSON (None for an empty body); AdminError otherwise."""
        import aiohttp

        headers = self._headers
        if body is not None:
            headers = headers | {"content-type": "application/json"}
        try:
            async with self._client().request(
                method, self.url + path, params=params, json=json, data=body, headers=headers
            ) as reply:
                text = await reply.read()
                if reply.status == 401:
                    hint = f"pass its admin key with {self._key_option}"
                    raise AdminError(f"{self.url} refused the API key ({hint})")
                if not 200 <= reply.status < 300:
                    detail = text.decode(errors="replace")[:DETAIL_CHARS]
                    raise AdminError(f"{self.url}{path} answered {reply.status}: {detail}")
                return orjson.loads(text) if text else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise AdminError(f"cannot reach a router at {self.url}: {reason}") from None
        except orjson.JSONDecodeError:
            raise AdminError(f"{self.url}{path} did not answer JSON") from None


def print_error(console: Console, message: str, headline: str = "error") -> None:
    """`headline: message` in bold red, the message printed as it is (no markup)."""
    console.print(f"[bold red]{headline}:[/] {escape(message)}", highlight=False)
