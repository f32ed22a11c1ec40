"""The replication state machine (tests/model/replication.py), bounded for CI: a few
examples of a few dozen steps on three real registries. The long run is
benchmarks/model_replication.py."""

from __future__ import annotations

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from tests.model.replication import World, machine_for, settings_kwargs


def test_replication_model(registry_factory, tmp_path):
    world = World({n: registry_factory(n) for n in ("p", "a", "b")}, tmp_path)
    run_state_machine_as_test(
        machine_for(world), settings=settings(**settings_kwargs(examples=3, steps=25))
    )
    assert sum(world.steps.values()) > 0, world.steps


def test_replication_model_re_push_after_a_propagated_delete(registry_factory, tmp_path):
    """An explicit example of the machine (issue 11): a tag replicated, deleted everywhere,
    re-pushed at p, p fails before replicating it, fail over, fail back. Failback must
    spread p's new tag, not take the delete from before the incident for an incident
    delete. Random runs reach this sequence rarely, so it is spelled out. The targets'
    webhooks about the propagated delete are stamped 10 minutes ahead (red-team
    finding 1): that must not make it an incident delete either."""
    world = World({n: registry_factory(n) for n in ("p", "a", "b")}, tmp_path)
    machine = machine_for(world)()
    try:
        machine.push(tag="v1", seed=0)
        machine.push(tag="v2", seed=1)
        machine.reconcile()
        machine.tag_delete(pick=0)  # v1
        machine.reconcile()
        machine.push(tag="v1", seed=2)
        machine.fail_over()
        machine.fail_back()
        machine.reconcile()
        machine.source_is_reachable()
    finally:
        machine.teardown()
    assert world.steps["fail_back"] == 1


def test_replication_model_delete_seen_at_p_before_it_fails(registry_factory, tmp_path):
    """An explicit example (red-team finding 3): v1 replicated, deleted at p with its
    webhook seen (a tombstone at p), p fails before the delete reaches a and b. Failback
    must not copy a's v1 back to p; it deletes it at a (and reconcile at b)."""
    world = World({n: registry_factory(n) for n in ("p", "a", "b")}, tmp_path)
    machine = machine_for(world)()
    try:
        machine.push(tag="v1", seed=0)
        machine.push(tag="v2", seed=1)
        machine.reconcile()
        machine.tag_delete_seen(pick=0, ahead=600.0)  # v1, the registry's clock ahead
        machine.fail_over()
        machine.fail_back()
        machine.reconcile()
        machine.source_is_reachable()
        assert "v1" not in machine.at("a") and "v1" not in machine.at("p")
    finally:
        machine.teardown()
    assert world.steps["fail_back"] == 1
