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
