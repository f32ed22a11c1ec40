"""Marking over a plain manifest graph: index children, blobs, referrers."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.gc.mark import Node, mark, parents_index, referrers_index, unmarked


def d(name: str) -> str:
    return f"sha256:{name:0>64}"


IMG = Node(blobs=(d("c1"), d("l1")))
IMG2 = Node(blobs=(d("c2"), d("l1"), d("l2")))


def test_image_keeps_config_and_layers() -> None:
    m = mark({d("a"): IMG}, [d("a")])
    assert m.manifests == {d("a")}
    assert m.blobs == {d("c1"), d("l1")}


def test_index_keeps_untagged_children_and_their_blobs() -> None:
    graph = {d("i"): Node(children=(d("a"), d("b"))), d("a"): IMG, d("b"): IMG2}
    m = mark(graph, [d("i")])
    assert m.manifests == {d("i"), d("a"), d("b")}
    assert m.blobs == {d("c1"), d("c2"), d("l1"), d("l2")}


def test_referrers_follow_kept_subject_transitively() -> None:
    graph = {
        d("a"): IMG,
        d("sbom"): Node(blobs=(d("e"), d("sb")), subject=d("a")),
        d("sig"): Node(blobs=(d("e"), d("sg")), subject=d("sbom")),
        d("other"): Node(blobs=(d("x"),), subject=d("zz")),  # subject gone
    }
    m = mark(graph, [d("a")])
    assert m.manifests == {d("a"), d("sbom"), d("sig")}
    assert d("sg") in m.blobs and d("x") not in m.blobs
    assert unmarked(graph, m) == {d("other")}


def test_referrer_does_not_keep_its_subject() -> None:
    graph = {d("a"): IMG, d("sig"): Node(blobs=(d("s"),), subject=d("a"))}
    m = mark(graph, [d("sig")])
    assert d("a") not in m.manifests
    assert m.blobs == {d("s")}


def test_follow_referrers_can_be_turned_off() -> None:
    graph = {d("a"): IMG, d("sig"): Node(blobs=(d("s"),), subject=d("a"))}
    assert mark(graph, [d("a")], follow_referrers=False).manifests == {d("a")}


def test_missing_child_is_still_marked() -> None:
    m = mark({d("i"): Node(children=(d("gone"),))}, [d("i")])
    assert d("gone") in m.manifests


def test_cycles_terminate() -> None:
    graph = {d("a"): Node(children=(d("b"),)), d("b"): Node(children=(d("a"),))}
    assert mark(graph, [d("a")]).manifests == {d("a"), d("b")}


def test_indexes() -> None:
    graph = {d("i"): Node(children=(d("a"),)), d("a"): IMG, d("s"): Node(subject=d("a"))}
    assert parents_index(graph) == {d("a"): [d("i")]}
    assert referrers_index(graph) == {d("a"): [d("s")]}


# --- properties ------------------------------------------------------------

names = st.sampled_from([d(f"m{i}") for i in range(12)])
blob_names = st.sampled_from([d(f"b{i}") for i in range(15)])
nodes = st.builds(
    Node,
    children=st.lists(names, max_size=3).map(tuple),
    blobs=st.lists(blob_names, max_size=4).map(tuple),
    subject=st.one_of(st.none(), names),
)
graphs = st.dictionaries(names, nodes, max_size=12)


def reference_closure(graph, roots):
    """An independent fixpoint, to check `mark` against."""
    ms, bs = set(roots), set()
    while True:
        before = (len(ms), len(bs))
        for dg, node in graph.items():
            if dg in ms:
                ms.update(node.children)
                bs.update(node.blobs)
            if node.subject is not None and node.subject in ms:
                ms.add(dg)
        if (len(ms), len(bs)) == before:
            return ms, bs


@settings(max_examples=300, deadline=None)
@given(graphs, st.lists(names, max_size=4))
def test_mark_equals_reachability_closure(graph, roots) -> None:
    m = mark(graph, roots)
    ms, bs = reference_closure(graph, roots)
    assert m.manifests == ms
    assert m.blobs == bs


@settings(max_examples=300, deadline=None)
@given(graphs, st.lists(names, max_size=4))
def test_nothing_reachable_from_a_root_is_unmarked(graph, roots) -> None:
    m = mark(graph, roots)
    for dg in m.manifests:
        node = graph.get(dg)
        if node:
            assert set(node.children) <= m.manifests
            assert set(node.blobs) <= m.blobs
    for dg, node in graph.items():
        if node.subject in m.manifests:
            assert dg in m.manifests
    assert set(roots) <= m.manifests


@settings(max_examples=200, deadline=None)
@given(graphs, st.lists(names, max_size=4), st.lists(names, max_size=4))
def test_more_roots_never_mark_less(graph, roots, extra) -> None:
    small, big = mark(graph, roots), mark(graph, roots + extra)
    assert small.manifests <= big.manifests and small.blobs <= big.blobs
