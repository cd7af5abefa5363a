"""Approximate radix tree shared by all workers ("tenants") of the router.

One compressed radix tree holds the routing keys sent to every worker. Each node records which
tenants hold it and when each last touched it, so one walk answers "how long a prefix of this key
does each worker probably have cached". Keys are `str` (character-level routing) or `array('I')`
of token ids (token-level routing: 4 bytes a token, where a tuple of ints costs ~36); the same
code serves both, but one tree holds one kind.

    insert("hello world", "w0", t=1); insert("hello there", "w1", t=2); insert("help", "w1", t=3)

    (root)
      └─ "hel"            {w0: 1, w1: 3}
           ├─ "lo "       {w0: 1, w1: 2}
           │    ├─ "world"  {w0: 1}
           │    └─ "there"  {w1: 2}
           └─ "p"         {w1: 3}

    match("hello there!") -> {"w0": 6, "w1": 11}

Invariants (checked by the property tests against a brute-force reference):
- a tenant holding a node holds all its ancestors, with touch times no older than the node's;
- `size(t)` is the sum of the label lengths of the nodes `t` holds; `total_size` the sum over
  all nodes; a node that no tenant holds is freed at once.

Eviction removes least recently used *leaves* until the size fits; a parent becomes a leaf once
its last child is gone.
- `evict_global` (the whole tree, whoever holds it) never walks the tree: the leaves are kept in
  a doubly linked list ordered by last touch (a touched leaf moves to the newest end, O(1) since
  time only moves forward; a parent that becomes a leaf is placed by its time, walking at most
  `PLACE_WALK` links from either end, so the order is exact but in rare cases). Each call drops
  the oldest leaves, at most `max_leaves` of them: the engine calls it on every request while
  the tree is over budget, so no call pauses the event loop for long (a few hundred leaves).
- `evict` (one tenant's share, in one call) walks that tenant's nodes and heaps its leaves,
  O(n log n) in the nodes it holds. `evict_step` does the same work in bounded steps that
  resume where the last one stopped: first the walk (the tenant's leaves pushed on a heap as
  they are found), then the eviction; a step looks at about `max_work` nodes at most (children
  scanned included; one node's children are scanned whole; a node dropped counts `DROP_WORK`:
  dropping one updates a dozen maps). The tree may change between steps:
  a leaf touched since it was pushed goes back with its new time, a node dropped meanwhile is
  skipped, and nodes created meanwhile are new, so not what LRU evicts first. The engine
  takes one step per request of the worker.
The global budget bounds the router's memory whatever the number of workers (sgl-router's
per-worker budget did not), in key elements (`total_size`) and in bytes (`memory`: an estimate
of what the tree's objects cost, `NODE_BYTES` a node, `TENANT_BYTES` a tenant entry, and the
labels; measured in benchmarks/bench_core.py).

Layout: no object per node. A node is an integer id and its fields live in flat dicts keyed by
it (label, parent, touch time, tenant bit set; a child is found by `parent << 33 | first
element`, siblings and the leaf list are links between ids; a tenant's touch time is keyed by
`node << 16 | tenant index`). Every key and value is an int, a float, a str or bytes (token
labels are stored as their bytes), so none of these dicts is tracked by CPython's cyclic garbage
collector: a full collection costs the same with an empty tree and with millions of nodes, and
there are no reference cycles, so a dropped tree is freed by reference counting alone (before,
each node was an object in the collector's lists and a full collection walked all of them, up to
224 ms at the budget). Freed ids are reused (kept in an `array`).

Time is a parameter (`now`), never read from a clock; there are no locks: one event loop owns it.
"""

from __future__ import annotations

import heapq
import math
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar, Union

# Union: `array` is not subscriptable at run time in Python 3.11, so the alias quotes it
Key = Union[str, "array[int]"]
KeyLike = Union[str, Sequence[int], "array[int]"]
Data = str | bytes  # a key or label as stored: characters, or token ids' bytes

# Bytes the estimate charges (CPython 3.11, 64-bit; fitted in benchmarks/bench_core.py):
NODE_BYTES: Final = (
    700  # a node's entries in the tree's maps (keys, slots), its id and its touch time
)
TENANT_BYTES: Final = 150  # one tenant's hold on a node: its keyed touch time (key, slot, float)
STR_BYTES: Final = 49  # a str label's header (ASCII: 1 byte a character, else up to 4)
ARRAY_BYTES: Final = 64  # a token label's header (4 bytes a token)
PLACE_WALK: Final = 64  # links walked to place a node in the leaf list by its time
DROP_WORK: Final = 4  # what dropping a node costs `evict_step`, in nodes looked at

