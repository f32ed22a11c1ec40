"""When the registry says each tag and manifest was pushed: what retention ranks by.

Pure. Both collectors (API and storage) build their `TagInfo`s and graph push
times here, from the same two sources in the same order, so for the same inputs
they decide the same way:

1. the journal's webhook history (`RegistryTimes`): the registry's own event
   timestamps, the latest push of that tag onto that digest (of that manifest,
   for manifests);
2. when the site's storage directory is known, the link files' mtimes: the
   tag's ``current/link`` (rewritten by every tag PUT) and the manifest's
   revision link. When both sources know a time, the later one counts: a re-push
   whose webhook is still queued at the registry must not make a tag look old;
3. else unknown. An unknown age is never "old": the policy keeps the item and
   reports it as "age unknown" (`policy.decide`).

Never the image config's ``created``: any builder sets it (1970 for
reproducible builds, or the future), so it says nothing about when the registry
received the image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from replicator.gc.mark import Node
from replicator.gc.policy import TagInfo
from replicator.journal.events import RegistryTimes

# what the storage scan knows of one repository: tag -> (digest, current/link mtime),
# and manifest digest -> revision link mtime
StoredTags = Mapping[str, tuple[str, float]]
StoredRevisions = Mapping[str, float]


def tag_infos(
    tags: Mapping[str, str],
    webhooks: RegistryTimes | None,
    stored: StoredTags | None = None,
) -> list[TagInfo]:
    """tag -> digest as the registry holds them now, with push and pull times."""
    out: list[TagInfo] = []
    for name, digest in sorted(tags.items()):
        pushed = webhooks.pushed.get((name, digest)) if webhooks else None
        if stored is not None:
            link = stored.get(name)
            if link is not None and link[0] == digest:
                pushed = _later(pushed, link[1])
        pulled = webhooks.pulled.get(digest) if webhooks else None
        out.append(TagInfo(name, digest, pushed_at=pushed, pulled_at=pulled))
    return out


def manifest_times(
    digests: Iterable[str],
    webhooks: RegistryTimes | None,
    stored: StoredRevisions | None = None,
) -> dict[str, float | None]:
    """digest -> when the manifest was last pushed, or None when nobody can say."""
    out: dict[str, float | None] = {}
    for d in digests:
        t = webhooks.manifest_pushed.get(d) if webhooks else None
        out[d] = _later(t, stored.get(d)) if stored is not None else t
    return out


def with_push_times(graph: Mapping[str, Node], times: Mapping[str, float | None]) -> dict:
    """The graph with each node's `pushed_at` set from `times`."""
    return {
        d: Node(n.children, n.blobs, n.subject, pushed_at=times.get(d)) for d, n in graph.items()
    }


def _later(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return b if a is None else a
    return max(a, b)
