"""Sends a steady shared-prefix chat load to a router until Ctrl-C or the router is gone (what
`make demo` runs).

Eight "applications", each with its own long system prompt, ask short random questions; a
cache-aware router keeps each application on the worker that has its prompt cached.

    python examples/steady_load.py --url http://127.0.0.1:30000 [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import time

import aiohttp

WORDS = [
    "policy",
    "refund",
    "parcel",
    "account",
    "invoice",
    "delivery",
    "warranty",
    "address",
    "order",
    "support",
]


def system_prompt(app: int, rng: random.Random) -> str:
    return f"You are assistant #{app}. " + " ".join(rng.choices(WORDS, k=600))


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/readiness") as reply:
                if reply.status == 200:
                    return
        await asyncio.sleep(0.5)


class Stop(Exception):
    """The router is gone: the cluster stopped."""


async def client(
    session: aiohttp.ClientSession, url: str, prompts: list[str], seed: int, gone_after: float
) -> None:
    rng = random.Random(seed)
    answered = time.monotonic()
    while True:
        messages = [
            {"role": "system", "content": rng.choice(prompts)},
            {"role": "user", "content": " ".join(rng.choices(WORDS, k=12)) + "?"},
        ]
        body = {"model": "demo", "messages": messages, "max_tokens": rng.randint(16, 64)}
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as reply:
                await reply.read()
                if reply.status == 200:
                    answered = time.monotonic()
                else:
                    await asyncio.sleep(0.5)  # shutting down, or no worker healthy: not a spin
        except aiohttp.ClientConnectorError:
            if time.monotonic() - answered > gone_after:
                raise Stop from None
            await asyncio.sleep(0.5)  # the router is restarting: keep trying a little
        except aiohttp.ClientError:
            await asyncio.sleep(0.5)


async def main(url: str, concurrency: int, gone_after: float) -> None:
    rng = random.Random(0)
    prompts = [system_prompt(app, rng) for app in range(8)]
    # Ctrl-C reaches this process with the launcher's (same terminal); as a background job of a
    # shell it starts with SIGINT ignored, so the handlers are set here, not inherited.
    current = asyncio.current_task()
    assert current is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, current.cancel)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await wait_ready(session, url)
        clients = (client(session, url, prompts, i, gone_after) for i in range(concurrency))
        with contextlib.suppress(Stop):
            await asyncio.gather(*clients)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--gone-after", type=float, default=2.0, help="stop when the router is gone this long"
    )
    args = parser.parse_args()
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(main(args.url.rstrip("/"), args.concurrency, args.gone_after))
