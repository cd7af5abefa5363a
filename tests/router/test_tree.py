"""The approximate radix tree: drawn examples, then properties against a brute-force reference."""

from __future__ import annotations

import gc

from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.router.tree import (
    NODE_BYTES,
    TENANT_BYTES,
    Key,
    RadixTree,
    common_length,
    iter_branches,
    label_bytes,
    preview,
)


def test_docstring_example() -> None:
    tree = RadixTree()
    tree.insert("hello world", "w0", 1)
    tree.insert("hello there", "w1", 2)
    tree.insert("help", "w1", 3)
    assert tree.match("hello there!") == {"w0": 6, "w1": 11}
    assert tree.match("help me") == {"w0": 3, "w1": 4}
    assert tree.match("xyz") == {}
    assert tree.size("w0") == 11
    assert tree.size("w1") == 3 + 3 + 5 + 1
    assert tree.total_size == 17


def test_token_keys_use_the_same_code() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], "a", 1)
    tree.insert((1, 2, 9), "b", 2)
    assert tree.match([1, 2, 3, 7]) == {"a": 3, "b": 2}
    assert tree.size("a") == 4 and tree.size("b") == 3


def test_unicode_keys_are_matched_by_code_point() -> None:
    tree = RadixTree()
    tree.insert("日本語のプロンプト🙂a", "w", 1)
    assert tree.match("日本語のプロンプト🙂b") == {"w": 10}
    assert tree.match("日本") == {"w": 2}


def test_insert_reports_the_prior_touch_of_the_deepest_held_part() -> None:
    tree = RadixTree()
    assert tree.insert("abcdef", "w", 1) is None
    assert tree.insert("abcxyz", "w", 5) == 1
    assert tree.insert("abcxyz", "w", 7) == 5
    assert tree.insert("q", "w", 8) is None


def test_evict_drops_least_recently_used_leaves_first() -> None:
    tree = RadixTree()
    tree.insert("system prompt A: question 1", "w", 1)
    tree.insert("system prompt A: question 2", "w", 2)
    tree.insert("system prompt B: question 3", "w", 3)
    removed = tree.evict("w", tree.size("w") - 1)
    assert removed == 1  # the leaf "1" of the oldest key goes first
    assert tree.match("system prompt A: question 1") == {"w": len("system prompt A: question ")}
    assert tree.match("system prompt B: question 3") == {"w": 27}


def test_remove_tenant_frees_unshared_nodes() -> None:
    tree = RadixTree()
    tree.insert("shared prefix one", "a", 1)
    tree.insert("shared prefix two", "b", 1)
    tree.remove_tenant("a")
    assert tree.size("a") == 0
    assert tree.match("shared prefix one") == {"b": len("shared prefix ")}
    assert tree.total_size == len("shared prefix two")


def test_global_eviction_bounds_memory_whoever_holds_it() -> None:
    tree = RadixTree()
    for i in range(10):
        tree.insert(f"prompt {i} " + "x" * 50, f"w{i % 3}", i)
    tree.evict_global(200)
    assert tree.total_size <= 200
    assert tree.match("prompt 0 " + "x" * 50)["w0"] == len("prompt ")  # the oldest went first
    assert tree.match("prompt 9 " + "x" * 50)["w0"] == 59


