"""Exact per-worker index of cached KV blocks, fed by SGLang's KV events (pure).

    roots ── [1,2,3,4] #-3488…  holders {w0, w1}
                ├── [5,6,7,8] #7720…  holders {w0}
                └── [9,9,9,9] #-112…  holders {w1}

One trie of pages shared by all workers: a block is identified by SGLang's chained page hash
(`sglang_dp.kv_wire`), so the same prefix cached on two workers is one block with two holders.
`apply(worker, batch, now)` ingests a decoded batch (`router.kv_events`); `match(tokens)` answers,
for every worker, how many leading tokens of `tokens` it holds.

Ingest (per batch, not per request): a `BlockStored` block hangs under its parent block (the
root when the parent is None); its id is checked against SGLang's hash chain computed here from
the parent's digest and the page's tokens — the hashing happens once per stored block, so
matching a request needs no hashing at all. A block whose id is not that chain (a LoRA or
cache-salt namespace, which re-seeds the chain) is "foreign": counted, never matched, and so are
its descendants. `BlockRemoved` drops the worker from the blocks' holders (a block with neither
holders nor children leaves the trie); `AllBlocksCleared` empties the worker's picture.

Matching walks the request's whole pages through the trie once for all workers; a worker's
match ends at the first page it does not hold (the prefix property of a radix cache), so this is
exactly "chain the request's page hashes as SGLang does and count the leading ones the worker
has stored", without hashing per request. A page is keyed by its token ids as uint32
little-endian bytes (`page_bytes`): one slice of the request's bytes per page, no tuple of ints.

Stream state per worker (`status(worker)`): seq handling follows the wire contract —
- seq = last + 1: applied. A first batch with seq 0 starts a whole picture (SGLang's first batch
  carries its cache's reset: `AllBlocksCleared`).
- a live seq ≤ the previous live seq: the publisher restarted (its seq went back to 0): the
  picture is dropped. A restart seq alone cannot reveal (the new publisher already past the old
  one's seq when the first live batch arrives) is handled by `forget` (the subscriber calls it
  when its socket reconnects): the picture is dropped and rebuilt by replay from seq 0.
  A live seq ≤ last applied but above the previous live one came by replay first: ignored.
- a gap (seq > last + 1, or a first seq > 0): later batches wait in order (at most
  `max_pending`) and `apply` returns the seq to replay from; replayed batches go through
  `apply(..., replayed=True)`; `replay_done` closes the attempt: a gap still open is lost.
Trusted = the picture is whole: from a stream start or an `AllBlocksCleared`, every batch
applied. A lost gap, an undecodable batch (`reject`), a removal of a block never stored, a block
under an unknown parent, or more than `max_blocks` blocks for one worker (it cannot cache more
than its KV capacity: removals were missed; the picture is dropped to bound memory) make the
worker untrusted, with the reason, until its next `AllBlocksCleared` or publisher restart.
Events keep being applied while untrusted (best effort), so trust returns exactly then.

Speculation is not kept here: between routing a request and its `BlockStored` the engine
counts as held what its tree says the worker was routed in the last `SPECULATIVE_TTL_S` (2 s, as
llm-d; `RadixTree.recent_match`), so matching costs one walk of this trie and no bookkeeping.

Settings: `block_size` (the workers' `--page-size`), `max_blocks` per worker (default 1 << 20;
size it from the worker's capacity: max_total_num_tokens / block_size), `max_pending` batches
waiting for a gap fill (default 10000). Events of another medium than the GPU (host-tier
copies) are ignored. Time is a parameter (`now`): last event time for silence checks.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256

from sglang_dp.kv_wire import AllBlocksCleared, BlockRemoved, BlockStored, Event
from sglang_dp.router.kv_events import Batch, Rejected

MAX_BLOCKS = 1 << 20
MAX_PENDING = 10_000
SPECULATIVE_TTL_S = 2.0
GPU = "GPU"
NO_EVENTS = "no events yet"
RESTARTED = "publisher restarted (seq went back): waiting for its seq 0"

Page = bytes  # a page's token ids as uint32 little-endian: hashed as SGLang hashes them
TOKEN_BYTES = 4


def page_bytes(tokens: Sequence[int]) -> bytes:
    """Token ids as uint32 little-endian bytes: a page is a slice (cheaper than a tuple of ints
    per page, and exactly what SGLang's page hash reads)."""
    ids = tokens if isinstance(tokens, array) and tokens.typecode == "I" else array("I", tokens)
    if sys.byteorder != "little":
        ids = array("I", ids)
        ids.byteswap()
    return ids.tobytes()


class Block:
    """One cached page: its id, SGLang digest, tokens, place in the trie and holders."""

    __slots__ = ("block_id", "children", "digest", "holders", "page", "parent")

    def __init__(self, block_id: int, digest: bytes, page: Page, parent: Block | None) -> None:
        self.block_id = block_id
        self.digest = digest
        self.page = page
        self.parent = parent
        self.children: dict[Page, Block] = {}
        self.holders: set[str] = set()


@dataclass
class StreamStatus:
    """What the index knows about one worker's event stream (plain record, for display)."""

    trusted: bool = False
    reason: str = "no events yet"
    last_seq: int | None = None
    batches: int = 0
    events: int = 0
    blocks: int = 0
    foreign_blocks: int = 0
    gaps_filled: int = 0
    gaps_lost: int = 0
    restarts: int = 0
    resyncs: int = 0
    rejected: int = 0
    last_event_time: float | None = None
    replaying_from: int | None = None


@dataclass
class _Worker:
    status: StreamStatus = field(default_factory=StreamStatus)
    blocks: set[int] = field(default_factory=set)  # ids of matchable blocks it holds
    foreign: set[int] = field(default_factory=set)  # ids of namespaced blocks it holds
    pending: dict[int, Batch] = field(default_factory=dict)  # seq -> batch after a gap
    started: bool = False  # has seen a batch since its start / last restart
    live_seq: int | None = None  # highest seq seen on the live stream (in order there)
    whole: bool = False  # every event since a stream start or a clear was applied
    why: str = NO_EVENTS  # why not whole


class KvIndex:
    """The shared block trie and every worker's stream state (see the module docstring)."""

    def __init__(
        self, block_size: int, max_blocks: int = MAX_BLOCKS, max_pending: int = MAX_PENDING
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block size must be at least 1, not {block_size}")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.max_pending = max_pending
        self._roots: dict[Page, Block] = {}
        self._blocks: dict[int, Block] = {}
        self._workers: dict[str, _Worker] = {}

    # ------------------------------------------------------------------ workers

    def add_worker(self, worker: str) -> None:
        """Start tracking a worker (untrusted until its stream is whole)."""
        self._workers.setdefault(worker, _Worker())

    def remove_worker(self, worker: str) -> None:
        """Forget a worker and its blocks."""
        if worker in self._workers:
            self._clear(worker)
            del self._workers[worker]

    def workers(self) -> list[str]:
        return list(self._workers)

    def forget(self, worker: str, reason: str) -> None:
        """Drop a worker's picture and resync from seq 0 (its stream reconnected, or the worker
        restarted: a new publisher whose seq may already be past the old one's)."""
        self.add_worker(worker)
        self._restart(worker, reason)
        self._workers[worker].status.resyncs += 1

    def status(self, worker: str) -> StreamStatus:
        """The worker's stream state (a live record: copy it to keep it)."""
        w = self._workers[worker]
        s = w.status
        s.blocks = len(w.blocks)
        s.foreign_blocks = len(w.foreign)
        s.trusted = w.whole and not w.pending
        if s.trusted:
            s.reason = ""
        elif w.whole:
            s.reason = f"gap after seq {s.last_seq}: waiting for replay"
        else:
            s.reason = w.why
        return s

    def trusted(self, worker: str) -> bool:
        """Whether the worker's picture is whole (matches against it are exact)."""
        w = self._workers.get(worker)
        return w is not None and w.whole and not w.pending

    def blocks(self, worker: str) -> set[int]:
        """Ids of the blocks the worker holds (matchable ones), for agreement checks."""
        return set(self._workers[worker].blocks)

    def size(self) -> int:
        """Blocks in the trie (all workers)."""
        return len(self._blocks)

    # ------------------------------------------------------------------ matching

    def match(self, tokens: Sequence[int], workers: Iterable[str] | None = None) -> dict[str, int]:
        """Leading tokens of `tokens` each worker holds (whole pages; absent workers: 0)."""
        wanted = set(self._workers if workers is None else workers)
        out = dict.fromkeys(wanted, 0)
        data = page_bytes(tokens)
        step = self.block_size * TOKEN_BYTES
        children = self._roots
        alive = wanted
        depth = 0
        for start in range(0, len(data) - step + 1, step):
            block = children.get(data[start : start + step])
            if block is None:
                break
            holders = block.holders
            if not alive <= holders:
                held = alive & holders
                for w in alive - held:
                    out[w] = depth
                if not held:
                    return out
                alive = held
            depth += self.block_size
            children = block.children
        for w in alive:
            out[w] = depth
        return out

    def matched_tokens(self, worker: str, tokens: Sequence[int]) -> int:
        """Leading tokens of `tokens` one worker holds."""
        return self.match(tokens, (worker,))[worker]

    # ------------------------------------------------------------------ stream

    def apply(self, worker: str, batch: Batch, now: float, replayed: bool = False) -> int | None:
        """Ingest one batch; returns a seq to request replay from, or None."""
        self.add_worker(worker)
        w = self._workers[worker]
        w.status.last_event_time = now
        if not replayed:
            # the live stream is in order: going back means a new publisher (seq from 0 again)
            if w.live_seq is not None and batch.seq <= w.live_seq:
                self._restart(worker, RESTARTED)
                w.status.restarts += 1
            w.live_seq = batch.seq
        last = w.status.last_seq
        if last is not None and batch.seq <= last:
            return None  # already applied (it came by replay first)
        if last is None:
            w.started = True
            if batch.seq != 0:
                return self._gap(worker, batch, 0)
            w.whole = True  # the stream from its start (seq 0 carries the cache's reset)
        elif batch.seq != last + 1:
            return self._gap(worker, batch, last + 1)
        self._apply_in_order(worker, batch)
        return None

    def replay_done(self, worker: str, now: float) -> None:
        """The replay socket sent its end marker: a gap still open is lost."""
        w = self._workers.get(worker)
        if w is not None and w.status.replaying_from is not None:
            w.status.replaying_from = None
            if w.pending:
                self._lose_gap(worker)

    def reject(self, worker: str, rejected: Rejected, now: float) -> None:
        """A message that could not be decoded: its batch is lost, the worker untrusted."""
        self.add_worker(worker)
        w = self._workers[worker]
        w.status.rejected += 1
        w.status.last_event_time = now
        self._distrust(w, f"bad event message: {rejected.reason}")
        if rejected.seq is not None and (
            w.status.last_seq is None or rejected.seq > w.status.last_seq
        ):
            w.started = True
            w.status.last_seq = rejected.seq  # consumed: what follows applies in order
            self._drain(worker)

    # ------------------------------------------------------------------ internals

    def _gap(self, worker: str, batch: Batch, first_missing: int) -> int | None:
        w = self._workers[worker]
        s = w.status
        w.pending[batch.seq] = batch
        if len(w.pending) > self.max_pending:
            s.replaying_from = None
            self._lose_gap(worker)
            return None
        if s.replaying_from is not None:
            return None  # a replay is under way: it may bring this gap too
        s.replaying_from = first_missing
        return first_missing

    def _lose_gap(self, worker: str) -> None:
        """Give up on the missing batches: apply what waits, in order, untrusted."""
        w = self._workers[worker]
        s = w.status
        first_missing = (s.last_seq + 1) if s.last_seq is not None else 0
        s.gaps_lost += 1
        self._distrust(w, f"events {first_missing}..{min(w.pending) - 1} lost (not replayed)")
        while w.pending:
            self._apply_in_order(worker, w.pending.pop(min(w.pending)), force=True)

    def _apply_in_order(self, worker: str, batch: Batch, force: bool = False) -> None:
        w = self._workers[worker]
        s = w.status
        for event in batch.events:
            self._apply_event(worker, w, event)
        s.batches += 1
        s.events += len(batch.events)
        s.last_seq = batch.seq if force or s.last_seq is None else max(s.last_seq, batch.seq)
        self._drain(worker)

    def _drain(self, worker: str) -> None:
        w = self._workers[worker]
        s = w.status
        while w.pending and s.last_seq is not None and (s.last_seq + 1) in w.pending:
            self._apply_in_order(worker, w.pending.pop(s.last_seq + 1))
        if not w.pending and s.replaying_from is not None:
            s.replaying_from = None
            s.gaps_filled += 1

    def _apply_event(self, worker: str, w: _Worker, event: Event) -> None:
        if isinstance(event, BlockStored):
            if event.medium in (None, GPU):
                self._store(worker, w, event)
        elif isinstance(event, BlockRemoved):
            if event.medium in (None, GPU):
                self._remove(worker, w, event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            self._clear(worker)
            w.whole = True  # an empty cache, known exactly

    def _store(self, worker: str, w: _Worker, event: BlockStored) -> None:
        p = self.block_size
        tokens = event.token_ids
        parent_id = event.parent_block_hash
        parent: Block | None = None
        foreign = event.lora_id is not None
        if parent_id is not None and not foreign:
            if parent_id in w.foreign:
                foreign = True
            else:
                parent = self._blocks.get(parent_id)
                if parent is None or worker not in parent.holders:
                    self._distrust(w, f"block {parent_id} used as a parent was never stored")
                    foreign = True  # cannot be placed: never matched
        data = page_bytes(tokens)
        step = p * TOKEN_BYTES
        for i, block_id in enumerate(event.block_hashes):
            page = data[i * step : (i + 1) * step]
            if not foreign:
                block = self._place(block_id, page, parent)
                if block is None:
                    foreign = True
                else:
                    block.holders.add(worker)
                    w.blocks.add(block_id)
                    parent = block
            if foreign:
                w.foreign.add(block_id)
        if len(w.blocks) + len(w.foreign) > self.max_blocks:
            self._clear(worker)
            self._distrust(
                w, f"more than {self.max_blocks} blocks: removals were missed (picture dropped)"
            )

    def _place(self, block_id: int, page: Page, parent: Block | None) -> Block | None:
        """The block for this id under `parent`, created if new; None if the id is not the
        SGLang chain of (parent, page) — a namespaced (foreign) block."""
        children = self._roots if parent is None else parent.children
        block = children.get(page)
        if block is not None:
            return block if block.block_id == block_id else None
        prior = parent.digest if parent else b""
        digest = sha256(prior + page).digest()  # the page is its tokens as uint32 LE
        if int.from_bytes(digest[:8], "big", signed=True) != block_id:
            return None
        block = Block(block_id, digest, page, parent)
        children[page] = block
        self._blocks[block_id] = block
        return block

    def _remove(self, worker: str, w: _Worker, ids: Iterable[int]) -> None:
        for block_id in ids:
            if block_id in w.foreign:
                w.foreign.discard(block_id)
            elif block_id in w.blocks:
                w.blocks.discard(block_id)
                block = self._blocks[block_id]
                block.holders.discard(worker)
                self._unlink(block)
            else:
                self._distrust(w, f"removal of block {block_id}, never stored")

    def _unlink(self, block: Block | None) -> None:
        """Drop blocks nobody holds and nothing hangs under, walking up."""
        while block is not None and not block.holders and not block.children:
            parent = block.parent
            siblings = self._roots if parent is None else parent.children
            del siblings[block.page]
            del self._blocks[block.block_id]
            block = parent

    def _clear(self, worker: str) -> None:
        w = self._workers[worker]
        for block_id in w.blocks:
            block = self._blocks[block_id]
            block.holders.discard(worker)
        for block_id in w.blocks:
            left = self._blocks.get(block_id)  # None: unlinked with a child already
            if left is not None:
                self._unlink(left)
        w.blocks = set()
        w.foreign = set()

    def _restart(self, worker: str, reason: str) -> None:
        w = self._workers[worker]
        self._clear(worker)
        w.pending.clear()
        w.live_seq = None
        s = w.status
        s.last_seq = None
        s.replaying_from = None
        w.whole, w.why = False, reason

    @staticmethod
    def _distrust(w: _Worker, reason: str) -> None:
        # the first real reason is the one shown until trust returns
        if w.whole or w.why in (NO_EVENTS, RESTARTED):
            w.whole, w.why = False, reason
