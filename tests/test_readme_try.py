"""The README's "Try it on your own registries" block runs verbatim on this machine.

The block is read out of README.md (so the README cannot drift from what works) and run
with bash, changing only what would collide with other runs on a shared machine: the
working directory `/tmp/rr` and the loopback ports. `. .venv/bin/activate` is answered by
a stand-in that puts the interpreter running the tests first on PATH, so the commands
run the code under test. Everything the block starts is stopped with its process group.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.harness.util import free_port

ROOT = Path(__file__).resolve().parent.parent
SECTION = "### Try it on your own registries"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ")]
    blocks = re.findall(r"^```(?:bash|sh)\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) == 1, f"expected one shell block under {SECTION!r}, found {len(blocks)}"
    return blocks[0]


def digest_of(port: int, repository: str, tag: str) -> str | None:
    r = httpx.head(
        f"http://127.0.0.1:{port}/v2/{repository}/manifests/{tag}",
        headers={"Accept": OCI_MANIFEST},
    )
    return r.headers.get("docker-content-digest") if r.status_code == 200 else None


def test_readme_block_mentions_what_the_section_promises():
    block = readme_block()
    for needed in ("docker-registry serve", "skopeo copy", "registry-replicator copy", "sync"):
        assert needed in block, needed
    # nothing from Debian's packaged config (htpasswd auth, a blob descriptor cache)
    assert "/etc/docker/registry" not in block


def test_readme_try_it_block_runs_verbatim(tmp_path):
    port_a, port_b, listen = free_port(), free_port(), free_port()
    work = tmp_path / "rr"
    script = (
        readme_block()
        .replace("/tmp/rr", str(work))
        .replace("127.0.0.1:5001", f"127.0.0.1:{port_a}")
        .replace("127.0.0.1:5002", f"127.0.0.1:{port_b}")
        .replace("127.0.0.1:8500", f"127.0.0.1:{listen}")
    )
    checkout = tmp_path / "checkout"  # where `. .venv/bin/activate` finds our interpreter
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "activate").write_text(
        f'PATH="{Path(sys.executable).parent}:$PATH"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        # the copy, then sync brought v2; verify found nothing to report
        assert re.search(r"^copy\s+a/team/app:v2 -> b/team/app:v2 ", out, re.M), out
        assert "dry run: would copy 1," in out, out
        assert re.search(r"^copied 1, deleted 0, 1 up to date", out, re.M), out
        assert "ab -> b: 2 tags checked, in sync" in out, out
        for tag in ("v1", "v2"):
            source = digest_of(port_a, "team/app", tag)
            assert source is not None and digest_of(port_b, "team/app", tag) == source, out
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the two registries left in the background
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
