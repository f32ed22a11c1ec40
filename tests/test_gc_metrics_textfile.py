"""`gc --metrics-textfile`: the systemd timer's GC runs leave the daemon's GC series in a
file for node_exporter's textfile collector, counting across runs, so the example
GCFailing and GCStale alerts work without the daemon's schedule."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from replicator.cli import main
from replicator.metrics_textfile import GcOutcome, render
from tests.harness.images import Pusher, layer_bytes
from tests.test_gc_cli import age, write_config
from tests.test_systemd import needs_systemd_analyze, our_complaints, verify

ROOT = Path(__file__).resolve().parent.parent
GC_UNIT = ROOT / "systemd" / "registry-replicator-gc.service"
BINARY = Path(sys.executable).parent / "registry-replicator"
P = "registry_replicator_"


def timer_command(config: str, *extra: str) -> list[str]:
    """The GC unit's ExecStart, running this checkout with `config`, plus `extra`."""
    line = next(
        raw.strip().partition("=")[2]
        for raw in GC_UNIT.read_text().splitlines()
        if raw.strip().startswith("ExecStart=")
    )
    argv = shlex.split(line)
    assert argv[0] == "/usr/bin/registry-replicator", argv
    argv[0] = str(BINARY)
    return [config if a == "/etc/registry-replicator/config.yaml" else a for a in argv] + [*extra]


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


