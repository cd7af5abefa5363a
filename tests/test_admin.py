"""The admin client against a real router process, and how commands print its errors."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from rich.console import Console

from sglang_dp.admin import AdminClient, AdminError, print_error
from tests.processes import free_port
from tests.router.cluster import router_process


async def ask(
    url: str,
    key: str | None,
    method: str,
    path: str,
    params: dict[str, Any] | None = None,
    json: Any = None,
) -> Any:
    async with AdminClient(url, key, timeout_s=5) as router:
        return await router.call(method, path, params=params, json=json)


def test_an_unreachable_router_is_said_so() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AdminError, match=f"cannot reach a router at {url}"):
        asyncio.run(ask(url, None, "GET", "/debug/stats"))


def test_a_router_with_an_admin_key() -> None:
    with router_process([], "--admin-api-key", "adm", ready_workers=0) as router:
        with pytest.raises(AdminError, match="refused the API key"):
            asyncio.run(ask(router.url, "wrong", "GET", "/debug/stats"))
        worker = "http://127.0.0.1:9"
        added = asyncio.run(ask(router.url, "adm", "POST", "/workers", json={"url": worker}))
        assert isinstance(added, dict) and added["url"] == worker
        removed = asyncio.run(ask(router.url, "adm", "DELETE", "/workers", params={"url": worker}))
        assert removed == {"removed": worker}
        with pytest.raises(AdminError, match=r"/workers answered 404: .*not a worker"):
            asyncio.run(ask(router.url, "adm", "DELETE", "/workers", params={"url": worker}))


def test_errors_are_printed_as_they_are() -> None:
    out = io.StringIO()
    print_error(Console(file=out, width=200), "no such key [bold]x[/] in [config]")
    assert out.getvalue() == "error: no such key [bold]x[/] in [config]\n"
