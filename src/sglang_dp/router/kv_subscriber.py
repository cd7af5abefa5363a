"""The router's KV events subscriber: one pyzmq asyncio SUB task per worker, feeding a `KvIndex`.

    subscriber = KvSubscriber(index)                    # on the router's running loop
    subscriber.add(EventSource("w0", "tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558", "kv"))
    ...
    await subscriber.close()

Each task connects a SUB socket (subscribed to the source's topic), decodes every message
(`router.kv_events`, per batch) and applies it (`KvIndex.apply`). When the index reports a gap it
asks the replay socket — a DEALER sending `[b"", start_seq]` — and applies the answers until the
end marker, or until `replay_timeout` (default 2 s) passes; then `KvIndex.replay_done` decides
whether the gap was filled. Live messages wait in the SUB socket meanwhile. Without a replay
endpoint a gap is lost at once (the worker goes untrusted until its next clear or restart). An
undecodable message goes to `KvIndex.reject`. A reconnection of the SUB socket (the worker
restarted, or the link broke) drops the worker's picture (`KvIndex.forget`), which is then
rebuilt by replay from seq 0 when the next batch arrives. A change of a worker's trust is
logged once, with its reason. Nothing here blocks the loop; nothing is retried in a tight loop.

`source_from_server_info(worker, url, info)` builds the source a worker advertises in
`/server_info` (`kv_events`, SGLang's descriptor, else the `kv_events_config` it was started
with): a wildcard host is replaced by the worker URL's host, as SGLang's own gateway does. The
replay endpoint comes from `kv_events_config`; without one, gaps cannot be repaired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sglang_dp.kv_wire import END_SEQ, KvEventsConfig, tcp_host_port
from sglang_dp.router.kv_events import Rejected, decode_message, decode_payload
from sglang_dp.router.kv_index import KvIndex

log = logging.getLogger("sglang_dp.router.kv_events")

WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]", "")
REPLAY_TIMEOUT_S = 2.0
RCVHWM = 100_000  # SGLang's PUB high-water mark
RECONNECTED = "event stream reconnected: resyncing from seq 0"


@dataclass(frozen=True)
class EventSource:
    """Where one worker publishes its KV events."""

    worker: str
    endpoint: str  # tcp://host:port the SUB socket connects to
    replay_endpoint: str | None = None
    topic: str = ""
    block_size: int | None = None  # tokens per block (the worker's --page-size), when known


def source_from_server_info(
    worker: str, worker_url: str, info: Mapping[str, Any], replay_endpoint: str | None = None
) -> EventSource | None:
    """The source a worker's `/server_info` describes (rank 0), or None if it publishes none.

    Newer SGLang describes its publisher in `kv_events`; every version that has events lists
    its `kv_events_config` (the JSON it was started with) and `page_size` among the server
    arguments, which also give the replay endpoint `kv_events` leaves out."""
    config = _events_config(info.get("kv_events_config"))
    kv = info.get("kv_events")
    host: Any
    if isinstance(kv, Mapping) and kv.get("publisher") == "zmq":
        host, port, topic = kv.get("endpoint_host"), kv.get("endpoint_port_base"), kv.get("topic")
        block_size = kv.get("block_size")
    elif config is not None and config.enabled and tcp_host_port(config.endpoint) is not None:
        host, port = tcp_host_port(config.endpoint) or ("", 0)
        topic, block_size = config.topic, info.get("page_size")
    else:
        return None
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    if replay_endpoint is None and config is not None and config.replay_endpoint:
        replay_endpoint = _reachable(config.replay_endpoint, worker_url)
    size = block_size if isinstance(block_size, int) and block_size > 0 else None
    endpoint = _reachable(f"tcp://{host}:{port}", worker_url)
    return EventSource(worker, endpoint, replay_endpoint, str(topic or ""), size)


def _events_config(text: Any) -> KvEventsConfig | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return KvEventsConfig.parse(text)
    except ValueError:
        return None


def _reachable(endpoint: str, worker_url: str) -> str:
    """A tcp endpoint with a wildcard host pointed at the worker's host."""
    where = tcp_host_port(endpoint)
    if where is None:
        return endpoint
    host, port = where
    if host in WILDCARD_HOSTS:
        host = urlsplit(worker_url).hostname or "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


