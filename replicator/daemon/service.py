"""The daemon: one asyncio process wiring intake, event bus, work queue and schedules.

Flow of one push: the registry POSTs a webhook -> intake journals the event
(answering 2xx only once it is durable) -> the event is published on the bus
(MQTT QoS 1, or in-process) -> a subscriber turns it into tasks in its journal
(coalesced, deduplicated) -> workers lease tasks and run the copy engine ->
the task completes or is retried with backoff, ending as a dead letter after
too many attempts.

Crash safety: an event is journaled before it is acknowledged; events still
'new' (published to nobody) are re-published at start and periodically; tasks
are leased, so a SIGKILL leaves leases that expire and return to the queue; a
periodic reconcile per rule covers whatever webhooks the registries dropped.

Never stuck, never stale: the default instance id is stable across restarts
(`identity`), so a restarted daemon returns its dead predecessor's leases at once;
every daemon returns anyone's expired leases continuously; a worker renews its lease
while it copies and, right before writing a manifest, renews it once more (a worker
that lost its lease writes nothing); before writing a tag it asks the source where
the tag points now (if it moved on or is gone, this task ends superseded and writes
nothing: the newer push or the delete is other work, maybe another daemon's, and no
older digest lands last nor a deleted tag comes back). A task that no longer matches
the rule in force (a failover moved its source or target since it was queued) ends
`cancelled` without running (`replicator.task_scope`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import uvicorn

from replicator import telemetry
from replicator.blob_index import BlobIndex
from replicator.clients import ClientPool
from replicator.config import Config, Rule, load_config
from replicator.copy import CopyEngine, CopyJob, CopyOptions
from replicator.daemon import housekeeping
from replicator.daemon.bus import EventBus, InProcessBus, MqttBus
from replicator.daemon.dispatch import SourceTags, needs_source_tags, tasks_for_event
from replicator.daemon.fleet_status import StatusPublisher, mqtt_settings
from replicator.daemon.group_jobs import GroupJobs
from replicator.daemon.identity import (
    InstanceIdentity,
    check_journal_directory,
    claim_identity,
)
from replicator.daemon.intake import SiteIntake, create_app
from replicator.daemon.notify import Notifier
from replicator.daemon.schedule import Periodic
from replicator.deletes import DeleteSite, delete_digest, delete_tag
from replicator.errors import ConfigError, ReplicatorError
from replicator.events import RegistryEvent
from replicator.journal import Journal, QueueError, Task, WorkQueue
from replicator.journal.tasks import DEFAULT_LEASE_SECONDS
from replicator.logs import log_context
from replicator.manifest import is_digest
from replicator.metrics import DRIFT_KINDS, METRICS, Metrics
from replicator.registry.client import RegistryClient
from replicator.registry.errors import RegistryError
from replicator.rules import cosign_subject, covers, effective_rules
from replicator.source_check import DAEMON_SETTLE_SECONDS, SourceMoved, confirm_source_tag
from replicator.sync import Reconciler, rules_in_force
from replicator.task_scope import out_of_scope

log = logging.getLogger("replicator.daemon")

REDISPATCH_AFTER = 30.0  # an event still 'new' this long after arrival is re-published
POLL_INTERVAL = 1.0  # how often workers look for tasks whose retry time has come
GAUGE_REFRESH = 5.0  # how often journal-backed gauges are re-read between scrapes
HEARTBEATS_PER_LEASE = 3  # renewals per lease term: two can fail before the lease is lost
REQUEUE_CHECKS_PER_LEASE = 4  # expired leases are returned within a quarter term of expiry
# after --drain-timeout, how long cancelled work (copies, reconcile, GC, verify) may take to
# reach a safe point before the process exits without it
STOP_GRACE = 5.0


def _left(until: float) -> float:
    return max(0.0, until - time.monotonic())


class LeaseLost(ReplicatorError):
    """The task's lease passed to another worker: this one must write nothing more."""


