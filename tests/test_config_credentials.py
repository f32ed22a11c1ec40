"""The site `auth` settings that point at the ecosystem's credential files:
docker_config (helpers honoured), auth_file (containers auth.json), helper_max_age.
Errors name the YAML path; inline secrets stay refused."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from replicator.config import load_config
from replicator.errors import ConfigError
from replicator.registry.site import SiteEndpoint
from tests.harness.credhelper import CredentialHelper


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


def test_check_runs_helpers_and_names_a_missing_one(
    tmp_path, registry_factory, monkeypatch, capsys
):
    """`check` logs in through the configured helper; a site whose config names a helper
    that is not installed fails with that helper's name, not "no credentials"."""
    from replicator.cli import main
    from tests.harness.credhelper import EcrLikeFront

    helper = CredentialHelper(tmp_path / "bin", name="checktest")
    monkeypatch.setenv("PATH", helper.path_env())
    reg = registry_factory("open")
    with EcrLikeFront(reg.port, helper.key) as front:
        helper.serve(front.host, "AWS")
        good = tmp_path / "good.json"
        good.write_text(json.dumps({"credHelpers": {front.host: "checktest"}}))
        missing = tmp_path / "missing.json"
        missing.write_text(json.dumps({"credsStore": "ecr-login"}))
        sites = {
            "good": {"url": front.url, "insecure": True, "auth": {"docker_config": str(good)}},
            "nohelper": {
                "url": front.url,
                "insecure": True,
                "auth": {"docker_config": str(missing)},
            },
        }
        cfg = tmp_path / "check.yaml"
        cfg.write_text(yaml.safe_dump({"sites": sites}))
        assert main(["check", "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["good"].split()[1] == "ok"
    assert lines["nohelper"].split()[1] == "FAILED"
    assert "docker-credential-ecr-login: not found on PATH" in lines["nohelper"]
    for secret in helper.issued:
        assert secret not in out
