"""Which instance of an MQTT group runs the group's scheduled jobs (GC, verify).

Instances that share a `group` share the work of one set of registries; a scheduled GC
or verify is about those registries, not about one instance's journal, so one run per
group is enough, and for GC more than one at once is harmful (API runs race each
other's deletes; storage runs on two machines cannot share a `flock`).

The rule: the member of the group that is online and not stale, with the smallest
instance id, leads. It is decided from the retained status messages every instance
publishes (`replicator.fleet`), which every instance reads alike, so all agree without
talking to each other. The asking instance always counts itself: it is alive, even if
the last message the broker holds about it is an old will or not there yet.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from replicator.fleet import FleetMember


def alive_members(members: Iterable[FleetMember], group: str) -> set[str]:
    """Instance ids of `group` that are online and were heard from recently."""
    return {
        m.status.instance
        for m in members
        if m.status.group == group and m.status.state == "online" and not m.stale
    }


def group_leader(members: Iterable[FleetMember], group: str, me: str) -> str:
    """The instance id that runs `group`'s scheduled jobs, as `me` sees the fleet."""
    return min(alive_members(members, group) | {me})
