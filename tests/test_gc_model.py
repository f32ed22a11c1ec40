"""The retention state machine (tests/harness/retention_model.py), bounded for CI: eight
examples of up to 20 steps on one real registry. benchmarks/model_retention.py runs it
longer."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.harness.retention_model import RetentionMachine


def test_retention_model_on_a_real_registry(registry, tmp_path) -> None:
    RetentionMachine.registry = registry
    RetentionMachine.workdir = tmp_path
    run_state_machine_as_test(
        RetentionMachine,
        settings=settings(
            max_examples=8,
            stateful_step_count=20,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            # no shrinking: a replay meets a registry whose state moved on, which
            # hypothesis would report as flaky data instead of the failure itself
            phases=(Phase.generate,),
        ),
    )