def test_timer_runs_count_in_the_textfile(registry, tmp_path):
    with Pusher(registry.url) as p:
        p.push_image("app", "v1", [layer_bytes("v1", 500)])
        p.push_image("app", "dev", [layer_bytes("dev", 600)])
    age(registry.storage, 7200)
    good = write_config(tmp_path, registry)
    # the same site, but its registry config (as this host reads it) enables the blob
    # descriptor cache: the storage pass refuses to run, and the run fails
    cached = yaml.safe_load(registry.config_path.read_text())
    cached.setdefault("storage", {})["cache"] = {"blobdescriptor": "inmemory"}
    cached_path = tmp_path / "cached-registry.yml"
    cached_path.write_text(yaml.safe_dump(cached))
    cfg = yaml.safe_load(Path(good).read_text())
    cfg["sites"]["a"]["registry_config"] = str(cached_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(cfg))
    prom = tmp_path / "textfile" / "registry-replicator-gc.prom"
    prom.parent.mkdir()
    flags = ("--metrics-textfile", str(prom), "--quarantine-window", "0s")

    started = time.time()
    first = subprocess.run(timer_command(good, *flags), capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    after_first = samples(prom)
    assert after_first[(P + "gc_runs_total", (("outcome", "ok"), ("site", "a")))] == 1
    assert after_first[(P + "gc_runs_total", (("outcome", "failed"), ("site", "a")))] == 0
    reclaimed = after_first[(P + "gc_reclaimed_bytes_total", (("site", "a"),))]
    assert reclaimed > 600
    last = after_first[(P + "gc_last_success_timestamp_seconds", (("site", "a"),))]
    assert started <= last <= time.time()

    # a run refused: it counts as failed, the counters go on from the file
    second = subprocess.run(timer_command(str(broken), *flags), capture_output=True, text=True)
    assert second.returncode == 2 and "blobdescriptor" in second.stderr, second.stderr
    after_second = samples(prom)
    assert after_second[(P + "gc_runs_total", (("outcome", "ok"), ("site", "a")))] == 1
    assert after_second[(P + "gc_runs_total", (("outcome", "failed"), ("site", "a")))] == 1
    assert after_second[(P + "gc_reclaimed_bytes_total", (("site", "a"),))] == reclaimed
    assert after_second[(P + "gc_last_success_timestamp_seconds", (("site", "a"),))] == last
    assert sorted(p.name for p in prom.parent.iterdir()) == [prom.name]  # no temp file left

    if shutil.which("promtool"):
        lint = subprocess.run(
            ["promtool", "check", "metrics"], input=prom.read_text(), capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr


def test_same_series_as_the_daemon_scrape():
    """The file holds exactly the daemon's GC series: names, labels and help."""
    from replicator.metrics import Metrics

    daemon = {
        f.name: (f.documentation, f.type)
        for f in text_string_to_metric_families(Metrics().render())
        if f.name.startswith(P + "gc_")
    }
    text = render("", ["a"], [GcOutcome("a", ok=True, bytes_reclaimed=5)], 1.0).decode()
    textfile = {f.name: (f.documentation, f.type) for f in text_string_to_metric_families(text)}
    assert textfile == daemon


def test_bad_textfile_path_is_refused_before_anything_runs(registry, tmp_path, capsys):
    cfg = write_config(tmp_path, registry)
    assert main(["gc", "-c", cfg, "--metrics-textfile", str(tmp_path / "gc.txt")]) == 2
    assert "*.prom" in capsys.readouterr().err
    missing = tmp_path / "nowhere" / "gc.prom"
    assert main(["gc", "-c", cfg, "--metrics-textfile", str(missing)]) == 2
    assert "no directory" in capsys.readouterr().err


@pytest.mark.parametrize("garbage", ["not the text format {", "\x00\x01"])
def test_an_unreadable_previous_file_starts_again_from_zero(garbage):
    text = render(garbage, ["a"], [GcOutcome("a", ok=False)], 1.0).decode()
    assert f'{P}gc_runs_total{{outcome="failed",site="a"}} 1.0' in text


def dropin() -> str:
    """The drop-in systemd/README.md gives for the timer's GC metrics."""
    text = (ROOT / "systemd" / "README.md").read_text()
    section = text[text.index("## GC metrics from the timer") :]
    start = section.index("```ini\n") + len("```ini\n")
    return section[start : section.index("\n```", start)]


def dropin_lines(key: str) -> list[str]:
    return [line.partition("=")[2] for line in dropin().splitlines() if line.startswith(key + "=")]


@needs_systemd_analyze
def test_the_documented_dropin_passes_systemd_analyze(tmp_path):
    unit = GC_UNIT.read_text()
    merged = unit + "\n" + dropin() + "\n"  # a repeated [Service] section, as systemd merges
    result = verify(tmp_path, {"registry-replicator-gc.service": merged})
    assert result.returncode == 0, result.stderr
    assert our_complaints(result, tmp_path) == [], result.stdout + result.stderr


def test_the_documented_dropin_publishes_the_file(registry, tmp_path):
    """Its ExecStart, run with node_exporter's directory moved under tmp_path, leaves the
    series there, readable by another user; nothing runs with full privileges (red-team
    finding 4: a root copy followed the service user's symlinks)."""
    textfiles = tmp_path / "node-exporter"
    textfiles.mkdir()
    with Pusher(registry.url) as p:
        p.push_image("app", "v1", [layer_bytes("v1", 500)])
    config = write_config(tmp_path, registry)

    def local(command: str) -> str:
        return (
            command.replace("/var/lib/prometheus/node-exporter", str(textfiles))
            .replace("/etc/registry-replicator/config.yaml", config)
            .replace("/usr/bin/registry-replicator", str(BINARY))
        )

    exec_lines = [
        line.partition("=")[2]
        for line in dropin().splitlines()
        if line.startswith("Exec") and line.partition("=")[2]
    ]
    assert not [line for line in exec_lines if line[:1] in "+!@-:"], dropin()
    assert dropin_lines("ExecStopPost") == []
    start = [line for line in dropin_lines("ExecStart") if line]
    assert len(start) == 1 and "--metrics-textfile" in start[0], dropin()
    argv = shlex.split(start[0])
    target = Path(argv[argv.index("--metrics-textfile") + 1])
    assert dropin_lines("ReadWritePaths") == [str(target.parent)]
    run = subprocess.run(
        [*shlex.split(local(start[0])), "--quarantine-window", "0s"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    published = textfiles / "registry-replicator-gc.prom"
    assert published.name == target.name
    assert sorted(p.name for p in textfiles.iterdir()) == [published.name]
    assert published.stat().st_mode & 0o777 == 0o644
    got = samples(published)
    assert got[(P + "gc_runs_total", (("outcome", "ok"), ("site", "a")))] == 1
