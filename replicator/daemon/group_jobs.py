"""Scheduled GC and verify run on one instance of an MQTT group (`replicator.group_leader`).

Every instance keeps its schedule; when a run is due, it reads the group's retained
status messages from the broker (the one-shot read `status` uses, a second or less) and
runs the job only if it is the group's leader: the online, non-stale member with the
smallest instance id. Reading at the moment of the decision, instead of keeping a view
up to date, means every instance decides on the broker's current state and nothing is
kept between runs.

Takeover: a leader that dies (SIGKILL, crash) has its will (`offline`) published by the
broker when its connection closes, at once for a process death and within 1.5 MQTT
keepalives (45 s) for a silent network loss; a leader frozen or cut off without the
broker noticing is passed over once it is stale (3 `mqtt.status_interval`s without a
status). The first scheduled time after that runs on the next member. A run that was
due while the dead leader still looked alive is not run by anyone: the schedule's next
time is the bound.

During a membership change two members may both lead for one run (a new member with a
smaller id whose status the other has not yet read, a leader that comes back from a
freeze): that costs one extra run of the job. A verify only reads. API GC's deletes are
idempotent (a manifest or tag already gone is not an error), and every sweep re-checks
the registry before it deletes. Two storage GCs on one store are serialised by the
store's `flock` (the second is refused, "another gc run is collecting ..."); the
leader rule is what keeps storage GCs on two machines apart.

Without `mqtt.group` every instance handles its own events and runs its own schedule.
When the broker cannot be read, the run is skipped with a warning (running it could be
the N-fold run this module exists to prevent); the next scheduled time tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from replicator.config import MqttConfig
from replicator.daemon.fleet_status import read_fleet
from replicator.fleet import FleetView
from replicator.group_leader import group_leader

log = logging.getLogger("replicator.daemon")

FleetReader = Callable[[MqttConfig], Awaitable[FleetView]]


class GroupJobs:
    """Decides, when a scheduled job is due, whether this instance runs it."""

    def __init__(
        self, mqtt: MqttConfig | None, instance: str, *, read: FleetReader = read_fleet
    ) -> None:
        self.mqtt = mqtt
        self.instance = instance
        self._read = read
        self.leaders: dict[str, str] = {}  # job -> the leader seen at its last due time, if read

    @property
    def group(self) -> str | None:
        return self.mqtt.group if self.mqtt is not None else None

    async def leads(self, job: str) -> bool:
        """Whether this instance runs `job` now (always, without a group)."""
        if self.mqtt is None or self.mqtt.group is None:
            return True
        group = self.mqtt.group
        try:
            view = await self._read(self.mqtt)
        except Exception as exc:  # BusUnavailable, or anything the read ran into
            self.leaders.pop(job, None)  # unknown now
            log.warning(
                "scheduled %s skipped by %s: cannot read the members of group %s from the "
                "broker (%s); the next scheduled time tries again",
                job,
                self.instance,
                group,
                exc,
            )
            return False
        leader = group_leader(view.members, group, self.instance)
        if self.leaders.get(job) != leader:
            whose = "this instance" if leader == self.instance else "not this instance"
            log.info(
                "scheduled %s of group %s runs on %s (%s, %s)",
                job,
                group,
                leader,
                whose,
                self.instance,
            )
        self.leaders[job] = leader
        if leader != self.instance:
            log.debug("scheduled %s left to %s, the leader of group %s", job, leader, group)
        return leader == self.instance

    def on_leader(
        self,
        job: str,
        run: Callable[[], Awaitable[None]],
        on_follow: Callable[[], None] | None = None,
    ) -> Callable[[], Awaitable[None]]:
        """`run` wrapped to run only while this instance leads its group; `on_follow`
        runs instead when another member leads (e.g. to stop exporting what this
        instance measured while it led: the leader's figures are the current ones)."""

        async def gated() -> None:
            if await self.leads(job):
                await run()
            elif on_follow is not None and self.leaders.get(job) not in (None, self.instance):
                on_follow()

        return gated