ROOT: Final = 0  # the root's id
LEAVES: Final = (
    1  # the leaf list's sentinel: its `newer` is the oldest leaf, its `older` the newest
)
CHILD_SHIFT: Final = (
    33  # child key: parent << 33 | first element (tokens < 2**32, flagged by bit 32)
)
TOKEN_FLAG: Final = 1 << 32  # set in a token's element so that a token never matches a character
TENANT_SHIFT: Final = 16  # tenant-time key: node << 16 | tenant index
MAX_TENANTS: Final = 1 << TENANT_SHIFT
HOLDERS_MEMO: Final = 4096  # bit sets whose tenant names are remembered (cleared when full)
SHARDS: Final = 256  # dicts per map (a power of two)
SHARD: Final = SHARDS - 1  # the id bits that choose a shard

V = TypeVar("V")


def normalize_key(key: KeyLike) -> Key:
    """Strings stay strings; any sequence of ints becomes an `array('I')` (compact, sliceable
    and comparable)."""
    if isinstance(key, str):
        return key
    if isinstance(key, array) and key.typecode == "I":
        return key
    return array("I", key)


def _data(key: Key) -> Data:
    return key if isinstance(key, str) else key.tobytes()


def _key(data: Data) -> Key:
    if isinstance(data, str):
        return data
    tokens = array("I")
    tokens.frombytes(data)
    return tokens


def _width(data: Data) -> int:
    """Storage units per key element: 1 for characters, 4 for token ids."""
    return 1 if isinstance(data, str) else 4


def _element(data: Data, pos: int) -> int:
    """The key element at storage position `pos`, as a child key's low bits."""
    if isinstance(data, str):
        return ord(data[pos])
    return int.from_bytes(data[pos : pos + 4], "little") | TOKEN_FLAG


def label_bytes(label: Key) -> int:
    """What a label costs in the memory estimate."""
    if isinstance(label, str):
        return STR_BYTES + (len(label) if label.isascii() else 4 * len(label))
    return ARRAY_BYTES + 4 * len(label)


def _data_bytes(data: Data) -> int:
    """`label_bytes` of a stored label."""
    if isinstance(data, str):
        return STR_BYTES + (len(data) if data.isascii() else 4 * len(data))
    return ARRAY_BYTES + len(data)


def common_length(key: Data | Key, pos: int, label: Data | Key) -> int:
    """Length of the common prefix of `key[pos:]` and `label`, in O(that length) element copies.

    The full comparison comes first (the common case: a whole shared system prompt); on a
    mismatch, gallop then bisect, comparing only the segment not yet known to be equal.
    """
    n = min(len(label), len(key) - pos)
    if key[pos : pos + n] == label[:n]:
        return n
    known, step = 0, 1  # key[pos:pos+known] == label[:known]; they differ somewhere before n
    while known + step < n and key[pos + known : pos + known + step] == label[known : known + step]:
        known += step
        step *= 2
    high = min(known + step, n)  # the first difference lies in [known, high)
    while high - known > 1:
        mid = (known + high) // 2
        if key[pos + known : pos + mid] == label[known:mid]:
            known = mid
        else:
            high = mid
    return known


def _common_at(data: Data, pos: int, label: Data) -> int:
    """`common_length` in whole elements (storage units), the whole-label match answered
    without copying (the hot path)."""
    if data.startswith(label, pos):  # type: ignore[arg-type]
        return len(label)
    common = common_length(data, pos, label)
    return common if isinstance(data, str) else common - common % 4


def _bits(mask: int) -> list[int]:
    """The indices of the bits set in `mask`, lowest first."""
    found = []
    while mask:
        low = mask & -mask
        found.append(low.bit_length() - 1)
        mask ^= low
    return found


