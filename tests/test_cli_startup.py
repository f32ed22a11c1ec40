"""Start-up cost of the command: what a run imports and builds that is not the work.

A user's `registry-replicator sync` pays Python's start-up on every run (issue 15);
these tests pin the modules a run must not load and the objects it must not build
more than once, so a later import at module level cannot quietly bring them back.
"""

from __future__ import annotations

import ast
import ssl
import subprocess
import sys
from pathlib import Path

from replicator.registry.site import SiteEndpoint
from replicator.registry.transport import RetryPolicy, Transport, default_tls
from tests.harness.registry import Registry

# Loaded by nothing a sync run needs: rich (a progress display, only for a terminal)
# and httpx's own command-line client (rich.syntax, pygments).
NOT_FOR_A_RUN = ("rich", "pygments", "rich.syntax")


def _run_and_list_modules(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the command in a fresh interpreter (stderr a pipe, not a terminal) and print,
    last, the modules it had loaded when it finished."""
    code = (
        "import sys\n"
        "from replicator.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print('exit', code)\n"
        "print(sorted(m for m in sys.modules if sys.modules[m] is not None))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def _modules(out: subprocess.CompletedProcess[str]) -> set[str]:
    return set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))


def test_version_loads_no_command(tmp_path: Path):
    out = _run_and_list_modules(["--version"], tmp_path)
    assert out.stdout.splitlines()[0].startswith("registry-replicator "), out.stdout
    assert out.stdout.splitlines()[0].split()[1][0].isdigit()
    assert "exit 0" in out.stdout
    assert not {m for m in _modules(out) if m.startswith("replicator.commands.")}
    assert "pydantic" not in _modules(out)


def test_a_sync_run_loads_none_of_what_it_does_not_use(tmp_path: Path, registry: Registry):
    config = tmp_path / "sync.yaml"
    config.write_text(
        f"journal: {tmp_path / 'journal.db'}\n"
        "sites:\n"
        f"  a: {{url: '{registry.url}', insecure: true}}\n"
        f"  b: {{url: '{registry.url}', insecure: true}}\n"
        "rules:\n"
        "  - {name: r, from: a, to: [b], repositories: ['x/**']}\n"
    )
    out = _run_and_list_modules(["sync", "-c", str(config)], tmp_path)
    assert "exit 0" in out.stdout, out.stderr
    assert "copied 0" in out.stdout
    loaded = _modules(out)
    assert "replicator.journal" in loaded and "httpx" in loaded  # it did run
    assert not loaded & set(NOT_FOR_A_RUN), loaded & set(NOT_FOR_A_RUN)


def test_sites_without_tls_settings_share_one_verifying_context():
    """One CA bundle load per process, not one per site (~35 ms each at start-up)."""
    plain = SiteEndpoint("plain", "http://127.0.0.1:5000", insecure=True)
    public = SiteEndpoint("public", "https://registry.example")
    insecure = SiteEndpoint("lab", "https://lab.example", insecure=True)
    contexts = [Transport(s, RetryPolicy())._http._transport._pool._ssl_context for s in
                (plain, public, insecure)]  # fmt: skip
    assert contexts[0] is contexts[1] is default_tls()
    assert default_tls().verify_mode == ssl.CERT_REQUIRED and default_tls().check_hostname
    assert contexts[2] is not default_tls()  # a site's own TLS settings stay its own
    assert contexts[2].verify_mode == ssl.CERT_NONE


def test_the_command_collects_cyclic_garbage_less_often(tmp_path: Path):
    """The young generation's threshold is raised (cli.GC_YOUNG_THRESHOLD says why); the
    collector stays on, so cycles are still reclaimed."""
    code = (
        "import gc\n"
        "from replicator.cli import GC_YOUNG_THRESHOLD, main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(gc.isenabled(), gc.get_threshold()[0] == GC_YOUNG_THRESHOLD > 700)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert out.stdout.splitlines()[-1] == "True True"