def test_memory_budget_and_bounded_steps() -> None:
    tree = RadixTree()
    for i in range(100):
        tree.insert(f"{i:03d}" + "y" * 200, f"w{i % 4}", i)
    full = tree.memory
    check_structure(tree)
    tree.evict_global(10**9, max_memory=full // 2, max_leaves=10)
    assert len(tree.lru_leaves()) >= 90  # at most ten leaves in one step
    while tree.evict_global(10**9, max_memory=full // 2, max_leaves=10):
        pass
    assert tree.memory <= full // 2
    assert tree.match("099" + "y" * 200)["w3"] == 203  # the newest stay


def test_token_keys_are_stored_compactly() -> None:
    tree = RadixTree()
    tree.insert(list(range(1000, 2000)), "w", 1)
    assert tree.memory < NODE_BYTES + TENANT_BYTES + 64 + 4 * 1000 + 1


def test_a_parent_left_a_leaf_is_placed_by_its_time() -> None:
    tree = RadixTree()
    tree.insert("shared", "w", 10)  # ends at the node that becomes a parent
    tree.insert("shared+old", "w", 1)
    tree.insert("other", "w", 5)
    tree.evict_global(tree.total_size - 1, max_leaves=1)  # "+old" goes
    assert [label for label, _ in tree.lru_leaves()] == ["other", "shared"]


def test_branches_show_largest_first_with_holders() -> None:
    tree = RadixTree()
    tree.insert("S" * 100 + "q1", "a", 1)
    tree.insert("S" * 100 + "q2", "b", 2)
    tree.insert("tiny", "a", 3)
    top = tree.branches(depth=2, top=1)
    assert len(top) == 1
    assert top[0].label == "S" * 100 + "q"
    assert {t for t, _ in top[0].tenants} == {"a", "b"}
    assert top[0].subtree_size == 103
    assert top[0].hidden_children == 1
    assert [b.label for b in iter_branches(tree.branches(depth=1, top=5, tenant="a"))] == [
        "S" * 100 + "q",
        "tiny",
    ]


def test_preview_escapes_and_shortens_in_the_middle() -> None:
    assert preview("a\nb") == "a\\nb"
    shortened = preview("x" * 30 + "y" * 30, width=11)
    assert len(shortened) == 11 and shortened.startswith("xxxxx") and shortened.endswith("yyyyy")
    assert preview((1, 2, 3)) == "1 2 3"


# -- the garbage collector never walks the tree ------------------------------------------------


def grow(tree: RadixTree, count: int, start: float = 0.0) -> None:
    for i in range(count):
        tree.insert(f"system {i % 7} " + "x" * 40 + f" question {i}", f"w{i % 3}", start + i)
        tree.insert([i % 5, 7, 7, i, i + 1], f"w{i % 4}", start + i)


def test_nodes_are_not_objects_the_collector_tracks() -> None:
    tree = RadixTree()
    grow(tree, 50)
    gc.collect()
    before = len(gc.get_objects())
    grow(tree, 3000, start=50)
    tree.evict("w1", tree.size("w1") // 2)
    tree.evict_global(tree.total_size * 3 // 4)
    gc.collect()
    assert tree.node_count > 4000
    assert len(gc.get_objects()) - before < 50  # nothing per node: a full collection stays short


def test_a_dropped_tree_is_freed_without_the_collector() -> None:
    gc.collect()
    gc.disable()
    try:
        tree = RadixTree()
        grow(tree, 500)
        tree.evict_step("w0", tree.size("w0") // 2, 10)  # an eviction left half done
        tree.remove_tenant("w2")
        del tree
        assert gc.collect() == 0  # no reference cycle: reference counting freed it all
    finally:
        gc.enable()
    assert gc.garbage == []


# -- properties against a brute-force reference -----------------------------------------------

ALPHABET = "ab☃"
text_keys = st.text(alphabet=ALPHABET, min_size=1, max_size=12)
token_keys = st.lists(st.integers(0, 2), min_size=1, max_size=12).map(tuple)
tenants = st.sampled_from(["w0", "w1", "w2"])


def prefix_length(a: Key, b: Key) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reference_match(held: dict[str, set[Key]], key: Key) -> dict[str, int]:
    result = {}
    for tenant, keys in held.items():
        best = max((prefix_length(k, key) for k in keys), default=0)
        if best:
            result[tenant] = best
    return result


def held_by(tree: RadixTree, tenant: str) -> dict[Key, float]:
    """`held_keys` with token keys as tuples (arrays cannot be set members)."""
    return {k if isinstance(k, str) else tuple(k): t for k, t in tree.held_keys(tenant)}


def prefixes(keys: set[Key]) -> set[Key]:
    return {k[:i] for k in keys for i in range(1, len(k) + 1)}


def check_structure(tree: RadixTree) -> None:
    """The leaf list holds exactly the leaves, oldest first; the memory estimate is the sum of
    its parts."""
    nodes = tree._records()
    leaves = sorted(touched for _, touched, _, leaf in nodes if leaf)
    listed = tree.lru_leaves()
    assert len(listed) == len(leaves)
    assert [t for _, t in listed] == leaves
    expected = sum(
        NODE_BYTES + TENANT_BYTES * len(held) + label_bytes(label) for label, _, held, _ in nodes
    )
    assert tree.memory == expected
    for _, touched, held, _ in nodes:
        assert touched == max(held.values())


def check_against_reference(tree: RadixTree, held: dict[str, set[Key]], probes: list[Key]) -> None:
    check_structure(tree)
    for tenant, keys in held.items():
        assert tree.size(tenant) == len(prefixes(keys))
    assert tree.total_size == len(prefixes(set().union(*held.values())))
    for probe in probes:
        assert tree.match(probe) == reference_match(held, probe)


operations = st.lists(
    st.tuples(st.sampled_from(["insert", "insert", "insert", "remove", "evict"]), tenants),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(ops=operations, data=st.data(), tokens=st.booleans())
def test_tree_agrees_with_reference(
    ops: list[tuple[str, str]], data: st.DataObject, tokens: bool
) -> None:
    keys = token_keys if tokens else text_keys
    tree = RadixTree()
    held: dict[str, set[Key]] = {"w0": set(), "w1": set(), "w2": set()}
    for now, (op, tenant) in enumerate(ops):
        if op == "insert":
            key = data.draw(keys)
            tree.insert(key, tenant, now)
            held[tenant].add(key)
        elif op == "remove":
            tree.remove_tenant(tenant)
            held[tenant] = set()
        else:
            budget = data.draw(st.integers(0, max(tree.size(tenant), 1)))
            before = held_by(tree, tenant)
            work = data.draw(st.integers(0, 5))
            if work == 0:
                tree.evict(tenant, budget)
            else:  # the same, in bounded steps
                tree.evict_step(tenant, budget, work)
                while tree.evicting(tenant):
                    tree.evict_step(tenant, budget, work)
            assert tree.size(tenant) <= budget
            after = held_by(tree, tenant)
            assert prefixes(set(after)) <= prefixes(set(before))
            gone = [t for k, t in before.items() if k not in prefixes(set(after))]
            if gone and after:
                assert max(gone) <= min(after.values())  # least recently used first
            held[tenant] = set(after)
        check_against_reference(tree, held, [data.draw(keys) for _ in range(3)])


@settings(max_examples=150, deadline=None)
@given(
    first=st.lists(text_keys, min_size=1, max_size=20),
    later=st.lists(st.tuples(text_keys, tenants), max_size=20),
    work=st.integers(1, 4),
    data=st.data(),
)
def test_stepped_eviction_survives_changes_between_steps(
    first: list[str], later: list[tuple[str, str]], work: int, data: st.DataObject
) -> None:
    tree = RadixTree()
    for now, key in enumerate(first):
        tree.insert(key, "w0", now)
    budget = data.draw(st.integers(0, tree.size("w0")))
    ever = set(first)
    now = len(first)
    pending = list(later)
    tree.evict_step("w0", budget, work)
    while tree.evicting("w0"):
        if pending:  # the tree changes between two steps
            key, tenant = pending.pop()
            now += 1
            tree.insert(key, tenant, now)
            ever.add(key)
        tree.evict_step("w0", budget, work)
        check_structure(tree)
    held = {t: set(held_by(tree, t)) for t in ["w0", "w1", "w2"]}
    assert prefixes(held["w0"]) <= prefixes(ever)
    check_against_reference(tree, held, [data.draw(text_keys) for _ in range(3)])
    for key, tenant in pending:
        now += 1
        tree.insert(key, tenant, now)
    tree.evict_step("w0", budget, 10**6)  # with no change meanwhile, one step evicts
    assert tree.size("w0") <= budget
    tree.evict_step("w0", budget, 10**6)  # and the next frees what is left of its heap
    assert not tree.evicting("w0")


@settings(max_examples=150, deadline=None)
@given(inserts=st.lists(st.tuples(text_keys, tenants), min_size=1, max_size=25), data=st.data())
def test_global_eviction_keeps_the_invariants(
    inserts: list[tuple[str, str]], data: st.DataObject
) -> None:
    tree = RadixTree()
    for now, (key, tenant) in enumerate(inserts):
        tree.insert(key, tenant, now)
    budget = data.draw(st.integers(0, tree.total_size))
    step = data.draw(st.integers(1, 4))
    leaves = len(tree.lru_leaves())
    removed = tree.evict_global(budget, max_leaves=step)  # one bounded step: oldest leaves
    assert removed == 0 or len(tree.lru_leaves()) >= leaves - step
    check_structure(tree)
    while tree.evict_global(budget, max_leaves=step):
        pass
    assert tree.total_size <= budget
    held = {t: {k for k, _ in tree.held_keys(t)} for t in ["w0", "w1", "w2"]}
    original = {k for k, _ in inserts}
    for keys in held.values():
        assert prefixes(keys) <= prefixes(original)
    check_against_reference(tree, held, [data.draw(text_keys) for _ in range(3)])


@given(a=st.text(alphabet="ab", max_size=40), b=st.text(alphabet="ab", min_size=1, max_size=40))
def test_common_length_is_the_common_prefix(a: str, b: str) -> None:
    for pos in range(len(a) + 1):
        assert common_length(a, pos, b) == prefix_length(a[pos:], b)


def test_retract_undoes_a_speculative_insert_only() -> None:
    tree = RadixTree()
    tree.insert("hello world", "w0", 1.0)
    tree.insert("hello there", "w0", 2.0)
    before = tree.size("w0")
    tree.insert("hello world, again", "w0", 3.0)
    assert tree.retract("hello world, again", "w0", len("hello world")) == len(", again")
    assert tree.size("w0") == before
    assert tree.match("hello world, again") == {"w0": len("hello world")}
    # a node another of its keys goes through is kept
    tree.insert("abc", "w1", 1.0)
    tree.insert("abcdef", "w1", 1.0)
    assert tree.retract("abc", "w1", 0) == 0
    assert tree.match("abcdef") == {"w1": 6}
    # nothing held before: all of it goes, and a node nobody holds is freed
    tree.insert("zzz", "w2", 1.0)
    assert tree.retract("zzz", "w2", 0) == 3
    assert tree.match("zzz") == {}