class _Map(Generic[V]):
    """A map from ints in `SHARDS` dicts, chosen by bits of the key (`(key >> shift) % SHARDS`:
    the node id's low bits). Why: a dict of millions of entries copies all of them when it grows
    or compacts its deleted slots (tens of ms, every few hundred thousand inserts, even at the
    budget); a shard copies 1/256 of that."""

    __slots__ = ("_shards", "_shift")

    def __init__(self, shift: int = 0) -> None:
        self._shards: list[dict[int, V]] = [{} for _ in range(SHARDS)]
        self._shift = shift

    def __getitem__(self, key: int) -> V:
        return self._shards[(key >> self._shift) & SHARD][key]

    def __setitem__(self, key: int, value: V) -> None:
        self._shards[(key >> self._shift) & SHARD][key] = value

    def __delitem__(self, key: int) -> None:
        del self._shards[(key >> self._shift) & SHARD][key]

    def __contains__(self, key: int) -> bool:
        return key in self._shards[(key >> self._shift) & SHARD]

    def get(self, key: int) -> V | None:
        return self._shards[(key >> self._shift) & SHARD].get(key)

    def pop(self, key: int) -> V | None:
        return self._shards[(key >> self._shift) & SHARD].pop(key, None)

    def take(self, key: int) -> V:
        return self._shards[(key >> self._shift) & SHARD].pop(key)


class _Eviction:
    """One tenant's eviction in progress (`RadixTree.evict_step`)."""

    __slots__ = ("draining", "heap", "stack")

    def __init__(self, stack: list[int]) -> None:
        self.stack = stack  # nodes still to walk
        self.heap: list[tuple[float, int]] = []  # its leaves found (time, node), oldest first
        self.draining = False  # done: the heap is being freed, a slice per step


class Path:
    """One walk of a key: the nodes it entered, the storage position reached in each, and per
    tenant the longest prefix of the key it holds (its deepest node on the path), in elements."""

    __slots__ = ("data", "ends", "key", "matched", "nodes", "version")

    def __init__(
        self,
        key: Key,
        data: Data,
        nodes: list[int],
        ends: list[int],
        matched: dict[str, int],
        version: int,
    ) -> None:
        self.key = key
        self.data = data
        self.nodes = nodes
        self.ends = ends
        self.matched = matched
        self.version = version


@dataclass(frozen=True, slots=True)
class Branch:
    """A read-only view of one node for inspection: what it holds and who holds it."""

    label: Key
    prefix_length: int  # key elements before this node's label
    tenants: tuple[tuple[str, float], ...]  # (tenant, last touch), most recent first
    subtree_size: int  # key elements in this node and everything below it
    children: tuple[Branch, ...]
    hidden_children: int  # children left out by `top`


