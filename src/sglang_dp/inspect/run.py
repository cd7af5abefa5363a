"""Fetch the router's debug data and print it (the shell of `sglang-dp inspect-tree`).

Reads `/debug/stats` and either `/debug/tree` (no prompt: summary + tree) or `/debug/route`
(a prompt: the dry-run decision, which changes nothing in the router). `--json` prints the same
data as one JSON object for scripts.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from sglang_dp.admin import AdminClient, AdminError, print_error
from sglang_dp.inspect.render import decision_view, summary_table, tree_view


class InspectError(Exception):
    """The router could not be asked, or the input is wrong; the message says which."""


@dataclass(frozen=True)
class InspectRequest:
    url: str
    api_key: str | None = None
    depth: int = 4
    top: int = 8
    worker: str | None = None
    prompt: str | None = None
    prompt_file: Path | None = None
    messages_file: Path | None = None
    as_json: bool = False


def _route_body(req: InspectRequest) -> tuple[str, bytes] | None:
    if req.messages_file is not None:
        data = json.loads(req.messages_file.read_text())
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list):
            raise InspectError(f"{req.messages_file} must hold a list of messages")
        return "/v1/chat/completions", json.dumps({"messages": messages}).encode()
    text = req.prompt
    if req.prompt_file is not None:
        text = req.prompt_file.read_text()
    if text is None:
        return None
    return "/generate", json.dumps({"text": text}).encode()


async def gather(req: InspectRequest) -> dict[str, Any]:
    """Everything to show, as one JSON-able dict."""
    async with AdminClient(req.url, req.api_key) as router:
        stats = await router.call("GET", "/debug/stats")
        if not stats.get("workers"):
            raise InspectError(f"the router at {req.url} has no workers")
        routed = _route_body(req)
        if routed is not None:
            path, body = routed
            route = await router.call("POST", "/debug/route", params={"path": path}, body=body)
            return {"stats": stats, "route": route}
        query = {"depth": req.depth, "top": req.top} | (
            {"worker": req.worker} if req.worker else {}
        )
        tree = await router.call("GET", "/debug/tree", params=query)
        return {"stats": stats, "tree": tree}


def run_inspect(req: InspectRequest, console: Console) -> int:
    try:
        data = asyncio.run(gather(req))
    except (InspectError, AdminError, OSError, ValueError) as exc:
        print_error(console, str(exc))
        return 1
    if req.as_json:
        print(json.dumps(data, indent=2))
    elif "route" in data:
        console.print(decision_view(data["route"], data["stats"]))
    else:
        console.print(summary_table(data["stats"]))
        console.print(tree_view(data["tree"], data["stats"]))
    return 0
