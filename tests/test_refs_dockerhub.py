"""Docker Hub conventions in references and site identity (pure), and `copy docker://…`."""

from __future__ import annotations

import base64
import json

import pytest

from replicator.errors import UsageError
from replicator.refs import parse_ref
from replicator.registry.site import SiteEndpoint, load_docker_credentials
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.test_sync import cli


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.25", "docker.io/library/nginx:1.25"),
        ("user/app", "docker.io/user/app:latest"),
        ("docker.io/nginx", "docker.io/library/nginx:latest"),
        ("index.docker.io/library/nginx:1", "docker.io/library/nginx:1"),
        ("registry-1.docker.io/user/app:v2", "docker.io/user/app:v2"),
        ("docker://nginx:1.25", "docker.io/library/nginx:1.25"),
        ("docker://127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app:v1"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
        ("localhost/app", "localhost/app:latest"),
        ("ghcr.io/owner/repo:t", "ghcr.io/owner/repo:t"),
        ("quay.io/nginx", "quay.io/nginx:latest"),  # library/ is Docker Hub's only
    ],
)
def test_references_follow_docker_conventions(text, expected):
    assert str(parse_ref(text)) == expected


@pytest.mark.parametrize(
    "text",
    ["oci:/tmp/layout:v1", "docker-daemon:nginx:latest", "containers-storage:nginx", "dir:/tmp/x"],
)
def test_other_transports_are_refused_with_a_usage_error(text):
    with pytest.raises(UsageError, match=r"transport is not a registry.*docker://"):
        parse_ref(text)


def test_a_url_scheme_is_refused():
    with pytest.raises(UsageError, match="https:// transport"):
        parse_ref("https://127.0.0.1:5000/app:v1")


@pytest.mark.parametrize("host", ["docker.io", "index.docker.io", "registry-1.docker.io"])
def test_docker_hub_names_are_one_registry_answering_at_registry_1(host):
    assert SiteEndpoint.from_url(host).url == "https://registry-1.docker.io"
    assert SiteEndpoint(name="hub", url=f"https://{host}/").url == "https://registry-1.docker.io"


def test_docker_login_credentials_for_docker_io_are_found_for_every_alias(tmp_path):
    config = tmp_path / "config.json"
    auth = base64.b64encode(b"me:secret").decode()
    config.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}}))
    site = SiteEndpoint.from_url("docker.io")
    creds = load_docker_credentials(str(config), site.host)
    assert creds is not None and (creds.username, creds.password) == ("me", "secret")
    assert load_docker_credentials(str(config), "ghcr.io") is None


def test_copy_accepts_docker_transport_references(two_registries):
    src, dst = two_registries
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("app", 400)])
    out = cli("copy", "--insecure", f"docker://{src.host}/team/app:v1", f"docker://{dst.host}/app")
    assert out.returncode == 0, out.stderr
    assert_image_complete(dst.url, "app", "v1")


def test_copy_refuses_other_transports_as_a_usage_error(registry):
    out = cli("copy", "--insecure", "oci:/tmp/layout:v1", f"{registry.host}/app:v1")
    assert out.returncode == 2
    assert "oci: transport is not a registry" in out.stderr and "Traceback" not in out.stderr
