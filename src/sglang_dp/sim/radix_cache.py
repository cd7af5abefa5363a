"""Token-level radix tree of cached KV, with lock counts and LRU eviction (RadixAttention).

    root
     ├── [The, capital, city]            lock_ref 0, last_access 3.0
     │     ├── [of, France, is]          lock_ref 1  (a running request holds it)
     │     └── [of, Spain]               lock_ref 0  ← evicted first (oldest unlocked leaf)
     └── [Once, upon, a, time]           lock_ref 0, last_access 7.5

Every node owns the KV of the tokens on its edge. A running request locks the path from its
deepest node to the root (`lock`); locked tokens are "protected", the rest "evictable".
`evict(n)` frees at least n tokens by removing unlocked leaves, least recently used first
(ties: oldest touch), a parent joining the candidates when its last child goes — SGLang's
algorithm. `match_prefix` and `insert` refresh the access time of the path they walk.

Edges are Python lists compared slice-against-slice (C speed); only the one edge where a key
diverges is searched token by token (binary search over slice equality). Pure: time is a
parameter, no I/O. A disabled cache (`--disable-radix-cache`) matches nothing and stores nothing.

Pages (`page_size`, SGLang's `--page-size`, default 1): with P > 1 the cache holds whole pages
only, as SGLang's paged radix cache: keys are cut to a multiple of P before matching and
inserting, edges split only at page boundaries, and a node's children are keyed by their first
page. With P = 1 every code path is the token-level one above.

KV events (`events=True`): every cache operation records what SGLang's radix cache records —
`BlockStored` per page of a new node (ids chained from the parent node's last page, see
`sglang_dp.kv_wire`), one `BlockRemoved` per evicted node with its pages' ids, and
`AllBlocksCleared` on `reset` (also the one at construction, as SGLang's). `take_events()` hands
them over (the shell publishes them as one batch). Off by default: no hashing, no records.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from itertools import count

from sglang_dp.kv_wire import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    chain_digests,
    digest_to_id,
)


class Node:
    """One edge of the tree and the KV of its tokens."""

    __slots__ = ("children", "digests", "key", "last_access", "lock_ref", "parent", "touch")

    def __init__(self, key: list[int], parent: Node | None, now: float, touch: int) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[Hashable, Node] = {}
        self.digests: list[bytes] | None = None  # per page, only when events are recorded
        self.lock_ref = 0
        self.last_access = now
        self.touch = touch  # tie-breaker for equal times: order of access


def _common_prefix(a: list[int], b: list[int], start: int) -> int:
    """Length of the common prefix of `a[start:]` and `b` (b is an edge, usually short)."""
    n = min(len(a) - start, len(b))
    if a[start : start + n] == b[:n]:
        return n
    lo, hi = 0, n  # a[start:start+lo] == b[:lo], and they differ within hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[start : start + mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class RadixCache:
    """The tree plus its token counts (see module docstring)."""

    def __init__(self, enabled: bool = True, page_size: int = 1, events: bool = False) -> None:
        if page_size < 1:
            raise ValueError(f"page size must be at least 1, not {page_size}")
        self.enabled = enabled
        self.page_size = page_size
        self.record_events = events
        self.events: list[Event] = []
        self._touches = count(1)
        self.reset()

    def reset(self) -> None:
        """Drop everything (flush_cache)."""
        self.root = Node([], None, 0.0, 0)
        self.root.lock_ref = 1  # never evicted
        self.root.digests = []
        self.size = 0  # tokens in the tree
        self.evictable_size = 0  # tokens on unlocked nodes
        if self.record_events:
            self.events.append(AllBlocksCleared())

    def take_events(self) -> list[Event]:
        """The events recorded since the last call, oldest first."""
        events, self.events = self.events, []
        return events

    def _child_key(self, key: list[int], i: int) -> Hashable:
        return key[i] if self.page_size == 1 else tuple(key[i : i + self.page_size])

    def _aligned(self, key: list[int]) -> list[int]:
        p = self.page_size
        return key if p == 1 else key[: len(key) - len(key) % p]

    @property
    def protected_size(self) -> int:
        """Tokens on locked nodes (held by running requests)."""
        return self.size - self.evictable_size

    def _touch(self, node: Node, now: float) -> None:
        tick = next(self._touches)
        while node is not self.root:
            node.last_access = now
            node.touch = tick
            node = node.parent  # type: ignore[assignment]

    def match_prefix(self, key: list[int], now: float | None = None) -> tuple[int, Node]:
        """Longest cached prefix of `key`: (its length, deepest node fully on it).

        With `now`, the matched path counts as used at that time (LRU).
        A match ending inside an edge splits it, so the returned node ends exactly there.
        """
        if not self.enabled:
            return 0, self.root
        p = self.page_size
        if p != 1:
            key = self._aligned(key)
        node, i = self.root, 0
        while i < len(key):
            child = node.children.get(key[i] if p == 1 else tuple(key[i : i + p]))
            if child is None:
                break
            n = _common_prefix(key, child.key, i)
            if p != 1:
                n -= n % p  # a partly matching page is not cached
            if n < len(child.key):
                child = self._split(child, n)
            node, i = child, i + n
        if now is not None and node is not self.root:
            self._touch(node, now)
        return i, node

    def _split(self, child: Node, n: int) -> Node:
        """Cut `child`'s edge after n tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = Node(child.key[:n], parent, child.last_access, child.touch)
        upper.lock_ref = child.lock_ref
        parent.children[self._child_key(upper.key, 0)] = upper
        child.key = child.key[n:]
        child.parent = upper
        upper.children[self._child_key(child.key, 0)] = child
        if child.digests is not None:  # the ids chain over the whole path: a split keeps them
            pages = n // self.page_size
            upper.digests, child.digests = child.digests[:pages], child.digests[pages:]
        return upper

    def insert(self, key: list[int], now: float) -> tuple[int, Node]:
        """Cache the KV of `key`: (how many tokens were new, the node ending at len(key))."""
        if self.page_size != 1:
            key = self._aligned(key)
        if not self.enabled or not key:
            return 0, self.root
        matched, node = self.match_prefix(key)
        added = len(key) - matched
        if added:
            leaf = Node(key[matched:], node, now, 0)
            node.children[self._child_key(leaf.key, 0)] = leaf
            self.size += added
            self.evictable_size += added
            if self.record_events:
                self._record_stored(leaf)
            node = leaf
        self._touch(node, now)
        return added, node

    def lock(self, node: Node) -> None:
        """A running request uses the path root→node: protect it from eviction."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: Node) -> None:
        """The request no longer uses the path root→node."""
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
            node = node.parent  # type: ignore[assignment]

    def evict(self, tokens: int) -> int:
        """Free at least `tokens` tokens (if evictable), least recently used leaves first."""
        if tokens <= 0 or self.evictable_size == 0:
            return 0
        heap = [(n.last_access, n.touch, id(n), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < tokens and heap:
            _, _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[self._child_key(leaf.key, 0)]
            freed += len(leaf.key)
            if self.record_events and leaf.digests:
                ids = [digest_to_id(d) for d in leaf.digests]
                self.events.append(BlockRemoved(ids, MEDIUM_GPU))
            if not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.touch, id(parent), parent))
        self.size -= freed
        self.evictable_size -= freed
        return freed

    def _record_stored(self, node: Node) -> None:
        """One BlockStored per page of a new node, chained from its parent's last page."""
        parent = node.parent
        assert parent is not None and parent.digests is not None
        prior = parent.digests[-1] if parent.digests else None
        node.digests = chain_digests(node.key, self.page_size, prior)
        parent_id = digest_to_id(prior) if prior is not None else None
        p = self.page_size
        for i, digest in enumerate(node.digests):
            page = node.key[i * p : (i + 1) * p]
            block_id = digest_to_id(digest)
            self.events.append(
                BlockStored([block_id], parent_id, page, len(page), None, MEDIUM_GPU)
            )
            parent_id = block_id

    def block_ids(self) -> set[int]:
        """The ids of every cached page, hashed afresh from the tree's tokens (a debug dump)."""
        out: set[int] = set()
        stack: list[tuple[Node, bytes | None]] = [(c, None) for c in self.root.children.values()]
        while stack:
            node, prior = stack.pop()
            digests = chain_digests(node.key, self.page_size, prior)
            out.update(digest_to_id(d) for d in digests)
            stack.extend((c, digests[-1]) for c in node.children.values())
        return out

    def _leaves(self) -> list[Node]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                leaves.append(node)
        return leaves

    def paths(self) -> list[list[int]]:
        """Every cached sequence root→leaf (for tests and debugging)."""
        out: list[list[int]] = []
        stack: list[tuple[Node, list[int]]] = [(self.root, [])]
        while stack:
            node, prefix = stack.pop()
            path = prefix + node.key
            if node.children:
                stack.extend((c, path) for c in node.children.values())
            elif node is not self.root:
                out.append(path)
        return sorted(out)
