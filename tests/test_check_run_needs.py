"""`check` validates what `run` needs on this host, so "all OK" means `run` starts: the
journal, the listen address, the MQTT broker with its TLS and credentials. Each failure
names the configuration field and exits 1; nothing is written."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path

import pytest
import yaml

from replicator.cli import main
from replicator.journal import SCHEMA_VERSION, Journal
from tests.harness.mosquitto import Mosquitto
from tests.harness.tls import TlsMosquitto, make_pki
from tests.harness.util import free_port


def write(tmp_path: Path, registry_url: str, **extra: object) -> Path:
    data: dict = {
        "journal": str(tmp_path / "state" / "journal.db"),
        "listen": f"127.0.0.1:{free_port()}",
        "sites": {"live": {"url": registry_url, "insecure": True}},
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def lines_of(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split(maxsplit=2) for line in out.splitlines()}


def test_all_that_run_needs_is_checked_and_nothing_is_written(tmp_path, registry, capsys):
    broker = Mosquitto(root=tmp_path / "mq", users={"bus": "s3cret"}).start()
    try:
        (tmp_path / "mq.pass").write_text("s3cret\n")
        cfg = write(
            tmp_path,
            registry.url,
            mqtt={"url": broker.url, "username": "bus", "password_file": "mq.pass"},
        )
        assert main(["check", "-c", str(cfg)]) == 0
        lines = lines_of(capsys.readouterr().out)
        assert lines["live"][1] == "ok"
        assert lines["journal"][1] == "ok" and "created at the first run" in lines["journal"][2]
        assert lines["listen"][1] == "ok"
        assert lines["mqtt"] == ["mqtt", "ok", broker.url]
        assert not (tmp_path / "state").exists()  # check writes nothing
        assert "check-" in broker.log_tail(50)  # a throw-away client id, not the daemon's

        assert main(["check", "-c", str(cfg), "--json"]) == 0
        local = json.loads(capsys.readouterr().out)["local"]
        assert [(x["name"], x["ok"]) for x in local] == [
            ("journal", True),
            ("listen", True),
            ("mqtt", True),
        ]
    finally:
        broker.stop()


def test_an_existing_journal_is_read_at_its_schema_and_a_newer_one_refused(
    tmp_path, registry, capsys
):
    cfg = write(tmp_path, registry.url)
    Journal(tmp_path / "state" / "journal.db").close()
    assert main(["check", "-c", str(cfg)]) == 0
    assert f"(schema {SCHEMA_VERSION})" in lines_of(capsys.readouterr().out)["journal"][2]

    conn = sqlite3.connect(tmp_path / "state" / "journal.db")
    conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    assert main(["check", "-c", str(cfg)]) == 1
    journal = lines_of(capsys.readouterr().out)["journal"]
    assert journal[1] == "FAILED" and journal[2].startswith("journal: ")
    assert "schema version 999, newer than" in journal[2]


def test_a_journal_where_no_file_can_be_created_fails_naming_the_field(tmp_path, registry, capsys):
    (tmp_path / "plain-file").write_text("")
    cfg = write(tmp_path, registry.url, journal=str(tmp_path / "plain-file" / "j.db"))
    assert main(["check", "-c", str(cfg)]) == 1
    journal = lines_of(capsys.readouterr().out)["journal"]
    assert journal[1] == "FAILED"
    assert journal[2] == f"journal: {tmp_path / 'plain-file'} is not a directory " + (
        f"(the journal is {tmp_path / 'plain-file' / 'j.db'})"
    )


def test_a_journal_that_is_not_a_database_fails(tmp_path, registry, capsys):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "journal.db").write_bytes(b"not sqlite at all" * 100)
    assert main(["check", "-c", str(write(tmp_path, registry.url))]) == 1
    journal = lines_of(capsys.readouterr().out)["journal"]
    assert journal[1] == "FAILED" and "cannot be read as a SQLite database" in journal[2]


def test_a_listen_address_in_use_by_another_program_fails(tmp_path, registry, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write(tmp_path, registry.url, listen=f"127.0.0.1:{port}")
        assert main(["check", "-c", str(cfg)]) == 1
    listen = lines_of(capsys.readouterr().out)["listen"]
    assert listen[1:] == [
        "FAILED",
        f"listen: cannot bind 127.0.0.1:{port}: in use by another program",
    ]


def test_a_listen_address_the_host_does_not_have_fails(tmp_path, registry, capsys):
    cfg = write(tmp_path, registry.url, listen="192.0.2.1:8500")  # TEST-NET-1: not ours
    assert main(["check", "-c", str(cfg)]) == 1
    listen = lines_of(capsys.readouterr().out)["listen"]
    assert listen[1] == "FAILED" and listen[2].startswith("listen: cannot bind 192.0.2.1:8500: ")


@pytest.mark.parametrize(
    ("password", "field"),
    [("wrong", "mqtt.username/mqtt.password_env/mqtt.password_file"), (None, "mqtt.url")],
)
def test_a_broker_that_refuses_or_is_absent_fails_naming_the_field(
    tmp_path, registry, capsys, password, field
):
    broker = Mosquitto(root=tmp_path / "mq", users={"bus": "s3cret"})
    mqtt: dict = {"url": broker.url}
    if password is not None:
        broker.start()
        (tmp_path / "mq.pass").write_text(password)
        mqtt.update(username="bus", password_file="mq.pass")
    try:
        cfg = write(tmp_path, registry.url, mqtt=mqtt)
        assert main(["check", "-c", str(cfg), "--timeout", "2"]) == 1
    finally:
        broker.stop()
    out = capsys.readouterr().out
    line = lines_of(out)["mqtt"]
    assert line[1] == "FAILED" and line[2].startswith(f"{field}: {broker.url}: "), out
    assert "wrong" not in out


def test_a_broker_whose_certificate_is_not_trusted_fails_naming_mqtt_tls(
    tmp_path, registry, capsys
):
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other", name="other")
    broker = TlsMosquitto(root=tmp_path / "tls", pki=pki).start()
    try:
        good = write(tmp_path, registry.url, mqtt={"url": broker.url, "tls": {"ca": str(pki.ca)}})
        assert main(["check", "-c", str(good), "--timeout", "5"]) == 0
        assert lines_of(capsys.readouterr().out)["mqtt"][1] == "ok"
        bad = write(tmp_path, registry.url, mqtt={"url": broker.url, "tls": {"ca": str(other.ca)}})
        assert main(["check", "-c", str(bad), "--timeout", "2"]) == 1
    finally:
        broker.stop()
    line = lines_of(capsys.readouterr().out)["mqtt"]
    assert line[1] == "FAILED" and line[2].startswith("mqtt.tls: "), line
    assert "certificate verify failed" in line[2]


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused(
    tmp_path, registry, capsys, timeout
):
    """`--timeout 0` failed every site ("no answer within 0s") and `nan` printed
    ValueError on each site's line, as if the sites were at fault."""
    with pytest.raises(SystemExit) as exit_:
        main(["check", "-c", str(write(tmp_path, registry.url)), "--timeout", timeout])
    assert exit_.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_checking_a_stopped_daemons_journal_leaves_no_file_behind(tmp_path, registry, capsys):
    """A WAL journal opened read-only made SQLite create journal.db-wal and -shm and
    leave them, owned by whoever ran `check`: `check` writes nothing."""
    cfg = write(tmp_path, registry.url)
    Journal(tmp_path / "state" / "journal.db").close()
    before = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert main(["check", "-c", str(cfg)]) == 0
    assert f"(schema {SCHEMA_VERSION})" in lines_of(capsys.readouterr().out)["journal"][2]
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == before == ["journal.db"]


def test_checking_a_running_daemons_journal_reads_its_latest_schema(tmp_path, registry, capsys):
    cfg = write(tmp_path, registry.url)
    live = Journal(tmp_path / "state" / "journal.db")  # held open, as a running daemon does
    try:
        assert main(["check", "-c", str(cfg)]) == 0
        assert f"(schema {SCHEMA_VERSION})" in lines_of(capsys.readouterr().out)["journal"][2]
    finally:
        live.close()
