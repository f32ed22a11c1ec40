"""The site `auth` settings that point at the ecosystem's credential files:
docker_config (helpers honoured), auth_file (containers auth.json), helper_max_age.
Errors name the YAML path; inline secrets stay refused."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from replicator.config import load_config
from replicator.errors import ConfigError
from replicator.registry.site import SiteEndpoint


def _load(tmp_path: Path, auth: str):
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            sites:
              ecr:
                url: https://123.dkr.ecr.example
                auth: {auth}
            """
        )
    )
    return load_config(path)


def test_auth_file_true_follows_registry_auth_file(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    config = _load(tmp_path, "{auth_file: true, docker_config: true, helper_max_age: 1h}")
    site = SiteEndpoint.from_config(config, "ecr")
    assert site.auth_file == str(tmp_path / "auth.json")
    assert site.helper_max_age == 3600.0
    assert site.credentials is None


def test_auth_file_true_uses_xdg_runtime_dir_when_it_has_one(tmp_path, monkeypatch):
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    runtime = tmp_path / "run"
    (runtime / "containers").mkdir(parents=True)
    (runtime / "containers/auth.json").write_text("{}")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    site = SiteEndpoint.from_config(_load(tmp_path, "{auth_file: true}"), "ecr")
    assert site.auth_file == str(runtime / "containers/auth.json")


def test_auth_file_path_is_resolved_against_the_config(tmp_path):
    config = _load(tmp_path, "{auth_file: creds/auth.json}")
    assert config.sites["ecr"].auth is not None
    assert config.sites["ecr"].auth.auth_file == tmp_path.resolve() / "creds/auth.json"
    assert config.sites["ecr"].auth.helper_max_age == 900.0


@pytest.mark.parametrize(
    "auth,path,words",
    [
        (
            "{auth_file: true, username: ci, password_env: P}",
            "sites.ecr.auth",
            "auth_file supplies the credentials itself",
        ),
        ("{auth_file: ''}", "sites.ecr.auth.auth_file", "auth_file must be true"),
        ("{docker_config: true, helper_max_age: 0s}", "sites.ecr.auth.helper_max_age", ""),
        ("{auth_file: true, identity_token: s3cret}", "sites.ecr.auth.identity_token", "inline"),
    ],
)
def test_bad_auth_settings_name_the_yaml_path(tmp_path, auth, path, words):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, auth)
    text = str(info.value)
    assert any(p == path for p, _ in info.value.problems), info.value.problems
    assert words in text
    assert "s3cret" not in text
