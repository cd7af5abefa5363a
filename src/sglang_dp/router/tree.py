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
  scanned included; one node's children are scanned whole). The tree may change between steps:
  a leaf touched since it was pushed goes back with its new time, a node dropped meanwhile is
  skipped, and nodes created meanwhile are new, so not what LRU evicts first. The engine
  takes one step per request of the worker.
The global budget bounds the router's memory whatever the number of workers (sgl-router's
per-worker budget did not), in key elements (`total_size`) and in bytes (`memory`: an estimate
of what the tree's objects cost, `NODE_BYTES` a node, `TENANT_BYTES` a tenant entry, and the
labels; measured in benchmarks/bench_core.py).

Time is a parameter (`now`), never read from a clock; there are no locks: one event loop owns it.
"""

from __future__ import annotations

import heapq
import itertools
import math
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Union

# Union: `array` is not subscriptable at run time in Python 3.11, so the alias quotes it
Key = Union[str, "array[int]"]
KeyLike = Union[str, Sequence[int], "array[int]"]

# Bytes the estimate charges (CPython 3.11, 64-bit; fitted in benchmarks/bench_core.py):
NODE_BYTES = 420  # the node object and its two dicts (children, tenants), the map entry to it
TENANT_BYTES = 60  # one tenant entry of a node: its slot in the dict and its time (a float)
STR_BYTES = 49  # a str label's header (ASCII: 1 byte a character, else up to 4)
ARRAY_BYTES = 64  # an array('I') label's header (4 bytes a token)
PLACE_WALK = 64  # links walked to place a node in the leaf list by its time


def normalize_key(key: KeyLike) -> Key:
    """Strings stay strings; any sequence of ints becomes an `array('I')` (compact, sliceable
    and comparable)."""
    if isinstance(key, str):
        return key
    if isinstance(key, array) and key.typecode == "I":
        return key
    return array("I", key)


class _Node:
    __slots__ = ("children", "label", "newer", "older", "parent", "tenants", "touched")

    def __init__(
        self, label: Key, parent: _Node | None, tenants: dict[str, float], touched: float
    ) -> None:
        self.label = label
        self.parent = parent
        self.tenants = tenants
        self.touched = touched  # the latest touch by any tenant
        self.children: dict[str | int, _Node] = {}
        # neighbours in the leaf list (leaves only; None otherwise: a self-link would be a
        # reference cycle, left for the garbage collector when the node is freed)
        self.older: _Node | None = None
        self.newer: _Node | None = None


def label_bytes(label: Key) -> int:
    """What a label costs in the memory estimate."""
    if isinstance(label, str):
        return STR_BYTES + (len(label) if label.isascii() else 4 * len(label))
    return ARRAY_BYTES + 4 * len(label)


def common_length(key: Key, pos: int, label: Key) -> int:
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


def _common_at(key: Key, pos: int, label: Key) -> int:
    """`common_length` with the whole-label match answered without copying (the hot path)."""
    if isinstance(key, str):
        if key.startswith(label, pos):  # type: ignore[arg-type]
            return len(label)
    elif key[pos : pos + len(label)] == label:
        return len(label)
    return common_length(key, pos, label)


class _Eviction:
    """One tenant's eviction in progress (`RadixTree.evict_step`)."""

    __slots__ = ("draining", "heap", "stack")

    def __init__(self, stack: list[_Node]) -> None:
        self.stack = stack  # nodes still to walk
        self.heap: list[tuple[float, int, _Node]] = []  # its leaves found, oldest first
        self.draining = False  # done: the heap is being freed, a slice per step


