"""Start-up cost of the command: what a run imports and builds that is not the work.

A user's `registry-replicator sync` pays Python's start-up on every run (issue 15);
these tests pin the modules a run must not load and the objects it must not build
more than once, so a later import at module level cannot quietly bring them back.
"""

from __future__ import annotations

import ast
import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from replicator.registry.site import SiteEndpoint
from replicator.registry.tls import CAsOnFirstUse, default_tls, plain_http_tls
from replicator.registry.transport import RetryPolicy, Transport
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
    """One CA bundle load per process, not one per site (~20 ms each at start-up), and
    none at all while only plain-http sites are used."""
    sites = [
        SiteEndpoint("plain", "http://127.0.0.1:5000", insecure=True),
        SiteEndpoint("plain2", "http://127.0.0.1:5001", insecure=True),
        SiteEndpoint("public", "https://registry.example"),
        SiteEndpoint("public2", "https://registry2.example"),
        SiteEndpoint("lab", "https://lab.example", insecure=True),
    ]
    contexts = [Transport(s, RetryPolicy())._http._transport._pool._ssl_context for s in sites]
    assert contexts[0] is contexts[1] is plain_http_tls()
    assert contexts[2] is contexts[3] is default_tls()
    for verifying in (plain_http_tls(), default_tls()):
        assert verifying.verify_mode == ssl.CERT_REQUIRED and verifying.check_hostname
    assert contexts[4] not in (default_tls(), plain_http_tls())  # its own TLS settings
    assert contexts[4].verify_mode == ssl.CERT_NONE


def test_the_plain_http_context_loads_its_cas_at_its_first_connection(tmp_path, monkeypatch):
    """A redirect to https (blob storage) still verifies, against the CAs httpx would use
    (SSL_CERT_FILE here: one CA)."""
    from tests.harness.tls import make_pki

    pki = make_pki(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    context = CAsOnFirstUse(ssl.PROTOCOL_TLS_CLIENT)
    assert context.cert_store_stats()["x509_ca"] == 0
    context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="registry.example")
    assert context.cert_store_stats()["x509_ca"] == 1
    context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="registry.example")
    assert context.cert_store_stats()["x509_ca"] == 1  # loaded once


async def test_the_plain_http_context_verifies_a_real_https_server(tmp_path, monkeypatch):
    from tests.harness.tls import make_pki

    pki = make_pki(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki.server_cert, pki.server_key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    async with server:
        async with httpx.AsyncClient(verify=CAsOnFirstUse(ssl.PROTOCOL_TLS_CLIENT)) as client:
            assert (await client.get(f"https://127.0.0.1:{port}/")).text == "ok"
        monkeypatch.delenv("SSL_CERT_FILE")  # certifi's bundle does not know this CA
        async with httpx.AsyncClient(verify=CAsOnFirstUse(ssl.PROTOCOL_TLS_CLIENT)) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(f"https://127.0.0.1:{port}/")


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
