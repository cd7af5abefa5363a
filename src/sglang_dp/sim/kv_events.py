"""The simulated worker's KV events publisher: SGLang's `--kv-events-config`, ZMQ PUB + replay.

The configuration (`kv_wire.KvEventsConfig`, SGLang's JSON) is shared with the router, which
reads it from a worker's `/server_info`.

`EventPublisher` is the socket shell (one per worker, on the worker's asyncio loop; SGLang uses
a thread, the sim needs none): `publish(batch)` numbers the batch (seq 0, 1, 2 …), sends
`[topic, seq, payload]` on the PUB socket and keeps `(seq, payload)` in a ring of `buffer_steps`
for replay. A task answers replay requests on the ROUTER socket (see `sglang_dp.kv_wire`).
Binding follows SGLang: an endpoint with `*` or `::`, or ipc:// / inproc://, binds; any other
connects. One deliberate difference: a `*` host binds the worker's `--host` (127.0.0.1 by
default), so a simulated cluster never listens beyond loopback unless told to.

Fault injection: `drop_rate` (`--kv-events-drop-rate`, seeded by `--random-seed`) skips the
send of that fraction of batches, as a full high-water mark does in SGLang: the batch still
takes its seq and stays in the replay buffer, so a subscriber sees a gap it can repair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from typing import Any

from sglang_dp.kv_wire import (
    END_SEQ,
    EventBatch,
    KvEventsConfig,
    encode_batch,
    seq_bytes,
    tcp_host_port,
)

log = logging.getLogger("sglang_dp.sim")


def binds(endpoint: str) -> bool:
    """SGLang's rule: bind on a wildcard host or a local transport, else connect."""
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith("ipc://")
        or endpoint.startswith("inproc://")
    )


def local_endpoint(endpoint: str, host: str) -> str:
    """A `*` host replaced by the worker's host (the sim stays on loopback by default)."""
    return endpoint.replace("*", host, 1) if endpoint.startswith("tcp://*") else endpoint


def describe(config: KvEventsConfig, block_size: int) -> dict[str, Any] | None:
    """The `kv_events` block of /server_info (SGLang's `describe_kv_events_publisher`)."""
    where = tcp_host_port(config.endpoint) if config.enabled else None
    if where is None:
        return None
    return {
        "publisher": config.publisher,
        "endpoint_host": where[0],
        "endpoint_port_base": where[1],
        "topic": config.topic,
        "block_size": block_size,
        "dp_size": 1,
    }


class EventPublisher:
    """PUB socket, replay ring and ROUTER socket of one worker (see the module docstring)."""

    def __init__(
        self, config: KvEventsConfig, host: str, drop_rate: float = 0.0, seed: int = 0
    ) -> None:
        import zmq
        import zmq.asyncio

        self.config = config
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay: Any = None
        self._replay_task: asyncio.Task[None] | None = None
        endpoint = local_endpoint(config.endpoint, host)
        try:
            if binds(config.endpoint):
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
            if config.replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                replay_endpoint = local_endpoint(config.replay_endpoint, host)
                self._replay.bind(replay_endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"KV events endpoint: {exc} ({config})") from None
        self._topic = config.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._seq = 0
        self._drop_rate = drop_rate
        self._rng = random.Random(seed)
        self.published = self.dropped = 0
        if self._replay is not None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, batch: EventBatch) -> None:
        """Send one batch (or drop it, by fault injection) and keep it for replay."""
        seq = self._seq
        self._seq += 1
        payload = encode_batch(batch)
        self._buffer.append((seq, payload))
        if self._drop_rate and self._rng.random() < self._drop_rate:
            self.dropped += 1
            return
        self.published += 1
        # PUB never blocks: past the high-water mark ZMQ drops the message itself
        self._pub.send_multipart((self._topic, seq_bytes(seq), payload))

    async def _serve_replay(self) -> None:
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("invalid KV events replay request (%d frames)", len(frames))
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await self._replay.send_multipart((client, b"", seq_bytes(seq), payload))
            await self._replay.send_multipart((client, b"", END_SEQ, b""))

    def close(self) -> None:
        """Stop answering replays and close the sockets."""
        if self._replay_task is not None:
            self._replay_task.cancel()
        self._pub.close(linger=0)
        if self._replay is not None:
            with contextlib.suppress(Exception):
                self._replay.close(linger=0)
        self._ctx.term()
