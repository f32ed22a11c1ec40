"""The retention state machine, run long: many random sequences of push, re-tag, tag
delete, digest delete and GC (dry run, then real) on one real registry, each checked
against the model (tests/harness/retention_model.py). CI runs a few short examples
(tests/test_gc_model.py); run this before changing retention, ranking or either GC
pass.

Run: .venv/bin/python benchmarks/model_retention.py [--examples 200] [--steps 40]
Prints one JSON line: examples, steps, seconds, and what the GC runs did (runs per
pass, items deleted, tags kept by each reason); exits non-zero with hypothesis's
shrunk counterexample when an invariant fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

from tests.harness.registry import Registry  # noqa: E402
from tests.harness.retention_model import RetentionMachine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="model-retention-") as tmp:
        reg = Registry(root=Path(tmp) / "registry").start()
        try:
            RetentionMachine.registry = reg
            RetentionMachine.workdir = Path(tmp)
            started = time.monotonic()
            run_state_machine_as_test(
                RetentionMachine,
                settings=settings(
                    max_examples=args.examples,
                    stateful_step_count=args.steps,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                    # no shrinking: a replay meets a registry whose state moved on (shared
                    # blobs, the clock), which hypothesis reports as flaky data; the
                    # failing sequence is printed as generated
                    phases=(Phase.generate,),
                ),
            )
            report = {
                "examples": args.examples,
                "steps": args.steps,
                "seconds": round(time.monotonic() - started, 1),
                **RetentionMachine.stats,
            }
            print(json.dumps(report))
        finally:
            reg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
