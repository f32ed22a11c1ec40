"""The daemon keeps replicating to a registry whose credentials come from a credential
helper handing out short-lived tokens: no restart when they expire."""

from __future__ import annotations

import httpx

from tests.harness.credhelper import CredentialHelper, verify_secret
from tests.harness.daemon import DaemonProcess, notify_kwargs, site_config
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.registry import Registry
from tests.harness.token_server import BearerAuth, TokenServer
from tests.harness.util import free_port, wait_until

ALICE_PW = "al1ce-daemon-pw"


def image_at(reg: Registry, ref: str, digest: str, auth: httpx.Auth) -> bool:
    try:
        return assert_image_complete(reg.url, "team/app", ref, auth=auth) == digest
    except AssertionError:
        return False


def test_daemon_renews_expired_helper_tokens_without_restart(registry_factory, tmp_path, daemons):
    helper = CredentialHelper(tmp_path / "bin", name="daemontest", ttl=2, opaque=True)
    ts = TokenServer(
        tmp_path / "token", users={"alice": ALICE_PW}, secret_key=helper.key, expires_in=1
    ).start()
    try:
        port = free_port()
        src = registry_factory("src", **notify_kwargs(port, "src"))
        dst = registry_factory("dst", token=ts.token_auth())
        helper.serve(dst.host, "alice")
        docker_config = tmp_path / "docker" / "config.json"
        docker_config.parent.mkdir()
        docker_config.write_text(f'{{"credHelpers": {{"{dst.host}": "daemontest"}}}}')
        daemon = DaemonProcess(
            tmp_path / "d",
            port=port,
            config={
                "sites": {
                    "src": site_config(src),
                    "dst": site_config(
                        dst, auth={"docker_config": str(docker_config), "helper_max_age": "1h"}
                    ),
                },
                "rules": [{"name": "r", "from": "src", "to": "dst", "repositories": ["team/**"]}],
            },
            env={"PATH": helper.path_env()},
        )
        daemons.append(daemon)
        daemon.start()
        pid = daemon.proc.pid if daemon.proc else None
        auth = BearerAuth("alice", ALICE_PW)
        with Pusher(src.url) as p:
            first = p.push_image("team/app", "v1", [layer_bytes("one", 2000)])
        wait_until(
            lambda: image_at(dst, "v1", first.digest, auth),
            timeout=30,
            what="team/app:v1 at dst",
        )
        assert helper.runs >= 1
        secret = helper.issued[-1]
        wait_until(lambda: verify_secret(secret, helper.key) is None, timeout=10, what="expiry")
        with Pusher(src.url) as p:
            second = p.push_image("team/app", "v2", [layer_bytes("two", 2000)])
        wait_until(
            lambda: image_at(dst, "v2", second.digest, auth),
            timeout=30,
            what="team/app:v2 at dst after the helper's token expired",
        )
        assert daemon.proc is not None and daemon.proc.pid == pid and daemon.proc.poll() is None
        assert helper.runs >= 2  # the helper ran again for the expired token
        assert any(r.user is None for r in ts.requests)  # the expired secret was refused
        log = daemon.log()
        for issued in [*helper.issued, *ts.issued]:
            assert issued not in log
        assert daemon.stop() == 0
    finally:
        ts.stop()
