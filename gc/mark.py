"""Marking: what must survive, given the manifests that are kept on purpose.

Pure: the graph is plain data (manifest digest -> children, blobs, subject), so
every collector (storage walk, registry API, tests) shares one definition of
"reachable":

* an index keeps every child it lists, tagged or not (distribution 2.8's
  ``--delete-untagged`` deletes untagged children of multi-arch indexes, which
  breaks the index; we never do);
* a manifest keeps its config and layer blobs;
* a kept manifest keeps its referrers (manifests whose ``subject`` is it), and
  theirs in turn (a signature of an SBOM of an image);
* a referrer whose subject is not kept is not kept through its subject — it is
  garbage unless something else keeps it.

Digests referenced but absent from the graph are still marked (a child we
could not read must not have its blob swept), they just lead nowhere further.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Node:
    """One manifest as the collector sees it. `pushed_at` is only used by policies.
    Slotted: a storage run holds one per manifest revision (10^5)."""

    children: tuple[str, ...] = ()
    blobs: tuple[str, ...] = ()
    subject: str | None = None
    pushed_at: float | None = None


Graph = Mapping[str, Node]


@dataclass
class MarkSet:
    """Everything reachable from the roots: manifests and blobs, by digest."""

    manifests: set[str] = field(default_factory=set)
    blobs: set[str] = field(default_factory=set)

    def __contains__(self, digest: object) -> bool:
        return digest in self.manifests or digest in self.blobs

    def update(self, other: MarkSet) -> None:
        self.manifests |= other.manifests
        self.blobs |= other.blobs


def referrers_index(graph: Graph) -> dict[str, list[str]]:
    """subject digest -> manifests naming it as their subject."""
    out: dict[str, list[str]] = {}
    for digest, node in graph.items():
        if node.subject:
            out.setdefault(node.subject, []).append(digest)
    return out


def mark(
    graph: Graph,
    roots: Iterable[str],
    *,
    follow_referrers: bool = True,
    referrers: Mapping[str, list[str]] | None = None,
) -> MarkSet:
    """Mark every manifest and blob reachable from `roots`.

    `referrers` may be passed in when marking the same graph repeatedly.
    """
    if follow_referrers and referrers is None:
        referrers = referrers_index(graph)
    marked = MarkSet()
    queue = deque(roots)
    while queue:
        digest = queue.popleft()
        if digest in marked.manifests:
            continue
        marked.manifests.add(digest)
        node = graph.get(digest)
        if node is not None:
            marked.blobs.update(node.blobs)
            queue.extend(c for c in node.children if c not in marked.manifests)
        if follow_referrers and referrers:
            queue.extend(r for r in referrers.get(digest, ()) if r not in marked.manifests)
    return marked


def parents_index(graph: Graph) -> dict[str, list[str]]:
    """child digest -> indexes listing it."""
    out: dict[str, list[str]] = {}
    for digest, node in graph.items():
        for child in node.children:
            out.setdefault(child, []).append(digest)
    return out


def unmarked(graph: Graph, marked: MarkSet) -> set[str]:
    """Manifests in the graph that nothing kept reaches."""
    return {d for d in graph if d not in marked.manifests}
