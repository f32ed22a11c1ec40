"""The README's metrics table is the operator's contract: a running daemon's /metrics has
exactly the metrics it lists, each with exactly the labels it lists, and the counters
move as the table says (a retry counts per rule and target; request latency by status
class)."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.harness.daemon import DaemonProcess, image_complete, notify_kwargs, site_config
from tests.harness.images import Pusher, layer_bytes
from tests.harness.util import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "registry_replicator_"
# sample suffixes prometheus-client adds to a family's name
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created", "_info")


def readme_table() -> dict[str, set[str]]:
    """{metric name: its labels} from the README's metrics table."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| metric | labels | what |") :]
    table = table[: table.index("\n\n")]
    out: dict[str, set[str]] = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        labels = {label.strip() for label in cells[1].split(",") if label.strip()}
        for name in re.findall(r"`([a-z_]+)`", cells[0]):
            out[PREFIX + name] = labels
    return out


def scraped(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """{sample name: [(name, labels, value)]} of our metrics in a scrape."""
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(PREFIX):
                out.setdefault(sample.name, []).append(
                    (sample.name, dict(sample.labels), sample.value)
                )
    return out


def family_labels(samples: dict[str, list], name: str) -> set[str] | None:
    """The labels of metric `name` as exported (histogram `le` left out); None if absent."""
    for sample_name in (name, *(name + s for s in SUFFIXES)):
        if sample_name in samples:
            return set(samples[sample_name][0][1]) - {"le"}
    return None


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    found = [v for _, got, v in samples.get(name, []) if got == labels]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def test_scrape_matches_the_readme_table_and_retries_count_per_rule(
    tmp_path, registry_factory, proxy_factory, daemons
):
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b")
    target = proxy_factory(b)  # refuses the first manifest PUT: one retry of the task
    daemon = DaemonProcess(
        tmp_path / "d",
        port=port,
        config={
            "sites": {
                "a": site_config(a),
                "b": {"url": target.url, "insecure": True, "webhook_token_env": "HOOK_TOKEN"},
            },
            "rules": [{"name": "apps", "from": "a", "to": ["b"], "repositories": ["team/**"]}],
        },
        extra_args=["--retry-base", "0.1"],
    )
    daemons.append(daemon.start())

    contract = readme_table()
    before = scraped(daemon.metrics())
    exported = {
        name
        for name in contract
        if family_labels(before, name) is not None  # checked one by one below
    }
    assert exported == set(contract), f"in the README, not exported: {set(contract) - exported}"
    ours = {re.sub(r"(_bucket|_count|_sum)$", "", n) for n in before}
    ours = {n for n in ours if n not in contract and n.removesuffix("_total") not in contract}
    assert not ours, f"exported, not in the README's table: {sorted(ours)}"
    for name, labels in contract.items():
        assert family_labels(before, name) == labels, (name, family_labels(before, name))
    assert value(before, PREFIX + "task_retries_total", rule="apps", target="b") == 0
    for status_class in ("2xx", "3xx", "4xx", "5xx", "error"):
        labels = {"site": "b", "method": "PUT", "status_class": status_class}
        assert value(before, PREFIX + "registry_requests_total", **labels) == 0

    target.respond(400, method="PUT", path=r"/manifests/")
    with Pusher(a.url) as p:
        pushed = p.push_image("team/app", "v1", [layer_bytes("metrics", 400)])
    wait_until(lambda: image_complete(b, "team/app", "v1", pushed.digest), timeout=30, what="v1")

    after = scraped(daemon.metrics())
    assert value(after, PREFIX + "task_retries_total", rule="apps", target="b") == 1
    assert value(after, PREFIX + "dead_letters_total", rule="apps", target="b") == 0
    put_4xx = {"site": "b", "method": "PUT", "status_class": "4xx"}
    put_2xx = {"site": "b", "method": "PUT", "status_class": "2xx"}
    assert value(after, PREFIX + "registry_requests_total", **put_4xx) == 1
    assert value(after, PREFIX + "registry_request_duration_seconds_count", **put_4xx) == 1
    assert value(after, PREFIX + "registry_request_duration_seconds_count", **put_2xx) >= 1
