"""Logging as operators meet it: chosen by flag or environment, structured, journald-aware."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replicator.cli import build_parser
from replicator.logs import JsonFormatter, TextFormatter, log_context, setup_logging
from tests.harness.daemon import DaemonProcess, site_config

CONFIG = """\
sites:
  a: {url: "http://127.0.0.1:1", insecure: true}
  b: {url: "http://127.0.0.1:2", insecure: true}
rules:
  - {name: r, from: a, to: [b], repositories: ["team/**"]}
"""


def _cli(*args: str, env: dict[str, str] | None = None, stderr=subprocess.PIPE):
    return subprocess.run(
        [sys.executable, "-m", "replicator", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def _record(level: int = logging.WARNING, msg: str = "hello %s", args=("world",)):
    return logging.LogRecord("replicator.test", level, __file__, 1, msg, args, None)


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-format", "json", "--log-level", "debug", "check", "--offline", "-c", "F"],
        ["check", "--offline", "-c", "F", "--log-format", "json", "--log-level", "debug"],
        ["--log-format", "json", "check", "--offline", "-c", "F", "--log-level", "debug"],
    ],
)
def test_global_flags_are_accepted_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert (args.command, args.log_format, args.log_level) == ("check", "json", "debug")


def test_verbose_after_the_command_counts():
    assert build_parser().parse_args(["sync", "-c", "F", "-vv"]).verbose == 2
    assert build_parser().parse_args(["-v", "sync", "-c", "F"]).verbose == 1


def test_context_fields_are_json_keys_not_message_text():
    formatter = JsonFormatter()
    handler_filter = logging.getLogger()  # the filter is installed by setup_logging
    setup_logging(level="debug", fmt="json")
    try:
        (handler,) = handler_filter.handlers
        with log_context(site="a", repository="team/app", reference="v1", digest=None):
            record = _record()
            handler.filter(record)
        doc = json.loads(formatter.format(record))
        assert doc["msg"] == "hello world"
        assert (doc["site"], doc["repository"], doc["reference"]) == ("a", "team/app", "v1")
        assert "digest" not in doc  # None values are skipped
        # outside the context the fields are gone
        record = _record()
        handler.filter(record)
        assert "site" not in json.loads(formatter.format(record))
    finally:
        setup_logging()


def test_text_format_appends_fields_and_redacts():
    setup_logging(fmt="text")
    try:
        (handler,) = logging.getLogger().handlers
        with log_context(site="a", repository="team/my app"):
            record = _record(msg="GET %s", args=("https://user:pw@host/v2/?token=abc",))
            handler.filter(record)
        line = TextFormatter().format(record)
        assert line.startswith("WARNING replicator.test: GET https://***@host/v2/?token=***")
        assert line.endswith('site=a repository="team/my app"')
        assert "pw" not in line
    finally:
        setup_logging()


def test_trace_id_of_the_current_span_is_a_field():
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    setup_logging(fmt="json")
    try:
        (handler,) = logging.getLogger().handlers
        with tracer.start_as_current_span("x") as span:
            record = _record()
            handler.filter(record)
        doc = json.loads(JsonFormatter().format(record))
        assert doc["trace_id"] == format(span.get_span_context().trace_id, "032x")
    finally:
        setup_logging()


def test_environment_chooses_format_and_level(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    # check pings the (unreachable) sites and logs at info: JSON lines with -v from the env
    env = {"REGISTRY_REPLICATOR_LOG_FORMAT": "json", "REGISTRY_REPLICATOR_LOG_LEVEL": "debug"}
    out = _cli("check", "-c", str(cfg), env=env)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines, out.stderr
    docs = [json.loads(line) for line in lines if line.startswith("{")]
    assert docs and any(d["level"] == "debug" for d in docs), out.stderr
    # the flag wins over the environment
    out = _cli("check", "-c", str(cfg), "--log-format", "text", env=env)
    assert not any(line.startswith("{") for line in out.stderr.splitlines()), out.stderr


def test_bad_environment_value_names_the_variable(tmp_path: Path):
    out = _cli("status", "-c", str(tmp_path / "x.yaml"), env={"REGISTRY_REPLICATOR_LOG_LEVEL": "x"})
    assert out.returncode == 2
    assert "REGISTRY_REPLICATOR_LOG_LEVEL" in out.stderr


def test_journald_gets_syslog_priorities(tmp_path: Path):
    """With stderr connected to the journal, every line starts with <N> so that
    `journalctl -p err` works (sd-daemon(3)); elsewhere lines are unprefixed."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    err = tmp_path / "stderr"
    with open(err, "w") as fh:
        st = os.fstat(fh.fileno())
        _cli(
            "check",
            "-c",
            str(cfg),
            "--log-level",
            "debug",
            "--log-format",
            "text",
            env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            stderr=fh,
        )
    lines = [line for line in err.read_text().splitlines() if line]
    logged = [line for line in lines if not line.startswith("registry-replicator:")]
    assert logged and all(line[:3] in ("<7>", "<6>", "<4>", "<3>") for line in logged), lines
    assert any(line.startswith("<7>DEBUG") for line in logged), lines
    # another file's identity: not the journal, no prefix
    with open(err, "w") as fh:
        _cli(
            "check",
            "-c",
            str(cfg),
            "--log-level",
            "debug",
            "--log-format",
            "text",
            env={"JOURNAL_STREAM": "1:1"},
            stderr=fh,
        )
    assert not any(line.startswith("<") for line in err.read_text().splitlines())


def test_daemon_log_is_one_format_without_uvicorn_banner(tmp_path: Path, daemons, registry_factory):
    a = registry_factory("a")
    b = registry_factory("b")
    daemon = DaemonProcess(
        tmp_path,
        {
            "sites": {"a": site_config(a), "b": site_config(b)},
            "rules": [{"name": "r", "from": "a", "to": ["b"], "repositories": ["**"]}],
        },
    )
    daemons.append(daemon.start())
    assert daemon.stop() == 0
    text = daemon.log_path.read_text()
    assert "CTRL+C" not in text and "Uvicorn running" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines), text
