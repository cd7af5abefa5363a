"""Decoding SGLang's KV event messages: raw ZMQ frames in, a validated batch or a reason out.

    decode_message([topic, seq, payload], topic=b"kv", block_size=16)  # a live PUB message
    decode_payload(seq, payload, block_size=16)                        # a replayed batch

Either returns a `Batch` (seq, ts, events as `sglang_dp.kv_wire` records, dp rank) or a
`Rejected` (the seq when it could be read, and a one-line reason). Nothing raises past these
functions: wrong frame count, wrong topic, a seq frame that is not 8 bytes, a payload over
`max_bytes` (default 64 MiB, checked before decoding), bytes that are not msgpack, an unknown
event type, a field of the wrong type or range (hashes must be int64, token ids uint32), and a
`BlockStored` whose block size is not the subscriber's or whose token count is not
block size × hashes are all `Rejected`. Both the older and the newer field lists decode (trailing
fields such as `medium` and `attn_dp_rank` are optional; extra trailing fields are ignored).

Pure: msgspec's typed decoder does the work in C, once per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from sglang_dp.kv_wire import BlockStored, Event, EventBatch

MAX_BYTES = 64 << 20

_decoder = msgspec.msgpack.Decoder(EventBatch)


@dataclass(frozen=True, slots=True)
class Batch:
    """One decoded, validated event batch."""

    seq: int
    ts: float
    events: list[Event]
    dp_rank: int | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that could not be used, and why (`seq` None when it could not be read)."""

    reason: str
    seq: int | None = None


def decode_message(
    frames: Sequence[bytes], topic: bytes, block_size: int, max_bytes: int = MAX_BYTES
) -> Batch | Rejected:
    """A live message: `[topic, seq (8 bytes big-endian), payload]`."""
    if len(frames) != 3:
        return Rejected(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    got_topic, seq_frame, payload = frames
    seq = _seq(seq_frame)
    if seq is None:
        return Rejected(f"seq frame of {len(seq_frame)} bytes, expected 8")
    if bytes(got_topic) != topic:
        return Rejected(f"topic {bytes(got_topic)[:40]!r}, expected {topic!r}", seq)
    return decode_payload(seq, payload, block_size, max_bytes)


def decode_payload(
    seq: int, payload: bytes, block_size: int, max_bytes: int = MAX_BYTES
) -> Batch | Rejected:
    """The msgpack payload of batch `seq` (live, or from the replay socket)."""
    if len(payload) > max_bytes:
        return Rejected(f"payload of {len(payload)} bytes exceeds {max_bytes}", seq)
    try:
        batch = _decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        return Rejected(f"undecodable batch: {exc}", seq)
    for event in batch.events:
        if isinstance(event, BlockStored):
            problem = _check_stored(event, block_size)
            if problem:
                return Rejected(problem, seq)
    return Batch(seq, batch.ts, batch.events, batch.attn_dp_rank)


def _seq(frame: bytes) -> int | None:
    return int.from_bytes(frame, "big") if len(frame) == 8 else None


def _check_stored(event: BlockStored, block_size: int) -> str | None:
    if event.block_size != block_size:
        return f"block size {event.block_size}, expected {block_size} (the worker's --page-size)"
    if len(event.token_ids) != block_size * len(event.block_hashes):
        return (
            f"BlockStored with {len(event.block_hashes)} hashes and {len(event.token_ids)} "
            f"tokens at block size {block_size}"
        )
    return None
