"""The router's exact cache view: which workers' KV events it follows, and how healthy they are.

    view = KvView(mode, engine, token_keys, clock, record_event)
    view.server_info(url, info)   # the health monitor read a worker's /server_info
    await view.start() ... await view.close()
    view.status()                 # for /debug/stats, /metrics, the dashboard and inspect-tree

Modes (`--cache-view`):
- `approx`: the router's own tree alone (corrected from `cached_tokens`); nothing subscribed.
- `auto` (default): a worker whose `/server_info` describes a KV events publisher (SGLang's
  `--kv-events-config`) is subscribed and, once its stream is whole, matched on its events; the
  others on the tree.
- `events`: the same, but a worker that publishes nothing is reported as a problem (event log,
  warning): the user asked for exact routing and gets the tree for that worker.
Events identify blocks by token ids, so they need token keys (`--tokenizer-path`,
`--routing-key words` in front of simulated workers); with character keys nothing is subscribed
and the reason is said once.

The index (`KvIndex`) is made at the block size of the first worker that publishes; a worker
publishing at another block size is not subscribed (its hashes could never match) and is
reported, as is one with attention data parallelism inside (a publisher per rank, port base +
rank: following rank 0 alone would take a part of its cache for the whole; not supported yet).
Its memory bound: `MAX_BLOCKS_PER_TOKEN_OF_KV` × the worker's KV capacity in blocks
(`max_total_num_tokens`) when known, else `KvIndex`'s default.

Every `TICK_S` (1 s) each subscribed stream is checked for silence (`kv_watch.StreamWatch`): a
silent worker's picture is dropped and resynced from seq 0 (`KvIndex.forget`), so it is routed
on the tree until its events are whole again; and workers that left the router are unsubscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from sglang_dp.router.engine import RoutingEngine
from sglang_dp.router.kv_index import MAX_BLOCKS, KvIndex
from sglang_dp.router.kv_subscriber import EventSource, KvSubscriber, source_from_server_info
from sglang_dp.router.kv_watch import SILENT_S, StreamWatch

log = logging.getLogger("sglang_dp.router.kv_events")

CACHE_VIEWS = ("auto", "events", "approx")
TICK_S = 1.0
MAX_BLOCKS_PER_TOKEN_OF_KV = 2  # slack for removals in flight
SILENT = f"silent: answered new prompts for {SILENT_S:.0f} s but published no KV events"


class KvView:
    """Subscriptions and stream health of the workers' KV events (see the module docstring)."""

    def __init__(
        self,
        mode: str,
        engine: RoutingEngine,
        token_keys: bool,
        clock: Callable[[], float] = time.monotonic,
        record_event: Callable[[str], None] = lambda message: None,
    ) -> None:
        if mode not in CACHE_VIEWS:
            raise ValueError(f"cache view must be one of {', '.join(CACHE_VIEWS)}, not {mode!r}")
        self.mode = mode
        self._engine = engine
        self._token_keys = token_keys
        self._clock = clock
        self._record = record_event
        self.index: KvIndex | None = None
        self._subscriber: KvSubscriber | None = None
        self._sources: dict[str, EventSource] = {}
        self._watches: dict[str, StreamWatch] = {}
        self._not_followed: dict[str, str] = {}  # worker -> why its events are not followed
        self._said_characters = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._subscriber is not None:
            await self._subscriber.close()

    def server_info(self, url: str, info: Mapping[str, Any]) -> None:
        """A worker's `/server_info` (read when it becomes healthy): follow its events if it
        publishes them and they can be used, else say why not."""
        if self.mode == "approx":
            return
        source = source_from_server_info(url, url, info)
        if source is None:
            self._not_follow(url, "does not publish KV events (SGLang without --kv-events-config)")
            return
        ranks = _publisher_ranks(info)
        if ranks > 1:  # one publisher per attention-DP rank: rank 0 alone is part of the cache
            self._not_follow(url, f"publishes on {ranks} attention-DP ranks (not supported yet)")
            return
        if not self._token_keys:
            self._not_follow(url, "routing on characters: KV events need token keys")
            if not self._said_characters:
                self._said_characters = True
                self._record(
                    "KV events not used: the router keys on characters; give it "
                    "--tokenizer-path (the workers' tokenizer) to route on exact cache state"
                )
            return
        block_size = source.block_size or 1  # SGLang's default page size
        index = self._index(block_size, info)
        if block_size != index.block_size:
            self._not_follow(
                url, f"publishes blocks of {block_size} tokens, others {index.block_size}"
            )
            return
        if self._sources.get(url) == source:
            return  # the same stream: its subscription resyncs by itself after a restart
        assert self._subscriber is not None
        self._sources[url] = source
        self._not_followed.pop(url, None)
        self._watches[url] = StreamWatch(self._clock())
        self._subscriber.add(source)
        self._record(f"{url}: following its KV events at {source.endpoint}")

    def status(self) -> dict[str, Any]:
        """Per worker: its stream's health, or why its events are not followed."""
        workers: dict[str, Any] = {}
        index = self.index
        for url in self._sources:
            if index is None or url not in index.workers():
                continue
            record = dataclasses.asdict(index.status(url))
            record["events_per_s"] = round(self._watches[url].batches_per_s, 2)
            record["endpoint"] = self._sources[url].endpoint
            workers[url] = record
        for url, why in self._not_followed.items():
            workers[url] = {"trusted": False, "reason": why, "followed": False}
        return {
            "mode": self.mode,
            "block_size": index.block_size if index is not None else None,
            "index_blocks": index.size() if index is not None else 0,
            "workers": workers,
        }

    def _index(self, block_size: int, info: Mapping[str, Any]) -> KvIndex:
        if self.index is None:
            capacity = info.get("max_total_num_tokens")
            limit = MAX_BLOCKS
            if isinstance(capacity, int) and capacity > 0:
                limit = MAX_BLOCKS_PER_TOKEN_OF_KV * capacity // block_size + 1
            self.index = KvIndex(block_size, max_blocks=limit)
            self._subscriber = KvSubscriber(self.index, self._clock)
            self._engine.use_events(self.index)
        return self.index

    def _not_follow(self, url: str, why: str) -> None:
        if self._not_followed.get(url) == why:
            return
        self._not_followed[url] = why
        if self.mode == "events":
            self._record(f"{url}: {why}: routed on the approximate tree")
        else:
            log.info("%s: %s: routed on the approximate tree", url, why)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            await self._tick()

    async def _tick(self) -> None:
        index, subscriber = self.index, self._subscriber
        if index is None or subscriber is None:
            return
        present = set(self._engine.workers)
        for url in [u for u in self._sources if u not in present]:
            del self._sources[url], self._watches[url]
            await subscriber.remove(url)
        self._not_followed = {u: w for u, w in self._not_followed.items() if u in present}
        now = self._clock()
        uncached = {
            w.url: w.prompt_tokens - w.cached_tokens for w in self._engine.snapshot(now).workers
        }
        for url, watch in self._watches.items():
            if url not in index.workers():
                continue
            batches = index.status(url).batches
            if watch.tick(batches, uncached.get(url, 0), now) and index.trusted(url):
                watch.reset(batches, uncached.get(url, 0))
                with contextlib.suppress(KeyError):
                    index.forget(url, SILENT)
                self._record(f"{url}: KV events {SILENT}: routed on the tree until they are whole")


def _publisher_ranks(info: Mapping[str, Any]) -> int:
    """How many publishers the worker runs (SGLang: one per attention data-parallel rank)."""
    kv = info.get("kv_events")
    ranks = kv.get("dp_size") if isinstance(kv, Mapping) else None
    return ranks if isinstance(ranks, int) and ranks > 0 else 1
