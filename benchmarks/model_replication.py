"""The replication state machine (tests/model/replication.py) in a long run.

Three real registries (distribution 2.8, as the tests start them), many examples of
many steps: push, re-tag, tag delete, digest delete, reconcile, failover, failback,
each checked against the model. Prints the steps run by kind and the failure, if
any (hypothesis shrinks it to a minimal sequence and prints that).

Run: .venv/bin/python benchmarks/model_replication.py [--examples 40] [--steps 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from tests.harness.registry import Registry
from tests.model.replication import World, machine_for, settings_kwargs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="model-replication-") as tmp:
        root = Path(tmp)
        sites = {n: Registry(root=root / n).start() for n in ("p", "a", "b")}
        world = World(sites, root)
        started = time.monotonic()
        failure = None
        try:
            run_state_machine_as_test(
                machine_for(world),
                settings=settings(**settings_kwargs(args.examples, args.steps)),
            )
        except Exception:
            failure = traceback.format_exc()
        finally:
            for reg in sites.values():
                reg.stop()
        elapsed = time.monotonic() - started
    total = sum(world.steps.values())
    print(f"examples started: {next(world.examples)}; steps run: {total} in {elapsed:.0f} s")
    for kind, count in sorted(world.steps.items()):
        print(f"  {kind:14} {count}")
    if failure:
        print("FAILURE:\n" + failure)
        return 1
    print("failures: 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