class Path:
    """One walk of a key: the nodes it entered, the key position reached in each, and per
    tenant the longest prefix of the key it holds (its deepest node on the path)."""

    __slots__ = ("ends", "key", "matched", "nodes", "version")

    def __init__(
        self, key: Key, nodes: list[_Node], ends: list[int], matched: dict[str, int], version: int
    ) -> None:
        self.key = key
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
        self._root = _Node("", None, {}, -math.inf)
        self._leaves = _Node("", None, {}, -math.inf)  # the leaf list's sentinel: oldest next
        self._leaves.older = self._leaves.newer = self._leaves
        self._sizes: dict[str, int] = {}
        self._total = 0
        self._nodes = 0
        self._memory = 0
        self.evicted_leaves = 0  # leaves `evict_global` has dropped (for statistics)
        self._evictions: dict[str, _Eviction] = {}  # per tenant: `evict_step` in progress
        self._seq = itertools.count()  # heap tie-breaker: nodes are not comparable
        self._version = 0  # changes whenever nodes are created or freed (invalidates paths)

    # -- reading ---------------------------------------------------------------------------

    def walk(self, key: KeyLike) -> Path:
        """Follow `key` down the tree once; the path answers `matches()` and feeds `insert_at`."""
        key = normalize_key(key)
        nodes: list[_Node] = []
        ends: list[int] = []
        matched: dict[str, int] = {}
        node, pos, end = self._root, 0, len(key)
        while pos < end:
            child = node.children.get(key[pos])
            if child is None:
                break
            common = _common_at(key, pos, child.label)
            pos += common
            nodes.append(child)
            ends.append(pos)
            # Deeper nodes overwrite: a tenant's deepest held node on the path is its match.
            matched.update(dict.fromkeys(child.tenants, pos))
            if common < len(child.label):
                break
            node = child
        return Path(key, nodes, ends, matched, self._version)

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
        node = self._leaves.newer
        while node is not None and node is not self._leaves:
            found.append((node.label, node.touched))
            node = node.newer
        return found

    def tenants(self) -> list[str]:
        return [tenant for tenant, size in self._sizes.items() if size > 0]

    def held_keys(self, tenant: str) -> list[tuple[Key, float]]:
        """The whole keys ending at `tenant`'s leaves, with their touch times (for inspection)."""
        found: list[tuple[Key, float]] = []
        stack: list[tuple[_Node, Key]] = [
            (c, c.label) for c in self._root.children.values() if tenant in c.tenants
        ]
        while stack:
            node, key = stack.pop()
            held = [c for c in node.children.values() if tenant in c.tenants]
            if not held:
                found.append((key, node.tenants[tenant]))
            stack.extend((c, _concat(key, c.label)) for c in held)
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
        prior: float | None = None
        node, pos = self._root, 0
        for entered, end in zip(path.nodes, path.ends):
            child = entered if end - pos == len(entered.label) else self._split(entered, end - pos)
            touched = child.tenants.get(tenant)
            if touched is None:
                self._sizes[tenant] = self._sizes.get(tenant, 0) + len(child.label)
                child.tenants[tenant] = now
                self._memory += TENANT_BYTES
            else:
                prior = touched
                if now > touched:  # keeps ancestors no older than descendants
                    child.tenants[tenant] = now
            if now > child.touched:
                child.touched = now
                if not child.children:
                    self._unlink(child)
                    self._place(child)
            node, pos = child, end
        if pos < len(path.key):
            self._attach(node, path.key[pos:], tenant, now)
        return prior

    def retract(self, key: KeyLike, tenant: str, keep: int) -> int:
        """Undo a speculative `insert` of `key` for `tenant` (its request failed): `tenant` stops
        holding the nodes on `key`'s path that begin at or after position `keep` (what it held
        before), deepest first, as long as it holds none of their children (another of its keys
        goes on through them). Touch times are not restored. Returns the elements dropped."""
        path = self.walk(key)
        before = self._sizes.get(tenant, 0)
        starts = [0, *path.ends[:-1]]
        for node, start, end in reversed(list(zip(path.nodes, starts, path.ends))):
            whole = end - start == len(node.label)  # the key runs through the whole label
            if start < keep or not whole or tenant not in node.tenants:
                break
            if self._holds_a_child(node, tenant):
                break
            self._drop(node, tenant)
        return before - self._sizes.get(tenant, 0)

    def remove_tenant(self, tenant: str) -> int:
        """Forget everything `tenant` holds; returns the key elements it held."""
        self._evictions.pop(tenant, None)
        held = self._sizes.get(tenant, 0)
        for node in reversed(list(self._held_nodes(tenant))):  # children before parents
            self._drop(node, tenant)
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
        if job is None:
            job = _Eviction([c for c in self._root.children.values() if tenant in c.tenants])
            self._evictions[tenant] = job
        work = 0
        stack, heap = job.stack, job.heap
        while stack and work < max_work:  # the walk: find the tenant's leaves
            node = stack.pop()
            work += 1 + len(node.children)  # the children are looked at
            touched = node.tenants.get(tenant)
            if touched is None:
                continue  # dropped since it was stacked
            held = [c for c in node.children.values() if tenant in c.tenants]
            if held:
                stack.extend(held)
            else:
                heapq.heappush(heap, (touched, next(self._seq), node))
        if stack:
            return 0
        while heap and self._sizes[tenant] > max_size and work < max_work:
            touched, _, node = heapq.heappop(heap)
            work += 1 + len(node.children)
            now = node.tenants.get(tenant)
            if now is None or self._holds_a_child(node, tenant):
                continue  # dropped, or no longer one of its leaves
            if now != touched:  # touched again since: back in line at its new time
                heapq.heappush(heap, (now, next(self._seq), node))
                continue
            parent = node.parent
            self._drop(node, tenant)
            if parent is None or parent is self._root or tenant not in parent.tenants:
                continue
            work += len(parent.children)
            if not self._holds_a_child(parent, tenant):
                heapq.heappush(heap, (parent.tenants[tenant], next(self._seq), parent))
        if not heap or self._sizes[tenant] <= max_size:
            self._finish(tenant, job)
        return before - self._sizes[tenant]

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
        sentinel = self._leaves
        while self._total > max_total or (max_memory is not None and self._memory > max_memory):
            leaf = sentinel.newer
            if leaf is None or leaf is sentinel:
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
        sizes = self._subtree_sizes(tenant)
        return self._branches_of(self._root, 0, depth, top, tenant, sizes)

    # -- internals -------------------------------------------------------------------------

    def _attach(self, parent: _Node, label: Key, tenant: str, now: float) -> None:
        if not parent.children and parent is not self._root:
            self._unlink(parent)  # no longer a leaf
        child = _Node(label, parent, {tenant: now}, now)
        parent.children[label[0]] = child
        self._place(child)
        self._version += 1
        self._sizes[tenant] = self._sizes.get(tenant, 0) + len(label)
        self._total += len(label)
        self._nodes += 1
        self._memory += NODE_BYTES + TENANT_BYTES + label_bytes(label)

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node`'s label at `at`; the new upper half keeps the tenants and touch times."""
        parent = node.parent
        assert parent is not None
        whole = label_bytes(node.label)
        upper = _Node(node.label[:at], parent, dict(node.tenants), node.touched)
        node.label = node.label[at:]
        node.parent = upper
        upper.children[node.label[0]] = node
        parent.children[upper.label[0]] = upper
        self._nodes += 1
        self._version += 1
        self._memory += (
            NODE_BYTES
            + TENANT_BYTES * len(upper.tenants)
            + label_bytes(upper.label)
            + label_bytes(node.label)
            - whole
        )
        return upper

    def _drop(self, node: _Node, tenant: str) -> None:
        """Remove `tenant` from a node it holds and none of whose children it holds."""
        if len(node.tenants) == 1:  # no tenant will hold it, so none holds a child: free it
            self._free_leaf(node)
            return
        del node.tenants[tenant]
        self._sizes[tenant] -= len(node.label)
        self._memory -= TENANT_BYTES
        newest = max(node.tenants.values())
        if newest < node.touched:
            node.touched = newest
            if not node.children:
                self._unlink(node)
                self._place(node)

    def _free_leaf(self, node: _Node) -> None:
        """Remove a leaf and every tenant's hold on it."""
        parent = node.parent
        assert parent is not None and not node.children
        size = len(node.label)
        for tenant in node.tenants:
            self._sizes[tenant] -= size
        self._memory -= NODE_BYTES + TENANT_BYTES * len(node.tenants) + label_bytes(node.label)
        node.tenants = {}
        del parent.children[node.label[0]]
        self._unlink(node)
        self._total -= size
        self._nodes -= 1
        self._version += 1
        if not parent.children and parent is not self._root:
            self._place(parent)  # a leaf now

    # -- the leaf list (see the module docstring) -----------------------------------------

    def _unlink(self, node: _Node) -> None:
        older, newer = node.older, node.newer
        if older is not None and newer is not None:
            older.newer = newer
            newer.older = older
            node.older = node.newer = None

    def _place(self, node: _Node) -> None:
        """Link a leaf in by its last touch: at the newest end in the common case."""
        sentinel = self._leaves
        when = node.touched
        after = sentinel.older  # the newest leaf
        assert after is not None
        if after is not sentinel and after.touched > when:
            after = self._find_older(when)
        newer = after.newer
        assert newer is not None
        node.older = after
        node.newer = newer
        newer.older = node
        after.newer = node

    def _find_older(self, when: float) -> _Node:
        """The leaf to link a leaf touched at `when` after: the newest one not newer than it,
        found from either end within `PLACE_WALK` links (else near the oldest end)."""
        sentinel = self._leaves
        node = sentinel.older
        for _ in range(PLACE_WALK):
            if node is None or node is sentinel or node.touched <= when:
                return node or sentinel
            node = node.older
        node = sentinel
        for _ in range(PLACE_WALK):
            following = node.newer
            if following is None or following is sentinel or following.touched > when:
                return node
            node = following
        return node

    @staticmethod
    def _holds_a_child(node: _Node, tenant: str) -> bool:
        return any(tenant in child.tenants for child in node.children.values())

    def _held_nodes(self, tenant: str) -> Iterator[_Node]:
        """Nodes `tenant` holds, parents before children (held nodes are closed upward)."""
        stack = [c for c in self._root.children.values() if tenant in c.tenants]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(c for c in node.children.values() if tenant in c.tenants)

    def _all_nodes(self) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _subtree_sizes(self, tenant: str | None) -> dict[int, int]:
        nodes = list(self._all_nodes() if tenant is None else self._held_nodes(tenant))
        sizes: dict[int, int] = {}
        for node in reversed(nodes):  # children before parents
            below = sum(sizes.get(id(child), 0) for child in node.children.values())
            sizes[id(node)] = len(node.label) + below
        return sizes

    def _branches_of(
        self,
        node: _Node,
        prefix: int,
        depth: int,
        top: int,
        tenant: str | None,
        sizes: dict[int, int],
    ) -> tuple[Branch, ...]:
        if depth <= 0:
            return ()
        children = [c for c in node.children.values() if id(c) in sizes]
        children.sort(key=lambda c: sizes[id(c)], reverse=True)
        shown = children[:top]
        return tuple(self._branch(c, prefix, depth, top, tenant, sizes) for c in shown)

    def _branch(
        self,
        node: _Node,
        prefix: int,
        depth: int,
        top: int,
        tenant: str | None,
        sizes: dict[int, int],
    ) -> Branch:
        end = prefix + len(node.label)
        visible = sum(1 for c in node.children.values() if id(c) in sizes)
        children = self._branches_of(node, end, depth - 1, top, tenant, sizes)
        holders = sorted(node.tenants.items(), key=lambda item: item[1], reverse=True)
        return Branch(
            label=node.label,
            prefix_length=prefix,
            tenants=tuple(holders),
            subtree_size=sizes[id(node)],
            children=children,
            hidden_children=visible - len(children),
        )


def _concat(head: Key, tail: Key) -> Key:
    if isinstance(head, str) and isinstance(tail, str):
        return head + tail
    assert isinstance(head, array) and isinstance(tail, array)
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
