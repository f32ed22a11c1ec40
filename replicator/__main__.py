"""`python -m replicator` is the same as the `registry-replicator` command."""

from replicator.cli import main

raise SystemExit(main())
