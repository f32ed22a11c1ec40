"""`registry-replicator demo`: the whole product on one machine, narrated.

Three local registries play three regions; each posts its webhooks to the
daemon, which runs in this process with the packaged demo.yaml. Images are
pushed to the primary and watched arriving in both replicas; then a tag is
deleted, the deletion propagates, and the replicas' storage is collected.
The exit status is 0 only if every step did what it printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

import yaml

from replicator.demo.images import push_samples
from replicator.demo.registries import LocalRegistry, free_port
from replicator.errors import ReplicatorError
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint

SITES = ("us-east", "eu-west", "ap-south")
PRIMARY = "us-east"


class DemoFailed(ReplicatorError):
    """A step of the demo did not do what it said."""


def demo_config_text() -> str:
    return resources.files("replicator.demo").joinpath("demo.yaml").read_text()


def write_config(workdir: Path, registries: dict[str, LocalRegistry], port: int) -> Path:
    """demo.yaml with this run's ports, journal and storage paths filled in."""
    config = yaml.safe_load(demo_config_text())
    config["journal"] = str(workdir / "journal.db")
    config["listen"] = f"127.0.0.1:{port}"
    for name, reg in registries.items():
        site = config["sites"][name]
        site["url"] = reg.url
        site["storage"] = str(reg.storage)
        site["registry_config"] = str(reg.config_path)
        # a file, not an environment variable: the commands printed by --keep run in
        # another terminal and must find it too
        site["webhook_token_file"] = str(workdir / "webhook-token")
    for policy in config.get("gc", {}).get("policies", []):
        policy["grace"] = "1s"  # the demo's images are seconds old
        policy["mode"] = "storage"
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def _wait_for(check: Callable[[], Awaitable[object]], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


async def run_demo(
    *, quick: bool = False, keep: bool = False, say: Callable[[str], None] = print
) -> int:

    from replicator.daemon.service import Daemon

    workdir = Path(tempfile.mkdtemp(prefix="registry-replicator-demo-"))
    token = secrets.token_urlsafe(24)
    token_file = workdir / "webhook-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    port = free_port()
    registries = {
        name: LocalRegistry(
            name, workdir / name, free_port(), f"http://127.0.0.1:{port}/events/{name}", token
        )
        for name in SITES
    }
    daemon: Daemon | None = None
    daemon_task: asyncio.Task | None = None
    try:
        say(f"[1/6] starting three registries as regions in {workdir}")
        await asyncio.gather(*(r.start() for r in registries.values()))
        for r in registries.values():
            say(f"      {r.name:9} {r.url}")
        config_path = write_config(workdir, registries, port)
        say(
            f"[2/6] starting the daemon with demo.yaml on 127.0.0.1:{port} "
            "(webhooks, work queue, reconcile)"
        )
        daemon = Daemon(config_path, instance_id="demo", retry_base=0.2)
        daemon_task = asyncio.create_task(daemon.run())
        await _wait_for(lambda: _started(daemon, daemon_task), "the daemon to start", 20)

        primary = registries[PRIMARY]
        say(
            "[3/6] pushing sample images to us-east: 3 apps x 2 versions sharing a base "
            "layer, a multi-arch index, a signature"
        )
        async with _client(primary) as client:
            pushed = await push_samples(client, scale=1 if quick else 5)
        say(f"      pushed {len(pushed)} tags")

        say("[4/6] waiting for them to arrive in eu-west and ap-south")
        started = time.monotonic()
        for name in ("eu-west", "ap-south"):
            await _wait_for(
                functools.partial(_all_present, registries[name], pushed),
                f"every image in {name}",
                60,
            )
        say(f"      complete in both replicas after {time.monotonic() - started:.1f}s")
        stats = _blob_stats(daemon)
        for name in ("eu-west", "ap-south"):
            s = stats.get(name, {})
            say(
                f"      {name:9} blobs uploaded {s.get('uploaded', 0):3}, mounted "
                f"{s.get('mounted', 0):3}, already there {s.get('existing', 0):3}"
            )
        if not all(stats.get(n, {}).get("mounted", 0) > 0 for n in ("eu-west", "ap-south")):
            raise DemoFailed("the shared base layer was not mounted across repositories")

        say("[5/6] deleting demo/web:v1.0 at us-east; the rule propagates deletes")
        victim = pushed.pop("demo/web:v1.0")
        async with _client(primary) as client:
            await client.delete_manifest("demo/web", victim)
        for name in ("eu-west", "ap-south"):
            await _wait_for(
                functools.partial(_absent, registries[name], "demo/web", "v1.0"),
                f"the delete in {name}",
                60,
            )
        say("      gone from both replicas")

        say("[6/6] collecting garbage in the replicas' storage (online, journaled)")
        await asyncio.sleep(1.1)  # past the demo's 1 s grace
        before = {n: registries[n].blob_bytes() for n in ("eu-west", "ap-south")}
        results = await _collect(daemon)
        for name in ("eu-west", "ap-south"):
            after = registries[name].blob_bytes()
            result = results.get(name)
            reclaimed = result.bytes_reclaimed if result else 0
            say(
                f"      {name:9} reclaimed {reclaimed:,} bytes "
                f"({before[name]:,} -> {after:,} bytes of blobs)"
            )
            if reclaimed <= 0 or before[name] - after != reclaimed:
                raise DemoFailed(
                    f"GC in {name} reported {reclaimed} bytes but storage went "
                    f"from {before[name]} to {after}"
                )
            if not await _all_present(registries[name], pushed):
                raise DemoFailed(f"GC in {name} broke an image that is still tagged")
        say("done: replication and GC did what they printed")
        if keep:
            for line in next_steps(config_path, registries, port):
                say(line)
            await _until_interrupted()
        return 0
    finally:
        if daemon is not None and daemon_task is not None:
            daemon.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(daemon_task, 20)
        for r in registries.values():
            r.stop()
        if keep:
            say(f"stopped the registries and the daemon; kept {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def next_steps(config: Path, registries: dict[str, LocalRegistry], port: int) -> list[str]:
    """What to try next, with this run's real ports and paths (printed by --keep)."""
    us, eu = registries[PRIMARY], registries["eu-west"]
    cmd = "registry-replicator"
    return [
        "",
        "The registries and the daemon keep running; press Ctrl-C here to stop them.",
        "Try, in another terminal:",
        f"  {cmd} copy --insecure {us.url[7:]}/demo/web:v1.1 {eu.url[7:]}/mine/web",
        f"  {cmd} sync -c {config} --dry-run",
        f"  {cmd} status -c {config}",
        f"  {cmd} tasks -c {config}",
        f"  {cmd} gc -c {config} --dry-run",
        f"  {cmd} check -c {config}",
        f"  curl -s http://127.0.0.1:{port}/metrics | grep registry_replicator_",
        f"  skopeo copy --src-tls-verify=false --dest-tls-verify=false "
        f"docker://{us.url[7:]}/demo/web:v1.1 docker://{us.url[7:]}/demo/yours:v1",
        f"      (a push to {PRIMARY}: its webhook makes the daemon copy it to eu-west and "
        "ap-south)",
        "",
    ]


async def _until_interrupted() -> None:
    """Wait for Ctrl-C or SIGTERM (the demo's own process, not the daemon's handlers)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _started(daemon, task: asyncio.Task) -> bool:
    if task.done():
        task.result()  # raises what stopped it
        raise DemoFailed("the daemon stopped")
    return daemon.started.is_set()


def _client(reg: LocalRegistry) -> RegistryClient:
    return RegistryClient(SiteEndpoint(name=reg.name, url=reg.url, insecure=True))


async def _all_present(reg: LocalRegistry, pushed: dict[str, str]) -> bool:
    async with _client(reg) as client:
        for ref, digest in pushed.items():
            repo, tag = ref.rsplit(":", 1)
            head = await client.head_manifest(repo, tag)
            if head is None or head.digest != digest:
                return False
    return True


async def _absent(reg: LocalRegistry, repo: str, tag: str) -> bool:
    async with _client(reg) as client:
        return await client.head_manifest(repo, tag) is None


def _blob_stats(daemon) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name in ("eu-west", "ap-south"):
        out[name] = {
            o: int(daemon.metrics.blobs.value(target=name, outcome=o))
            for o in ("uploaded", "mounted", "existing")
        }
    return out


async def _collect(daemon) -> dict:
    from replicator.gc.scheduled import run_policies

    results = await run_policies(
        daemon.config, daemon.journal, daemon.pool, dry_run=False, quarantine_window=0.5
    )
    return {r.site: r for r in results}