class OutOfScope(ReplicatorError):
    """The task no longer matches the rule in force (a failover moved it): nothing more
    may be written; the message says why (`task_scope.out_of_scope`)."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self):  # uvicorn >= 0.29
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


class Daemon:
    def __init__(
        self,
        config_path: str | os.PathLike[str],
        *,
        instance_id: str | None = None,
        workers: int = 8,
        drain_timeout: float = 8.0,
        retry_base: float = 2.0,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        metrics: Metrics | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.config: Config = load_config(self.config_path)
        self.journal = Journal(self.config.journal)
        explicit = instance_id or (self.config.mqtt.client_id if self.config.mqtt else None)
        try:
            check_journal_directory(self.journal.path)  # also with an explicit identity
            self.identity = (
                InstanceIdentity(explicit)
                if explicit
                else claim_identity(self.journal.path, self.journal.installation_id)
            )
        except BaseException:
            self.journal.close()
            raise
        self.instance_id = self.identity.id
        self.workers = workers
        self.drain_timeout = drain_timeout
        self.metrics = metrics or METRICS
        self.telemetry = telemetry.setup_telemetry(
            self.config, metrics=self.metrics, instance_id=self.instance_id
        )
        self.notifier = Notifier.from_env()
        self.queue = WorkQueue(
            self.journal, self.instance_id, backoff_base=retry_base, lease_seconds=lease_seconds
        )
        self.pool = ClientPool(self.config, observer=self.metrics.request_observer())
        self.engine = CopyEngine(BlobIndex(self.journal), before_manifest_put=self._before_put)
        self._last_event_at: float | None = None  # when the bus last delivered an event
        self.fleet: StatusPublisher | None = None  # with MQTT: our status for `status`
        self._fleet_task: asyncio.Task | None = None
        self.bus: EventBus = self._make_bus()
        # scheduled GC and verify: once per MQTT group, on its leader (group_jobs)
        self.group_jobs = GroupJobs(self.config.mqtt, self.instance_id)
        self.rules: list[Rule] = list(self.config.rules)
        self._stop = asyncio.Event()
        self._work_ready = asyncio.Event()
        self._to_mark: list[tuple[str, str]] = []  # (site, event id) to mark, batched
        self._mark_ready = asyncio.Event()
        self._running: dict[int, asyncio.Task] = {}
        self._periodic: dict[str, Periodic] = {}
        self._background: list[asyncio.Task] = []
        self._server: _Server | None = None
        self._task_counts: dict[str, int] = {}  # journal-backed gauges, last refresh
        self._oldest_unfinished: dict[tuple[str, str], float] = {}
        self.started = asyncio.Event()
        self.abandoned: list[str] = []  # tasks that ignored the stop (see _shutdown)

    # ------------------------------------------------------------------ set-up
    def _make_bus(self) -> EventBus:
        mqtt = self.config.mqtt
        if mqtt is None:
            return InProcessBus()
        self.fleet = StatusPublisher(
            mqtt, self.instance_id, self.journal.status.queue_summary, lambda: self._last_event_at
        )
        return MqttBus(mqtt_settings(mqtt, self.instance_id, will=self.fleet.will))

    def _intake_sites(self) -> dict[str, SiteIntake]:
        return {
            name: SiteIntake(name, site.webhook_token()) for name, site in self.config.sites.items()
        }

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: self._background.append(asyncio.create_task(self.reload(), name="reload")),
        )
        try:
            await self._start()
            self.notifier.ready(f"serving on {self.config.listen}")
            self.started.set()
            log.info("daemon %s ready on %s", self.instance_id, self.config.listen)
            await self._stop.wait()
        finally:
            await self._shutdown()
        return 0

    async def _start(self) -> None:
        requeued = await self.queue.requeue_expired()
        released = await self.queue.release_predecessor()
        if requeued or released:
            log.info(
                "returned %d expired leases and %d leases of %s's previous run to the queue",
                requeued,
                released,
                self.instance_id,
            )
        self.rules = await rules_in_force(self.config, self.journal)
        self._install_metrics()
        await self._refresh_gauges()
        await self.bus.start(self._on_event)
        if self.fleet is not None and isinstance(self.bus, MqttBus):
            self._fleet_task = asyncio.create_task(self.fleet.loop(self.bus), name="fleet-status")
        # events journaled by a previous life but never handed to the bus go out first
        leftover = await self.journal.events.by_state("new")
        if leftover:
            log.info("re-publishing %d events journaled before the last stop", len(leftover))
            await self._publish(leftover)
        app = create_app(
            sites=self._intake_sites(),
            journal=self.journal,
            on_events=self._publish,
            ready_check=self._ready,
            metrics=self.metrics,
            before_metrics=self._refresh_gauges,
        )
        host, port = self.config.listen_host, self.config.listen_port
        self._server = _Server(
            uvicorn.Config(
                app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
            )
        )
        serve = asyncio.create_task(self._server.serve(), name="http")
        self._background.append(serve)
        while not self._server.started:
            if serve.done():
                exc = serve.exception()
                raise ReplicatorError(
                    f"cannot listen on {self.config.listen}: {exc or 'server exited'}"
                )
            await asyncio.sleep(0.01)
        self._background += [
            asyncio.create_task(self._work_loop(), name="workers"),
            asyncio.create_task(self._requeue_loop(), name="requeue-expired"),
            asyncio.create_task(self._redispatch_loop(), name="redispatch"),
            asyncio.create_task(self._mark_loop(), name="mark-dispatched"),
            asyncio.create_task(self._watchdog_loop(), name="watchdog"),
            asyncio.create_task(self._gauge_loop(), name="gauges"),
            asyncio.create_task(self._housekeeping_loop(), name="housekeeping"),
        ]
        self._schedule_reconciles()
        self._schedule_gc()
        self._schedule_verify()

    # --------------------------------------------------------------- shutdown
    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping: draining in-flight copies (at most %.0fs)", self.drain_timeout)
            self.notifier.stopping()
            self._stop.set()

    async def _shutdown(self) -> None:
        """In-flight copies get `drain_timeout`; then whatever still runs (copies,
        reconcile, GC, verify, the loops) is cancelled and gets STOP_GRACE more to reach a
        safe point (storage GC stops between two journaled items). Anything still running
        then is logged and abandoned (`abandoned`): the process exits regardless, and
        the journal keeps the work for the next start."""
        drained = time.monotonic() + self.drain_timeout
        if self._server is not None:
            # stop taking webhooks first: a registry whose POST is refused keeps the event
            # and delivers it after the restart, so nothing arrives for a stopped bus
            self._server.should_exit = True
            http = next((t for t in self._background if t.get_name() == "http"), None)
            if http is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(http), min(5.0, _left(drained)))
        periodic: list[asyncio.Task] = [
            t for p in self._periodic.values() if (t := getattr(p, "task", None)) is not None
        ]
        for task in periodic:
            task.cancel()
        copies = list(self._running.values())
        if copies:
            await asyncio.wait(copies, timeout=_left(drained))
        deadline = time.monotonic() + STOP_GRACE  # for everything cancelled from here on
        await self._cancel_within([*copies, *periodic], deadline)
        with contextlib.suppress(Exception):
            await self.queue.release_owned()  # unfinished work goes back for the next start
        await self._say_stopped()
        with contextlib.suppress(Exception):
            # bounded: a handler that keeps failing must not hold up the exit; what it did
            # not finish stays in the journal (in-process) or the broker session (MQTT)
            async with asyncio.timeout(max(1.0, _left(drained))):
                await self.bus.stop()
        with contextlib.suppress(Exception):
            await self._flush_marks()
        # the HTTP server was told to exit above: waited for, not cancelled
        await self._cancel_within(self._background, deadline, minimum=1.0, spare="http")
        await self.pool.aclose()
        self.journal.close()
        self.identity.release()
        self.notifier.close()

    async def _say_stopped(self) -> None:
        """Publish `stopped` (bounded): a clean disconnect does not send the will. The
        periodic publisher ends first, so no `online` can overtake it."""
        task, self._fleet_task = self._fleet_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.fleet is not None and isinstance(self.bus, MqttBus) and self.bus.connected:
            with contextlib.suppress(Exception):
                await self.fleet.stopped(self.bus)

    async def _cancel_within(
        self, tasks: list[asyncio.Task], deadline: float, minimum: float = 0.1, spare: str = ""
    ) -> None:
        """Cancel `tasks` (but the one named `spare`) and wait for them until `deadline` (at
        least `minimum` s); log and remember those that did not end (a thread stuck in
        the kernel, say)."""
        running = [t for t in tasks if not t.done()]
        for task in running:
            if task.get_name() != spare:
                task.cancel()
        if not running:
            return
        _done, pending = await asyncio.wait(running, timeout=max(minimum, _left(deadline)))
        for task in pending:
            log.warning(
                "stopping: %s did not end within the stop timeout (--drain-timeout + %.0fs); "
                "abandoned, its work stays in the journal for the next start",
                task.get_name(),
                STOP_GRACE,
            )
            self.abandoned.append(task.get_name())

    # ----------------------------------------------------------------- reload
    async def reload(self) -> None:
        """SIGHUP: re-read the configuration; queued work is kept. A bad file is refused
        and the running configuration stays in force."""
        self.notifier.reloading()
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.notifier.ready("reload refused: configuration invalid")
            return
        old_pool = self.pool
        self.config = config
        self.pool = ClientPool(config, observer=self.metrics.request_observer())
        self.metrics.know(config)
        self.rules = await rules_in_force(config, self.journal)
        # a reconcile or GC run in progress finishes; its successor shares its lock
        previous = self._periodic
        for periodic in previous.values():
            periodic.stop()
        self._periodic = {}
        self._schedule_reconciles(previous)
        self._schedule_gc(previous)
        self._schedule_verify(previous)
        # in-flight copies keep the old clients until they finish
        self._background.append(
            asyncio.create_task(
                self._close_later(old_pool, list(self._running.values()), list(previous.values())),
                name="close-old-pool",
            )
        )
        log.info("configuration reloaded: %d rules", len(self.rules))
        self.notifier.ready("configuration reloaded")

    async def _close_later(
        self, pool: ClientPool, users: list[asyncio.Task], periodics: list[Periodic]
    ) -> None:
        """Close the previous configuration's clients once nothing uses them: the copies
        running at reload time and any reconcile or GC run then in progress."""
        await asyncio.gather(*users, return_exceptions=True)
        for periodic in periodics:
            async with periodic.running:
                pass
        await pool.aclose()

    # ----------------------------------------------------------- event intake
    async def _publish(self, events: list[RegistryEvent]) -> None:
        """Intake hook: an event is handed to the bus before the webhook is answered.
        Pulls are not: the journal has counted them and nothing plans on one, so a broker
        outage never holds up a registry's webhooks behind its pull events."""
        pulls = [e for e in events if e.action == "pull"]
        if pulls:
            self._mark_dispatched(pulls)
            events = [e for e in events if e.action != "pull"]
        for event in events:
            with telemetry.span(
                "event",
                site=event.site,
                action=event.action,
                tag=event.tag,
                repository=event.repository,
                digest=event.digest,
                event_id=event.id,
            ):
                await self.bus.publish(event)  # the bus carries this span's traceparent
        if not isinstance(self.bus, InProcessBus):
            self._mark_dispatched(events)  # durable in the broker now

    def _mark_dispatched(self, events: list[RegistryEvent]) -> None:
        """Marking is kept off the webhook's critical path (the registry sends one event
        at a time, so every journal round trip in the answer delays all later events) and
        batched across concurrent webhooks. A crash before the mark only re-publishes the
        event at the next start; handling is idempotent."""
        self._to_mark += [(e.site, e.id) for e in events]
        self._mark_ready.set()

    async def _flush_marks(self) -> None:
        while self._to_mark:
            keys, self._to_mark = self._to_mark, []
            await self.journal.events.mark(keys, "dispatched")

    async def _mark_loop(self) -> None:
        while True:
            await self._mark_ready.wait()
            self._mark_ready.clear()
            try:
                await self._flush_marks()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "marking events dispatched failed (they stay 'new' and are "
                    "re-published later): %s",
                    exc,
                )

    async def _redispatch_loop(self) -> None:
        """Events journaled but never published (a crash, a broker outage) go out again."""
        while True:
            try:
                stale = await self.journal.events.by_state(
                    "new", received_before=time.time() - REDISPATCH_AFTER, limit=500
                )
                if stale:
                    log.info("re-publishing %d journaled events", len(stale))
                    await self._publish(stale)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("re-publishing journaled events failed: %s", exc)
            await asyncio.sleep(REDISPATCH_AFTER / 3)

    async def _on_event(self, event: RegistryEvent, trace_context: Mapping[str, str]) -> None:
        """Bus handler. The in-process bus is only memory, so its events count as
        dispatched once handled (their tasks are in the journal), not once queued: a
        SIGKILL with events still queued then re-publishes them at the next start."""
        await self._plan(event, trace_context)
        self._last_event_at = time.time()
        if isinstance(self.bus, InProcessBus):
            self._mark_dispatched([event])

    async def _plan(self, event: RegistryEvent, trace_context: Mapping[str, str]) -> None:
        """Turn one event into tasks (durably) and wake the workers."""
        if event.action in ("push", "mount") and event.digest and not event.is_manifest:
            # a blob landed in that repository: a future mount source on that registry
            site = self.config.sites.get(event.site)
            if site is not None:
                await self.engine.blob_index.record(site.url, event.digest, event.repository)
            return
        await self._remember(event)
        if event.action == "push" and event.digest:
            source = await self.journal.ledger.was_replicated_here(
                event.site, event.repository, event.digest, event.tag
            )
            if source is not None:
                log.debug(
                    "event %s at %s is our own replication from %s; not bounced back",
                    event.id,
                    event.site,
                    source,
                )
                return
        if event.action == "delete" and await self.journal.tombstones.performed_here(
            event.site, event.repository, tag=event.tag, digest=None if event.tag else event.digest
        ):
            log.debug(
                "delete event %s at %s is our own delete; not propagated", event.id, event.site
            )
            return
        listing = await self._source_tags(event)
        specs = tasks_for_event(self.config, self.rules, event, trace_context, listing)
        if specs:
            await self.queue.enqueue(specs)
            self._work_ready.set()

    async def _source_tags(self, event: RegistryEvent) -> SourceTags | None:
        """The source's tags and push times, listed only when a `latest: N` rule must rank
        the pushed tag among them (one listing per such event). A listing that fails
        raises: the bus retries the event rather than guess."""
        if not needs_source_tags(self.config, self.rules, event):
            return None
        tags = await self.pool[event.site].list_tags(event.repository)
        pushed_at = await self.journal.inventory.push_times(event.site, event.repository)
        return SourceTags(tags, pushed_at)

    async def _remember(self, event: RegistryEvent) -> None:
        """Keep the inventory current from webhooks: push times feed retention policies;
        deletes become tombstones (failback tells deleted from never copied by them),
        stamped with our own clock as we handle the event, not the registry's timestamp:
        they are compared with the ledger and failovers (our clock), and a registry
        clock behind would make a delete look older than the copy it undid (catch-up
        and failback would copy the tag back)."""
        inventory = self.journal.inventory
        if event.action == "push" and event.is_manifest and event.tag and event.digest:
            await inventory.record_tags(
                event.site,
                event.repository,
                {event.tag: event.digest},
                event.occurred_at or time.time(),
            )
        elif event.action == "delete":
            await inventory.forget(
                event.site,
                event.repository,
                tag=event.tag,
                digest=None if event.tag else event.digest,
            )
            if event.tag or event.digest:
                await self.journal.tombstones.record(
                    event.site,
                    event.repository,
                    tag=event.tag,
                    digest=event.digest,
                    origin="observed",
                )

    # ----------------------------------------------------------------- workers
    async def _work_loop(self) -> None:
        while not self._stop.is_set():
            # cleared BEFORE leasing: a wake-up set while the lease runs is not lost
            self._work_ready.clear()
            free = self.workers - len(self._running)
            if free > 0:
                limits = {name: site.limits.concurrency for name, site in self.config.sites.items()}
                try:
                    tasks = await self.queue.lease(free, None, limits)
                except Exception as exc:
                    log.error("leasing tasks failed: %s", exc)
                    tasks = []
                for task in tasks:
                    runner = asyncio.create_task(self._execute(task), name=f"task-{task.id}")
                    self._running[task.id] = runner
                    runner.add_done_callback(functools.partial(self._finished, task.id))
                if tasks:
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work_ready.wait(), POLL_INTERVAL)

    async def _requeue_loop(self) -> None:
        """Return expired leases (a crashed or frozen worker of any daemon on this
        journal) continuously, not only at start: a live daemon takes over the work."""
        interval = self.queue.lease_seconds / REQUEUE_CHECKS_PER_LEASE
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.queue.requeue_expired():
                    self._work_ready.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("returning expired task leases failed: %s", exc)

    def _finished(self, task_id: int, _runner: asyncio.Task) -> None:
        self._running.pop(task_id, None)
        self._work_ready.set()

    def _rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    async def _execute(self, task: Task) -> None:
        """Run the task while a heartbeat renews its lease; if the lease is lost anyway
        (this process was frozen past the term), the work is abandoned at once."""
        # the span continues the trace the task was journaled with; the copy and its
        # heartbeat start inside the task's log context (asyncio copies it into both),
        # so every line they log carries the task's fields as keys
        with telemetry.replicate_span(task), log_context(**_log_fields(task)):
            work = asyncio.create_task(self._execute_task(task), name=f"work-{task.id}")
            beat = asyncio.create_task(self._heartbeat(task), name=f"heartbeat-{task.id}")
            try:
                await asyncio.wait({work, beat}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                work.cancel()
                beat.cancel()
                await asyncio.gather(work, beat, return_exceptions=True)
            if not work.cancelled() and (error := work.exception()) is not None:
                raise error

    async def _heartbeat(self, task: Task) -> None:
        """Renew the lease every fraction of its term; returns only once it is lost."""
        interval = self.queue.lease_seconds / HEARTBEATS_PER_LEASE
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.queue.renew(task.id):
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("renewing the lease of task %d failed (will retry): %s", task.id, exc)
                continue
            log.warning(
                "task %d lost its lease (%s %s -> %s/%s): another worker has it; abandoning",
                task.id,
                task.action,
                task.reference,
                task.target_site,
                task.target_repository,
            )
            return

    async def _in_force(self, task: Task) -> tuple[Rule | None, str | None]:
        """The task's rule as in force now, and why the task must not run (None: it may).
        Read from the journal for every task, not from the rules of the last reload: a
        failover recorded by the CLI moves the rules at once, SIGHUP or not, and a task
        queued before it (from the lost site, say) must not overwrite or delete what the
        promoted site wrote since."""
        failovers = await self.journal.failovers.active(with_detail=False)
        rules = effective_rules(self.config, [(f.lost_site, f.promoted_site) for f in failovers])
        rule = next((r for r in rules if r.name == task.rule), None)
        return rule, out_of_scope(task, rules, failovers)

    async def _cancel_out_of_scope(self, task: Task, why: str) -> None:
        log.warning("%s", why)
        if not await self.queue.supersede(task.id, why):
            log.warning("task %d finished after it lost its lease", task.id)

    async def _execute_task(self, task: Task) -> None:
        configured = any(r.name == task.rule for r in self.config.rules)
        try:
            if not configured:
                await self.queue.fail(
                    task.id, f"rule {task.rule!r} is no longer configured", retryable=False
                )
                return
            rule, why = await self._in_force(task)
            if rule is None or why is not None:
                await self._cancel_out_of_scope(task, why or f"rule {task.rule!r} not in force")
                return
            src, dst = self.pool[task.source_site], self.pool[task.target_site]
            if task.action == "copy":
                await self._copy(task, rule, src, dst)
            else:
                await self._delete(task, rule, src, dst)
        except asyncio.CancelledError:
            raise  # shutdown: the lease is released and the task runs again next time
        except (RegistryError, ConfigError) as exc:
            await self._failed(task, str(exc), retryable=True)
        except Exception as exc:
            log.exception("task %d crashed", task.id)
            await self._failed(task, f"{type(exc).__name__}: {exc}", retryable=True)

    async def _copy(self, task: Task, rule: Rule, src: RegistryClient, dst: RegistryClient) -> None:
        image = cosign_subject(task.tag) if task.tag else None
        if image and await dst.head_manifest(task.target_repository, image) is None:
            # a cosign tag travels with its image: the image's copy brings it along
            log.info("task %d: %s waits for its image %s at the target", task.id, task.tag, image)
            if not await self.queue.complete(task.id):
                log.warning("task %d finished after it lost its lease", task.id)
            return
        options = CopyOptions(
            platforms=rule.platform_list or None,
            referrers=rule.referrers,
            overwrite=rule.overwrite or image is not None,  # re-signed: the tag follows
            before_put=functools.partial(self._fence, task),
        )
        try:
            result = await self.engine.copy(
                src,
                task.repository,
                task.reference,
                dst,
                task.target_repository,
                tag=task.tag,
                options=options,
            )
        except LeaseLost as exc:
            log.warning("%s", exc)
            return
        except OutOfScope as exc:
            await self._cancel_out_of_scope(task, str(exc))
            return
        except SourceMoved as exc:
            log.info("task %d superseded: %s", task.id, exc)
            await self.queue.supersede(task.id, f"superseded: {exc}")
            return
        stats = result.stats
        m = self.metrics
        m.bytes_uploaded.inc(stats.bytes_uploaded, target=task.target_site)
        m.blobs.inc(stats.blobs_uploaded, target=task.target_site, outcome="uploaded")
        m.blobs.inc(stats.blobs_mounted, target=task.target_site, outcome="mounted")
        m.blobs.inc(stats.blobs_existing, target=task.target_site, outcome="existing")
        if result.status == "failed":
            await self._failed(task, result.error or "copy failed", result.retryable)
        elif result.status == "conflict":
            await self._failed(
                task,
                f"{result.target} differs from the source and the rule says overwrite: false",
                retryable=False,
            )
        elif not await self.queue.complete(task.id):
            log.warning("task %d finished after it lost its lease", task.id)
        else:
            log.info(
                "task %d: %s %s -> %s (%s); blobs uploaded %d, mounted %d, existing %d; %d B",
                task.id,
                result.status,
                result.source,
                result.target,
                result.digest,
                stats.blobs_uploaded,
                stats.blobs_mounted,
                stats.blobs_existing,
                stats.bytes_uploaded,
            )

    async def _fence(self, task: Task, job: CopyJob, digest: str, ref: str) -> None:
        """Right before a manifest write. Before the task's tag is written, the source is
        asked where that tag points now (`replicator.source_check`): if it moved on or
        is gone, this copy writes nothing, whatever this journal knows (the delete or
        the newer push may be another daemon's). Then the lease must still be ours
        (renewing it covers the write)."""
        _rule, why = await self._in_force(task)
        if why is not None:  # a failover recorded while this copy ran
            raise OutOfScope(why)
        if ref == task.tag:
            store = self.config.sites[task.source_site].storage
            await confirm_source_tag(job, ref, settle=DAEMON_SETTLE_SECONDS, store=store)
        if not await self.queue.renew(task.id):
            raise LeaseLost(
                f"task {task.id} lost its lease before writing {job.target_site}/"
                f"{job.dst_repo}:{ref}; another worker has it, nothing written"
            )

    async def _delete(
        self, task: Task, rule: Rule, src: RegistryClient, dst: RegistryClient
    ) -> None:
        """The delete protocol (`replicator.deletes`): re-checked at the source, a tag
        deleted by tag alone, a manifest only when no tag at the target is left on it."""
        if not await self.queue.renew(task.id):  # a delete is fenced like a manifest write
            log.warning("task %d lost its lease before deleting; nothing deleted", task.id)
            return
        _rule, why = await self._in_force(task)
        if why is not None:  # a failover recorded while this task waited for its lease
            await self._cancel_out_of_scope(task, why)
            return
        source = DeleteSite(src, task.source_site, task.repository)
        target = DeleteSite(dst, task.target_site, task.target_repository)
        if task.tag:
            result = await delete_tag(source, target, task.tag, journal=self.journal)
        elif task.digest:
            result = await delete_digest(
                source,
                target,
                task.digest,
                lambda tag: covers(rule, tag),
                journal=self.journal,
            )
        else:  # unreachable: TaskSpec.validate requires a tag or a digest
            raise QueueError(f"task {task.id} names neither a tag nor a digest")
        log.info("task %d: delete %s", task.id, result.describe())
        if not await self.queue.complete(task.id):
            log.warning("task %d finished after it lost its lease", task.id)

    async def _failed(self, task: Task, error: str, retryable: bool) -> None:
        telemetry.record_failure(error, retryable=retryable)
        await self.queue.fail(task.id, error[:2000], retryable)
        row = await self.queue.get(task.id)
        if row is not None and row.state == "dead":
            self.metrics.dead_letters.inc(rule=task.rule, target=task.target_site)
        else:
            self.metrics.retries.inc(rule=task.rule, target=task.target_site)
        log.warning(
            "task %d (%s %s -> %s/%s) failed: %s",
            task.id,
            task.action,
            task.reference,
            task.target_site,
            task.target_repository,
            error[:500],
        )

    async def _before_put(self, job: CopyJob, digest: str, ref: str) -> None:
        """Loop guard: remember our own push before the target can tell us about it."""
        tag = None if is_digest(ref) else ref
        await self.journal.ledger.record(
            job.target_site, job.dst_repo, digest, job.source_site, tag
        )

    # --------------------------------------------------------------- schedules
    def _schedule_reconciles(self, previous: Mapping[str, Periodic] | None = None) -> None:
        for rule in self.rules:
            if rule.interval is None and rule.schedule is None:
                continue
            name = f"reconcile:{rule.name}"
            old = (previous or {}).get(name)
            periodic = Periodic(
                name,
                functools.partial(self.reconcile, [rule.name]),
                interval=rule.interval,
                cron=rule.schedule,
                tz=self.config.tzinfo,
                jitter=min(5.0, (rule.interval or 60) / 10),
                lock=old.running if old else None,
            )
            periodic.task = asyncio.create_task(periodic.loop(), name=name)  # type: ignore
            self._periodic[name] = periodic

    async def reconcile(self, rule_names: list[str] | None = None) -> None:
        reconciler = Reconciler(self.config, self.journal, self.pool, self.engine)
        report = await reconciler.run(
            rule_names,
            rules=self.rules if not rule_names else [r for r in self.rules if r.name in rule_names],
        )
        counts = report.counts()
        log.info("reconcile %s: %s", ",".join(rule_names or ["all"]), counts)
        for name in rule_names or [r.name for r in self.rules]:
            outcome = "failed" if report.failures else "ok"
            self.metrics.reconcile_runs.inc(rule=name, outcome=outcome)
        if report.failures:
            raise ReplicatorError("; ".join(report.failures[:5]))

    def _schedule_gc(self, previous: Mapping[str, Periodic] | None = None) -> None:
        if not self.config.gc.schedule or not self.config.gc.policies:
            return
        old = (previous or {}).get("gc")
        periodic = Periodic(
            "gc",
            self.group_jobs.on_leader("gc", self.collect_garbage, self._collected_elsewhere),
            cron=self.config.gc.schedule,
            tz=self.config.tzinfo,
            lock=old.running if old else None,
        )
        periodic.task = asyncio.create_task(periodic.loop(), name="gc")  # type: ignore
        self._periodic["gc"] = periodic

    async def collect_garbage(self) -> None:
        from replicator.gc.scheduled import run_policies

        try:
            results = await run_policies(self.config, self.journal, self.pool, dry_run=False)
        except Exception:
            for site in self.config.sites:
                self.metrics.gc_runs.inc(site=site, outcome="failed")
            raise
        for result in results:
            self.metrics.gc_runs.inc(site=result.site, outcome="failed" if result.errors else "ok")
            self.metrics.gc_reclaimed.inc(result.bytes_reclaimed, site=result.site)
            if not result.errors:
                self.metrics.gc_last_success.set(time.time(), site=result.site)

    async def _housekeeping_loop(self) -> None:
        """Keep the journal the size of what matters (replicator.daemon.housekeeping)."""
        start_id = 0
        while True:
            self.journal.events.keep_pull_rows = housekeeping.uses_pull_times(self.config)
            await asyncio.sleep(housekeeping.INTERVAL)
            try:
                report = await housekeeping.housekeep(
                    self.config,
                    self.journal,
                    self.pool,
                    actor=f"daemon {self.instance_id}",
                    start_id=start_id,
                )
                start_id = report.next_id
            except Exception as exc:
                log.warning("journal housekeeping failed (next pass will retry): %s", exc)

    def _schedule_verify(self, previous: Mapping[str, Periodic] | None = None) -> None:
        """`verify:` in the configuration: compare replicas on its cron, and once at start so
        the drift gauge tells the truth before the first scheduled time."""
        if self.config.verify is None:
            return
        old = (previous or {}).get("verify")
        periodic = Periodic(
            "verify",
            self.group_jobs.on_leader("verify", self.verify_replicas, self._verified_elsewhere),
            cron=self.config.verify.schedule,
            tz=self.config.tzinfo,
            run_at_start=old is None,
            lock=old.running if old else None,
        )
        periodic.task = asyncio.create_task(periodic.loop(), name="verify")  # type: ignore
        self._periodic["verify"] = periodic

    async def verify_replicas(self) -> None:
        """One scheduled verify: log the drift and export it as the drift gauge."""
        from replicator.verifier import verify

        assert self.config.verify is not None  # scheduled only when configured
        report = await verify(
            self.config, self.pool, self.rules, journal=self.journal, deep=self.config.verify.deep
        )
        for (rule, target, kind), count in report.drift_counts().items():
            self.metrics.drift_tags.set(count, rule=rule, target=target, kind=kind)
        for line in report.lines()[: len(report.summaries) + 20]:  # summaries, then some drift
            (log.warning if report.drift else log.info)("verify: %s", line)
        if report.errors:
            raise ReplicatorError("; ".join(report.errors[:5]))
        self.metrics.verify_last_success.set(time.time())

    def _verified_elsewhere(self) -> None:
        """Another member of the group verifies: this instance's drift gauge and last
        success go to 0 ("never"), so what it saw while it led cannot keep an alert
        firing or go stale (the shipped alerts take the max and ignore 0)."""
        for rule in self.rules:
            for target in rule.to:
                for kind in DRIFT_KINDS:
                    self.metrics.drift_tags.set(0, rule=rule.name, target=target, kind=kind)
        self.metrics.verify_last_success.set(0)

    def _collected_elsewhere(self) -> None:
        """Another member of the group collects: as `_verified_elsewhere`, for GC."""
        for site in self.config.sites:
            self.metrics.gc_last_success.set(0, site=site)

    # ----------------------------------------------------------------- health
    async def _ready(self) -> dict:
        checks: dict = {"bus": {"ok": self.bus.connected, "detail": type(self.bus).__name__}}
        return checks

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval()
        while True:
            if interval:
                self.notifier.watchdog()
            await asyncio.sleep(interval or 30)

    def _install_metrics(self) -> None:
        """Journal-backed gauges render the values of the last refresh, so a scrape (or an
        OpenTelemetry export, which reads them on its own thread) never runs SQL; the
        intake refreshes them before each scrape and `_gauge_loop` in between."""

        def tasks_by_state() -> dict:
            return {(state,): n for state, n in self._task_counts.items() if n}

        def lag() -> dict:
            now = time.time()
            return {key: max(0.0, now - t) for key, t in self._oldest_unfinished.items()}

        self.metrics.know(self.config)
        self.metrics.tasks.set_function(tasks_by_state)
        self.metrics.replication_lag.set_function(lag)
        self.metrics.bus_connected.set_function(lambda: {(): float(self.bus.connected)})
        self.metrics.watch_budgets(lambda: self.pool.budgets())

    async def _refresh_gauges(self) -> None:
        self._task_counts = await self.queue.counts_by_state()
        self._oldest_unfinished = await self.queue.oldest_unfinished()

    async def _gauge_loop(self) -> None:
        while True:
            await asyncio.sleep(GAUGE_REFRESH)
            try:
                await self._refresh_gauges()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading task gauges from the journal failed: %s", exc)


def _log_fields(task: Task) -> dict[str, object]:
    """What every log line about `task` carries (None fields are left out)."""
    target = f"{task.target_site}/{task.target_repository}" + (f":{task.tag}" if task.tag else "")
    return {
        "task": task.id,
        "rule": task.rule,
        "site": task.source_site,
        "repository": task.repository,
        "tag": task.tag,
        "digest": task.digest,
        "target": target,
    }
