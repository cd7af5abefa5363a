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

Eviction removes least recently used *leaves* (of one tenant with `evict`, of the whole tree with
`evict_global`) until the size fits; a parent becomes a leaf once its last child is gone. Both
walk only the nodes concerned and use a heap, so they cost O(n log n) in the nodes visited: callers
run them when a budget is exceeded by some slack, not on every insert. The global budget bounds
the router's memory whatever the number of workers (sgl-router's per-worker budget did not).

Time is a parameter (`now`), never read from a clock; there are no locks: one event loop owns it.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Union

# Union: `array` is not subscriptable at run time in Python 3.11, so the alias quotes it
Key = Union[str, "array[int]"]
KeyLike = Union[str, Sequence[int], "array[int]"]


def normalize_key(key: KeyLike) -> Key:
    """Strings stay strings; any sequence of ints becomes an `array('I')` (compact, sliceable
    and comparable)."""
    if isinstance(key, str):
        return key
    if isinstance(key, array) and key.typecode == "I":
        return key
    return array("I", key)


class _Node:
    __slots__ = ("children", "label", "parent", "tenants")

    def __init__(self, label: Key, parent: _Node | None, tenants: dict[str, float]) -> None:
        self.label = label
        self.parent = parent
        self.tenants = tenants
        self.children: dict[str | int, _Node] = {}


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
        self._root = _Node("", None, {})
        self._sizes: dict[str, int] = {}
        self._total = 0
        self._nodes = 0
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
            else:
                prior = touched
                if now > touched:  # keeps ancestors no older than descendants
                    child.tenants[tenant] = now
            node, pos = child, end
        if pos < len(path.key):
            self._attach(node, path.key[pos:], tenant, now)
        return prior

    def remove_tenant(self, tenant: str) -> int:
        """Forget everything `tenant` holds; returns the key elements it held."""
        held = self._sizes.get(tenant, 0)
        for node in reversed(list(self._held_nodes(tenant))):  # children before parents
            self._drop(node, tenant)
        self._sizes.pop(tenant, None)
        return held

    def evict(self, tenant: str, max_size: int) -> int:
        """Drop `tenant`'s least recently used leaves until it holds <= `max_size` elements."""
        before = self.size(tenant)
        if before <= max_size:
            return 0
        heap = [
            (node.tenants[tenant], next(self._seq), node)
            for node in self._held_nodes(tenant)
            if not self._holds_a_child(node, tenant)
        ]
        heapq.heapify(heap)
        while heap and self._sizes[tenant] > max_size:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self._drop(node, tenant)
            if (
                parent is not None
                and parent is not self._root
                and not self._holds_a_child(parent, tenant)
            ):
                heapq.heappush(heap, (parent.tenants[tenant], next(self._seq), parent))
        return before - self._sizes[tenant]

    def evict_global(self, max_total: int) -> int:
        """Drop the least recently used leaves, whoever holds them, until the tree fits."""
        before = self._total
        if before <= max_total:
            return 0
        heap = [
            (max(node.tenants.values()), next(self._seq), node)
            for node in self._all_nodes()
            if not node.children
        ]
        heapq.heapify(heap)
        while heap and self._total > max_total:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            for tenant in list(node.tenants):
                self._drop(node, tenant)
            if parent is not None and parent is not self._root and not parent.children:
                heapq.heappush(heap, (max(parent.tenants.values()), next(self._seq), parent))
        return before - self._total

    # -- inspection ------------------------------------------------------------------------

    def branches(self, depth: int, top: int, tenant: str | None = None) -> tuple[Branch, ...]:
        """The `top` largest branches per level, `depth` levels deep (optionally one tenant's)."""
        sizes = self._subtree_sizes(tenant)
        return self._branches_of(self._root, 0, depth, top, tenant, sizes)

    # -- internals -------------------------------------------------------------------------

    def _attach(self, parent: _Node, label: Key, tenant: str, now: float) -> None:
        parent.children[label[0]] = _Node(label, parent, {tenant: now})
        self._version += 1
        self._sizes[tenant] = self._sizes.get(tenant, 0) + len(label)
        self._total += len(label)
        self._nodes += 1

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node`'s label at `at`; the new upper half keeps the tenants and touch times."""
        parent = node.parent
        assert parent is not None
        upper = _Node(node.label[:at], parent, dict(node.tenants))
        node.label = node.label[at:]
        node.parent = upper
        upper.children[node.label[0]] = node
        parent.children[upper.label[0]] = upper
        self._nodes += 1
        self._version += 1
        return upper

    def _drop(self, node: _Node, tenant: str) -> None:
        """Remove `tenant` from a node it holds and none of whose children it holds."""
        del node.tenants[tenant]
        self._sizes[tenant] -= len(node.label)
        if not node.tenants:  # no tenant holds it, so none holds a child: free it
            assert node.parent is not None and not node.children
            del node.parent.children[node.label[0]]
            self._total -= len(node.label)
            self._nodes -= 1
            self._version += 1

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