class RadixTree:
    """The shared approximate tree; see the module docstring."""

    def __init__(self) -> None:
        self._label: _Map[Data] = _Map()
        self._parent: _Map[int] = _Map()
        # parent << CHILD_SHIFT | first element -> child
        self._child: _Map[int] = _Map(CHILD_SHIFT)
        self._first: _Map[int] = _Map()  # a node's first child (none: a leaf)
        self._next: _Map[int] = _Map()  # siblings, both ways
        self._prev: _Map[int] = _Map()
        self._touched: _Map[float] = _Map()
        self._mask: _Map[int] = _Map()  # bit i: tenant index i holds the node
        # node << TENANT_SHIFT | index -> its last touch
        self._times: _Map[float] = _Map(TENANT_SHIFT)
        self._older: _Map[int] = _Map()  # the leaf list (leaves only)
        self._newer: _Map[int] = _Map()
        self._label[ROOT] = ""
        self._touched[ROOT] = self._touched[LEAVES] = -math.inf
        self._mask[ROOT] = 0
        self._older[LEAVES] = self._newer[LEAVES] = LEAVES
        self._free = array("q")  # freed ids, reused before new ones
        self._next_id = 2
        self._index: dict[str, int] = {}  # tenant -> its bit
        self._names: dict[int, str] = {}
        self._free_indices: list[int] = []
        self._holders: dict[int, list[str]] = {}  # memo: bit set -> tenant names
        self._sizes: dict[str, int] = {}
        self._total = 0
        self._nodes = 0
        self._memory = 0
        self.evicted_leaves = 0  # leaves `evict_global` has dropped (for statistics)
        self._evictions: dict[str, _Eviction] = {}  # per tenant: `evict_step` in progress
        self._version = 0  # changes whenever nodes are created or freed (invalidates paths)

    # -- reading ---------------------------------------------------------------------------

    def walk(self, key: KeyLike) -> Path:
        """Follow `key` down the tree once; the path answers `matches()` and feeds `insert_at`."""
        key = normalize_key(key)
        data = _data(key)
        width = _width(data)
        nodes: list[int] = []
        ends: list[int] = []
        matched: dict[str, int] = {}
        children, labels, masks = self._child, self._label, self._mask
        node, pos, end = ROOT, 0, len(data)
        while pos < end:
            child = children.get(node << CHILD_SHIFT | _element(data, pos))
            if child is None:
                break
            label = labels[child]
            common = _common_at(data, pos, label)
            pos += common
            nodes.append(child)
            ends.append(pos)
            # Deeper nodes overwrite: a tenant's deepest held node on the path is its match.
            matched.update(dict.fromkeys(self._holder_names(masks[child]), pos // width))
            if common < len(label):
                break
            node = child
        return Path(key, data, nodes, ends, matched, self._version)

    def recent_match(self, path: Path, tenant: str, since: float) -> int:
        """Key elements of the walked key that `tenant` holds in nodes it touched at `since` or
        later: a prefix routed there recently (touch times never decrease toward the root)."""
        index = self._index.get(tenant)
        if index is None:
            return 0
        if path.version != self._version:
            path = self.walk(path.key)
        times = self._times
        held = 0
        for node, end in zip(path.nodes, path.ends):
            touched = times.get(node << TENANT_SHIFT | index)
            if touched is None or touched < since:
                break
            held = end
        return held // _width(path.data)

    def match(self, key: KeyLike) -> dict[str, int]:
        """For every tenant holding a prefix of `key`, the length of its longest one."""
        return self.walk(key).matched

    def size(self, tenant: str) -> int:
        """Key elements held by `tenant` (sum of the label lengths of its nodes)."""
        return self._sizes.get(tenant, 0)

    @property
    def total_size(self) -> int:
        """Key elements stored in the tree, each counted once however many tenants hold it."""
        return self._total

    @property
    def node_count(self) -> int:
        return self._nodes

    @property
    def memory(self) -> int:
        """Estimated bytes of the tree's objects (see the module docstring)."""
        return self._memory

    def lru_leaves(self) -> list[tuple[Key, float]]:
        """Every leaf's label and last touch, oldest first: the global eviction order."""
        found = []
        node = self._newer[LEAVES]
        while node != LEAVES:
            found.append((_key(self._label[node]), self._touched[node]))
            node = self._newer[node]
        return found

    def tenants(self) -> list[str]:
        return [tenant for tenant, size in self._sizes.items() if size > 0]

    def held_keys(self, tenant: str) -> list[tuple[Key, float]]:
        """The whole keys ending at `tenant`'s leaves, with their touch times (for inspection)."""
        index = self._index.get(tenant)
        if index is None:
            return []
        found: list[tuple[Key, float]] = []
        stack: list[tuple[int, Data]] = [
            (c, self._label[c]) for c in self._held_children(ROOT, index)
        ]
        while stack:
            node, data = stack.pop()
            held = self._held_children(node, index)
            if not held:
                found.append((_key(data), self._times[node << TENANT_SHIFT | index]))
            stack.extend((c, _concat(data, self._label[c])) for c in held)
        return found

    # -- writing ---------------------------------------------------------------------------

    def insert(self, key: KeyLike, tenant: str, now: float) -> float | None:
        """Record that `tenant` holds `key`, touched at `now`.

        Returns when `tenant` last touched the deepest part of `key` it already held (None if it
        held none of it): the engine uses it to tell confirmed predictions from speculative ones.
        """
        return self.insert_at(self.walk(key), tenant, now)

    def insert_at(self, path: Path, tenant: str, now: float) -> float | None:
        """`insert` along a path walked before, without walking again if the tree is unchanged."""
        if path.version != self._version:
            path = self.walk(path.key)
        index = self._tenant_index(tenant)
        bit = 1 << index
        width = _width(path.data)
        times, masks, touched_at = self._times, self._mask, self._touched
        prior: float | None = None
        node, pos = ROOT, 0
        for entered, end in zip(path.nodes, path.ends):
            whole = end - pos == len(self._label[entered])
            child = entered if whole else self._split(entered, end - pos)
            slot = child << TENANT_SHIFT | index
            touched = times.get(slot)
            if touched is None:
                self._sizes[tenant] += len(self._label[child]) // width
                times[slot] = now
                masks[child] |= bit
                self._memory += TENANT_BYTES
            else:
                prior = touched
                if now > touched:  # keeps ancestors no older than descendants
                    times[slot] = now
            if now > touched_at[child]:
                touched_at[child] = now
                if child not in self._first:
                    self._unlink(child)
                    self._place(child)
            node, pos = child, end
        if pos < len(path.data):
            self._attach(node, path.data[pos:], tenant, index, now)
        return prior

    def retract(self, key: KeyLike, tenant: str, keep: int) -> int:
        """Undo a speculative `insert` of `key` for `tenant` (its request failed): `tenant` stops
        holding the nodes on `key`'s path that begin at or after position `keep` (what it held
        before), deepest first, as long as it holds none of their children (another of its keys
        goes on through them). Touch times are not restored. Returns the elements dropped."""
        index = self._index.get(tenant)
        if index is None:
            return 0
        path = self.walk(key)
        keep *= _width(path.data)
        before = self._sizes.get(tenant, 0)
        starts = [0, *path.ends[:-1]]
        for node, start, end in reversed(list(zip(path.nodes, starts, path.ends))):
            whole = end - start == len(self._label[node])  # the key runs through the whole label
            if start < keep or not whole or not self._mask[node] >> index & 1:
                break
            if self._holds_a_child(node, index):
                break
            self._drop(node, index)
        return before - self._sizes.get(tenant, 0)

    def remove_tenant(self, tenant: str) -> int:
        """Forget everything `tenant` holds; returns the key elements it held."""
        self._evictions.pop(tenant, None)
        held = self._sizes.get(tenant, 0)
        index = self._index.get(tenant)
        if index is not None:
            for node in reversed(list(self._held_nodes(index))):  # children before parents
                self._drop(node, index)
            del self._index[tenant], self._names[index]
            self._free_indices.append(index)
            self._holders.clear()
        self._sizes.pop(tenant, None)
        return held

    def evict_step(self, tenant: str, max_size: int, max_work: int) -> int:
        """One bounded step of `evict(tenant, max_size)` (see the module docstring); returns
        the key elements it removed. `evicting(tenant)` tells whether work is left."""
        before = self.size(tenant)
        job = self._evictions.get(tenant)
        if job is not None and job.draining:  # freeing a finished heap costs time too
            del job.heap[-max_work:]
            if not job.heap:
                del self._evictions[tenant]
            return 0
        if before <= max_size:
            if job is not None:
                self._finish(tenant, job)
            return 0
        index = self._index[tenant]
        if job is None:
            job = _Eviction(self._held_children(ROOT, index))
            self._evictions[tenant] = job
        work = self._find_leaves(job, index, max_work)
        if job.stack:
            return 0
        times, heap = self._times, job.heap
        while heap and self._sizes[tenant] > max_size and work < max_work:
            touched, node = heapq.heappop(heap)
            work += 1
            now = times.get(node << TENANT_SHIFT | index)
            if now is None:
                continue  # dropped
            holds, looked = self._first_held(node, index)
            work += looked
            if holds:
                continue  # no longer one of its leaves
            if now != touched:  # touched again since: back in line at its new time
                heapq.heappush(heap, (now, node))
                continue
            parent = self._parent[node]
            self._drop(node, index)
            work += DROP_WORK
            if parent == ROOT or not self._mask[parent] >> index & 1:
                continue
            holds, looked = self._first_held(parent, index)
            work += looked
            if not holds:
                heapq.heappush(heap, (times[parent << TENANT_SHIFT | index], parent))
        if not heap or self._sizes[tenant] <= max_size:
            self._finish(tenant, job)
        return before - self._sizes[tenant]

    def _find_leaves(self, job: _Eviction, index: int, max_work: int) -> int:
        """The walk of `evict_step`: the tenant's leaves pushed on the heap as they are found;
        returns the work done."""
        times = self._times
        work = 0
        stack, heap = job.stack, job.heap
        while stack and work < max_work:
            node = stack.pop()
            touched = times.get(node << TENANT_SHIFT | index)
            if touched is None:
                work += 1
                continue  # dropped since it was stacked
            held, children = self._scan(node, index)
            work += 1 + children  # the children are looked at
            if held:
                stack.extend(held)
            else:
                heapq.heappush(heap, (touched, node))
        return work

    def _finish(self, tenant: str, job: _Eviction) -> None:
        """The eviction is over; what is left of its heap is freed over the next steps."""
        job.stack.clear()
        job.draining = True
        if not job.heap:
            del self._evictions[tenant]

    def evicting(self, tenant: str) -> bool:
        """An `evict_step` eviction of `tenant` has work left (freeing its heap included)."""
        return tenant in self._evictions

    def evict(self, tenant: str, max_size: int) -> int:
        """Drop `tenant`'s least recently used leaves until it holds <= `max_size` elements, in
        one call: `evict_step` with no bound on its work (a step that only frees a finished
        eviction's heap is followed by the real one)."""
        removed = 0
        while True:
            removed += self.evict_step(tenant, max_size, sys.maxsize)
            if not self.evicting(tenant):
                return removed

    def evict_global(
        self, max_total: int, max_memory: int | None = None, max_leaves: int | None = None
    ) -> int:
        """Drop the least recently used leaves, whoever holds them, until the tree holds at
        most `max_total` elements and `max_memory` bytes — or `max_leaves` leaves are gone."""
        before = self._total
        dropped = 0
        while self._total > max_total or (max_memory is not None and self._memory > max_memory):
            leaf = self._newer[LEAVES]
            if leaf == LEAVES:
                break
            if max_leaves is not None and dropped >= max_leaves:
                break
            self._free_leaf(leaf)
            dropped += 1
        self.evicted_leaves += dropped
        return before - self._total

    # -- inspection ------------------------------------------------------------------------

    def branches(self, depth: int, top: int, tenant: str | None = None) -> tuple[Branch, ...]:
        """The `top` largest branches per level, `depth` levels deep (optionally one tenant's)."""
        if tenant is not None and tenant not in self._index:
            return ()
        sizes = self._subtree_sizes(tenant)
        return self._branches_of(ROOT, 0, depth, top, sizes)

    def _records(self) -> list[tuple[Key, float, dict[str, float], bool]]:
        """Every node as (label, last touch, tenants' touches, is a leaf): for tests."""
        return [
            (
                _key(self._label[node]),
                self._touched[node],
                self._tenant_times(node),
                node not in self._first,
            )
            for node in self._all_nodes()
        ]

    # -- internals -------------------------------------------------------------------------

    def _tenant_index(self, tenant: str) -> int:
        index = self._index.get(tenant)
        if index is not None:
            return index
        if self._free_indices:
            index = self._free_indices.pop()
        else:
            index = len(self._index)
            if index >= MAX_TENANTS:
                raise ValueError(f"the tree holds at most {MAX_TENANTS} tenants")
        self._index[tenant] = index
        self._names[index] = tenant
        self._sizes.setdefault(tenant, 0)
        self._holders.clear()
        return index

    def _holder_names(self, mask: int) -> list[str]:
        names = self._holders.get(mask)
        if names is None:
            if len(self._holders) >= HOLDERS_MEMO:
                self._holders.clear()
            names = [self._names[i] for i in _bits(mask)]
            self._holders[mask] = names
        return names

    def _tenant_times(self, node: int) -> dict[str, float]:
        return {
            self._names[i]: self._times[node << TENANT_SHIFT | i] for i in _bits(self._mask[node])
        }

    def _new_id(self) -> int:
        if self._free:
            return self._free.pop()
        node = self._next_id
        self._next_id += 1
        return node

    # The sibling walks below read the shards directly: they run once per child on eviction.

    def _children(self, node: int) -> list[int]:
        nexts = self._next._shards
        found = []
        child = self._first._shards[node & SHARD].get(node)
        while child is not None:
            found.append(child)
            child = nexts[child & SHARD].get(child)
        return found

    def _held_children(self, node: int, index: int) -> list[int]:
        return self._scan(node, index)[0]

    def _scan(self, node: int, index: int) -> tuple[list[int], int]:
        """The children tenant `index` holds, and how many children there are."""
        nexts, masks = self._next._shards, self._mask._shards
        found = []
        count = 0
        child = self._first._shards[node & SHARD].get(node)
        while child is not None:
            count += 1
            if masks[child & SHARD][child] >> index & 1:
                found.append(child)
            child = nexts[child & SHARD].get(child)
        return found, count

    def _holds_a_child(self, node: int, index: int) -> bool:
        return self._first_held(node, index)[0]

    def _first_held(self, node: int, index: int) -> tuple[bool, int]:
        """Whether tenant `index` holds a child, and how many children were looked at."""
        nexts, masks = self._next._shards, self._mask._shards
        looked = 0
        child = self._first._shards[node & SHARD].get(node)
        while child is not None:
            looked += 1
            if masks[child & SHARD][child] >> index & 1:
                return True, looked
            child = nexts[child & SHARD].get(child)
        return False, looked

    def _link_child(self, parent: int, child: int) -> None:
        """Add `child` (its label set) to `parent`'s children, first in the sibling list."""
        self._child[parent << CHILD_SHIFT | _element(self._label[child], 0)] = child
        self._parent[child] = parent
        first = self._first.get(parent)
        if first is not None:
            self._next[child] = first
            self._prev[first] = child
        self._first[parent] = child

    def _unlink_child(self, parent: int, child: int) -> None:
        del self._child[parent << CHILD_SHIFT | _element(self._label[child], 0)]
        before = self._prev.pop(child)
        after = self._next.pop(child)
        if before is None:
            if after is None:
                del self._first[parent]
            else:
                self._first[parent] = after
        elif after is None:
            del self._next[before]
        else:
            self._next[before] = after
        if after is not None:
            if before is None:
                del self._prev[after]
            else:
                self._prev[after] = before

    def _attach(self, parent: int, label: Data, tenant: str, index: int, now: float) -> None:
        if parent not in self._first and parent != ROOT:
            self._unlink(parent)  # no longer a leaf
        child = self._new_id()
        self._label[child] = label
        self._touched[child] = now
        self._mask[child] = 1 << index
        self._times[child << TENANT_SHIFT | index] = now
        self._link_child(parent, child)
        self._place(child)
        self._version += 1
        size = len(label) // _width(label)
        self._sizes[tenant] += size
        self._total += size
        self._nodes += 1
        self._memory += NODE_BYTES + TENANT_BYTES + _data_bytes(label)

    def _split(self, node: int, at: int) -> int:
        """Cut `node`'s label at storage position `at`; the new upper half keeps the tenants
        and touch times, and takes `node`'s place among its parent's children."""
        parent = self._parent[node]
        label = self._label[node]
        upper = self._new_id()
        # the upper half answers to the same child key and sits where `node` sat
        self._child[parent << CHILD_SHIFT | _element(label, 0)] = upper
        before = self._prev.pop(node)
        after = self._next.pop(node)
        if before is None:
            self._first[parent] = upper
        else:
            self._next[before] = upper
            self._prev[upper] = before
        if after is not None:
            self._prev[after] = upper
            self._next[upper] = after
        self._parent[upper] = parent
        self._label[upper] = label[:at]
        self._touched[upper] = self._touched[node]
        mask = self._mask[node]
        self._mask[upper] = mask
        for i in _bits(mask):
            self._times[upper << TENANT_SHIFT | i] = self._times[node << TENANT_SHIFT | i]
        self._label[node] = label[at:]
        self._link_child(upper, node)
        self._nodes += 1
        self._version += 1
        self._memory += (
            NODE_BYTES
            + TENANT_BYTES * len(_bits(mask))
            + _data_bytes(label[:at])
            + _data_bytes(label[at:])
            - _data_bytes(label)
        )
        return upper

    def _drop(self, node: int, index: int) -> None:
        """Remove tenant `index` from a node it holds and none of whose children it holds."""
        mask = self._mask[node] & ~(1 << index)
        if not mask:  # no tenant will hold it, so none holds a child: free it
            self._free_leaf(node)
            return
        self._mask[node] = mask
        del self._times[node << TENANT_SHIFT | index]
        label = self._label[node]
        self._sizes[self._names[index]] -= len(label) // _width(label)
        self._memory -= TENANT_BYTES
        newest = max(self._times[node << TENANT_SHIFT | i] for i in _bits(mask))
        if newest < self._touched[node]:
            self._touched[node] = newest
            if node not in self._first:
                self._unlink(node)
                self._place(node)

    def _free_leaf(self, node: int) -> None:
        """Remove a leaf and every tenant's hold on it."""
        parent = self._parent[node]
        assert node not in self._first
        label = self._label[node]
        size = len(label) // _width(label)
        held = _bits(self._mask.take(node))
        for i in held:
            self._sizes[self._names[i]] -= size
            del self._times[node << TENANT_SHIFT | i]
        self._memory -= NODE_BYTES + TENANT_BYTES * len(held) + _data_bytes(label)
        self._unlink_child(parent, node)
        self._unlink(node)
        del self._label[node], self._parent[node], self._touched[node]
        self._free.append(node)
        self._total -= size
        self._nodes -= 1
        self._version += 1
        if parent not in self._first and parent != ROOT:
            self._place(parent)  # a leaf now

    # -- the leaf list (see the module docstring) -----------------------------------------

    def _unlink(self, node: int) -> None:
        older = self._older.pop(node)
        if older is not None:
            newer = self._newer.take(node)
            self._newer[older] = newer
            self._older[newer] = older

    def _place(self, node: int) -> None:
        """Link a leaf in by its last touch: at the newest end in the common case."""
        when = self._touched[node]
        after = self._older[LEAVES]  # the newest leaf
        if after != LEAVES and self._touched[after] > when:
            after = self._find_older(when)
        newer = self._newer[after]
        self._older[node] = after
        self._newer[node] = newer
        self._older[newer] = node
        self._newer[after] = node

    def _find_older(self, when: float) -> int:
        """The leaf to link a leaf touched at `when` after: the newest one not newer than it,
        found from either end within `PLACE_WALK` links (else near the oldest end)."""
        touched = self._touched
        node = self._older[LEAVES]
        for _ in range(PLACE_WALK):
            if node == LEAVES or touched[node] <= when:
                return node
            node = self._older[node]
        node = LEAVES
        for _ in range(PLACE_WALK):
            following = self._newer[node]
            if following == LEAVES or touched[following] > when:
                return node
            node = following
        return node

    def _held_nodes(self, index: int) -> Iterator[int]:
        """Nodes tenant `index` holds, parents before children (held nodes are closed upward)."""
        stack = self._held_children(ROOT, index)
        while stack:
            node = stack.pop()
            yield node
            stack.extend(self._held_children(node, index))

    def _all_nodes(self) -> Iterator[int]:
        stack = self._children(ROOT)
        while stack:
            node = stack.pop()
            yield node
            stack.extend(self._children(node))

    def _subtree_sizes(self, tenant: str | None) -> dict[int, int]:
        nodes = list(self._all_nodes() if tenant is None else self._held_nodes(self._index[tenant]))
        sizes: dict[int, int] = {}
        for node in reversed(nodes):  # children before parents
            below = sum(sizes.get(child, 0) for child in self._children(node))
            label = self._label[node]
            sizes[node] = len(label) // _width(label) + below
        return sizes

    def _branches_of(
        self, node: int, prefix: int, depth: int, top: int, sizes: dict[int, int]
    ) -> tuple[Branch, ...]:
        if depth <= 0:
            return ()
        children = [c for c in self._children(node) if c in sizes]
        children.sort(key=lambda c: sizes[c], reverse=True)
        shown = children[:top]
        return tuple(self._branch(c, prefix, depth, top, sizes) for c in shown)

    def _branch(
        self, node: int, prefix: int, depth: int, top: int, sizes: dict[int, int]
    ) -> Branch:
        label = _key(self._label[node])
        end = prefix + len(label)
        visible = sum(1 for c in self._children(node) if c in sizes)
        children = self._branches_of(node, end, depth - 1, top, sizes)
        holders = sorted(self._tenant_times(node).items(), key=lambda item: item[1], reverse=True)
        return Branch(
            label=label,
            prefix_length=prefix,
            tenants=tuple(holders),
            subtree_size=sizes[node],
            children=children,
            hidden_children=visible - len(children),
        )


def _concat(head: Data, tail: Data) -> Data:
    if isinstance(head, str) and isinstance(tail, str):
        return head + tail
    assert isinstance(head, bytes) and isinstance(tail, bytes)
    return head + tail


def preview(label: Key, width: int = 48) -> str:
    """A one-line, escaped rendering of a label, shortened in the middle to `width` characters."""
    if isinstance(label, str):
        text = label.encode("unicode_escape").decode("ascii")
    else:
        text = " ".join(str(token) for token in label)
    if len(text) <= width:
        return text
    keep = max(width - 1, 2)
    head = (keep + 1) // 2
    return text[:head] + "…" + text[len(text) - (keep - head) :]


def iter_branches(branches: Iterable[Branch]) -> Iterator[Branch]:
    """Every branch of a `branches()` result, depth first."""
    for branch in branches:
        yield branch
        yield from iter_branches(branch.children)