class KvSubscriber:
    """The per-worker subscriber tasks (see the module docstring)."""

    def __init__(
        self,
        index: KvIndex,
        clock: Callable[[], float] = time.monotonic,
        replay_timeout: float = REPLAY_TIMEOUT_S,
    ) -> None:
        import zmq.asyncio

        self.index = index
        self._clock = clock
        self._replay_timeout = replay_timeout
        self._ctx = zmq.asyncio.Context()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._logged: dict[str, str] = {}
        self._errors: dict[str, str] = {}

    def add(self, source: EventSource) -> None:
        """Subscribe to a worker's events (replaces a previous subscription of that worker)."""
        self.index.add_worker(source.worker)
        old = self._tasks.pop(source.worker, None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(self._run(source))
        self._tasks[source.worker] = task

    async def remove(self, worker: str) -> None:
        """Stop a worker's subscription and forget its blocks."""
        task = self._tasks.pop(worker, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.index.remove_worker(worker)

    async def close(self) -> None:
        """Stop every task and close the sockets."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._ctx.term()

    async def _run(self, source: EventSource) -> None:
        import zmq

        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        # live batches wait here while a replay runs: the default 1000 would drop them
        sub.setsockopt(zmq.RCVHWM, RCVHWM)
        topic = source.topic.encode()
        sub.setsockopt(zmq.SUBSCRIBE, topic)
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED)
        watcher = asyncio.get_running_loop().create_task(self._watch(source.worker, monitor))
        sub.connect(source.endpoint)
        block_size = self.index.block_size
        try:
            while True:
                frames = await sub.recv_multipart(copy=True)
                try:
                    await self._handle(source, frames, topic, block_size)
                except Exception as exc:  # a bug must not leave a stale picture trusted
                    reason = f"subscriber error: {exc!r}"
                    if self._errors.get(source.worker) != reason:  # logged once
                        self._errors[source.worker] = reason
                        log.exception("KV events of %s: subscriber error", source.worker)
                    self.index.forget(source.worker, reason)
                self._log_trust(source.worker)
        finally:
            watcher.cancel()
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    async def _handle(
        self, source: EventSource, frames: list[bytes], topic: bytes, block_size: int
    ) -> None:
        result = decode_message(frames, topic, block_size)
        if isinstance(result, Rejected):
            self.index.reject(source.worker, result, self._clock())
            return
        start = self.index.apply(source.worker, result, self._clock())
        if start is not None:
            await self._replay(source, start)

    async def _watch(self, worker: str, monitor: Any) -> None:
        """Every connection after the first is a new stream, maybe a restarted publisher whose
        seq is already past the old one: drop the picture, rebuild it from seq 0 by replay."""
        connections = 0
        while True:
            await monitor.recv_multipart()
            connections += 1
            if connections > 1:
                self.index.forget(worker, RECONNECTED)

    async def _replay(self, source: EventSource, start: int) -> None:
        """Ask the replay socket for every batch from `start`, apply them, close the attempt."""
        import zmq

        worker = source.worker
        if source.replay_endpoint is None:
            self.index.replay_done(worker, self._clock())
            return
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(source.replay_endpoint)
        deadline = self._clock() + self._replay_timeout
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while (left := deadline - self._clock()) > 0:
                if not await dealer.poll(left * 1000):
                    break
                frames = await dealer.recv_multipart()
                if len(frames) != 3 or frames[1] == END_SEQ:
                    break
                seq = int.from_bytes(frames[1], "big") if len(frames[1]) == 8 else None
                if seq is None:
                    break
                result = decode_payload(seq, frames[2], self.index.block_size)
                if isinstance(result, Rejected):
                    self.index.reject(worker, result, self._clock())
                else:
                    self.index.apply(worker, result, self._clock(), replayed=True)
        finally:
            dealer.close(linger=0)
            self.index.replay_done(worker, self._clock())

    def _log_trust(self, worker: str) -> None:
        status = self.index.status(worker)
        if status.replaying_from is not None:
            return  # a gap being repaired is not worth a log line
        state = "trusted" if status.trusted else status.reason
        if self._logged.get(worker) != state:
            self._logged[worker] = state
            if status.trusted:
                log.info("KV events of %s: whole (exact cache view)", worker)
            else:
                log.warning("KV events of %s: untrusted: %s", worker, status.reason)
