"""SGLang's KV cache events on the wire: the records, their msgpack form, framing and block hashes.

Shared by the simulated worker (which publishes) and the router (which decodes); pure, no I/O.
The facts, checked against SGLang's source (`srt/disaggregation/kv_events.py`,
`srt/mem_cache/radix_cache.py`, `srt/mem_cache/utils.py`):

- A ZMQ PUB message is three frames: topic (bytes), seq (8-byte big-endian unsigned: 0, 1, 2 …
  per batch, back to 0 when the publisher restarts), payload (msgpack).
- The payload is an `EventBatch` encoded by msgspec as an array: `[ts, events, attn_dp_rank]`
  (older SGLang: `[ts, events]`). Each event is a tagged array, the class name first:

      ["BlockStored", [hash], parent_hash | None, token_ids, block_size, lora_id, medium]
      ["BlockRemoved", [hash, ...], medium]
      ["AllBlocksCleared"]

  Older SGLang has no `medium`; msgspec omits trailing fields equal to their default, so one
  struct definition both writes the newest layout (medium "GPU") and reads the older ones.
- Replay (ROUTER socket): a DEALER sends `[b"", start_seq (8 bytes BE)]`; the publisher answers
  `[b"", seq, payload]` for each buffered batch with seq ≥ start, then `[b"", END_SEQ, b""]`.
- Configuration: `KvEventsConfig.parse(text)` reads the `--kv-events-config` JSON SGLang's
  pydantic `KVEventsConfig` reads, with the same fields and defaults: `publisher` "null" (off) |
  "zmq", `endpoint` "tcp://*:5557", `replay_endpoint` None, `buffer_steps` 10000, `hwm` 100000,
  `max_queue_size` 100000, `topic` "". Unknown fields are ignored, as pydantic does. SGLang's
  `/server_info` carries it (a string, `kv_events_config`) with the other server arguments.
- Block hashes: per page, `digest_i = sha256(digest_{i-1} ‖ token ids as uint32 LE)` (no prior
  for the first page of a chain); the published id is the digest's first 8 bytes read big-endian
  as a signed int64. A node's first page chains from its parent node's last page.
  Golden vector: tokens [1, 2, 3, 4], one page of 4, no parent → -3488128144981237669.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Annotated, Any

import msgspec
import orjson

MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # replay's end marker
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]  # hashed as uint32
BlockSize = Annotated[int, msgspec.Meta(ge=1)]


class BlockStored(
    msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True, frozen=True
):
    """Pages stored in the radix cache: one hash per page, `token_ids` concatenated."""

    block_hashes: list[Int64]
    parent_block_hash: Int64 | None
    token_ids: list[TokenId]
    block_size: BlockSize
    lora_id: int | None = None
    medium: str | None = None


class BlockRemoved(
    msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True, frozen=True
):
    """Pages evicted from the radix cache."""

    block_hashes: list[Int64]
    medium: str | None = None


class AllBlocksCleared(
    msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True, frozen=True
):
    """Everything dropped (a flush, or the cache's reset at start-up)."""


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The events of one scheduler step."""

    ts: float
    events: list[Event]
    attn_dp_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()


def encode_batch(batch: EventBatch) -> bytes:
    """The msgpack payload SGLang's publisher sends for `batch`."""
    return _encoder.encode(batch)


def seq_bytes(seq: int) -> bytes:
    """The seq frame."""
    return seq.to_bytes(8, "big")


def page_digest(tokens: Sequence[int], prior: bytes | None) -> bytes:
    """sha256 of the prior page's digest (if any) and the page's tokens as uint32 LE."""
    h = hashlib.sha256()
    if prior is not None:
        h.update(prior)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


def digest_to_id(digest: bytes) -> int:
    """The published block id: the digest's first 8 bytes as a big-endian signed int64."""
    return int.from_bytes(digest[:8], "big", signed=True)


def chain_digests(tokens: Sequence[int], page_size: int, prior: bytes | None = None) -> list[bytes]:
    """Digests of the pages of `tokens` (the last page may be short), chained from `prior`."""
    out: list[bytes] = []
    for start in range(0, len(tokens), page_size):
        prior = page_digest(tokens[start : start + page_size], prior)
        out.append(prior)
    return out


def chain_ids(tokens: Sequence[int], page_size: int, prior: bytes | None = None) -> list[int]:
    """Published block ids of the whole pages of `tokens`, as SGLang chains them from the root."""
    whole = len(tokens) - len(tokens) % page_size
    return [digest_to_id(d) for d in chain_digests(tokens[:whole], page_size, prior)]


def to_builtins(batch: EventBatch) -> Any:
    """The batch as plain lists (for debugging and dumps)."""
    return msgspec.to_builtins(batch)


PUBLISHERS = ("null", "zmq")


@dataclass(frozen=True)
class KvEventsConfig:
    """SGLang's KVEventsConfig (see the module docstring)."""

    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @classmethod
    def parse(cls, text: str) -> KvEventsConfig:
        """From the `--kv-events-config` JSON; ValueError with a clear message if it is wrong."""
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"--kv-events-config is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            ok = (
                isinstance(value, str)
                if f.name in ("publisher", "endpoint", "topic")
                else value is None or isinstance(value, str)
                if f.name == "replay_endpoint"
                else isinstance(value, int) and not isinstance(value, bool) and value > 0
            )
            if not ok:
                raise ValueError(f"--kv-events-config: bad {f.name}: {value!r}")
            values[f.name] = value
        config = cls(**values)
        if config.publisher not in PUBLISHERS:
            raise ValueError(f"--kv-events-config: unknown publisher {config.publisher!r}")
        return config

    @property
    def enabled(self) -> bool:
        return self.publisher == "zmq"


def tcp_host_port(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of a tcp:// endpoint, None for any other."""
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[len("tcp://") :].rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)
