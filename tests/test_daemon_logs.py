"""The daemon's log as journald receives it: run as the systemd unit runs it (JSON lines,
since stderr is not a terminal), every line about a task carries the task's fields as
JSON keys, so `jq 'select(.task==12)'` or `select(.repository=="team/app")` finds them."""

from __future__ import annotations

import json

import httpx

from tests.harness.daemon import a_to_b_daemon, image_complete
from tests.harness.images import Pusher, layer_bytes
from tests.harness.util import wait_until


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_every_line_of_a_task_carries_its_fields(tmp_path, registry_factory, daemons):
    rule = {"name": "apps", "from": "a", "to": ["b"], "repositories": ["team/**"]}
    a, b, daemon = a_to_b_daemon(tmp_path / "d", registry_factory, [{**rule, "overwrite": False}])
    with Pusher(b.url) as p:  # b's v1 differs: the daemon's copy of v1 is a conflict
        p.push_image("team/app", "v1", [layer_bytes("b-only", 500)])
    daemons.append(daemon.start())
    with Pusher(a.url) as p:
        conflict = p.push_image("team/app", "v1", [layer_bytes("a-v1", 500)])
        copied = p.push_image("team/app", "v2", [layer_bytes("a-v2", 500)])
    wait_until(lambda: image_complete(b, "team/app", "v2", copied.digest), timeout=30, what="v2")
    wait_until(
        lambda: daemon.journal_rows("SELECT 1 FROM tasks WHERE tag = 'v1' AND state = 'dead'"),
        timeout=30,
        what="the conflicting v1 task given up",
    )
    assert daemon.stop() == 0
    lines = _lines(daemon.log())

    done = [line for line in lines if line.get("tag") == "v2" and "copied" in line["msg"]]
    assert len(done) == 1, lines
    failed = [line for line in lines if line.get("tag") == "v1" and "failed" in line["msg"]]
    assert failed, lines
    for line, pushed in ((done[0], copied), (failed[0], conflict)):
        assert isinstance(line["task"], int), line
        assert line["rule"] == "apps", line
        assert line["site"] == "a", line
        assert line["repository"] == "team/app", line
        assert line["digest"] == pushed.digest, line
        assert line["target"].startswith("b/team/app"), line
    assert done[0]["level"] == "info" and failed[0]["level"] == "warning"
    # every line naming a task (by its number in the message) carries the task key
    for line in lines:
        if line["msg"].startswith("task "):
            assert "task" in line, line


def test_webhook_requests_are_logged_as_the_readme_says(tmp_path, registry_factory, daemons):
    """No access line per request (uvicorn's access log is off); a refused webhook at info
    with its status and site, a journaled one at debug with its counts and site."""
    rule = {"name": "apps", "from": "a", "to": ["b"], "repositories": ["team/**"]}
    a, b, daemon = a_to_b_daemon(
        tmp_path / "d", registry_factory, [rule], extra_args=["--log-level", "debug"]
    )
    daemons.append(daemon.start())
    with Pusher(a.url) as p:
        pushed = p.push_image("team/app", "v1", [layer_bytes("hook", 300)])
    wait_until(lambda: image_complete(b, "team/app", "v1", pushed.digest), timeout=30, what="v1")
    refused = httpx.post(
        f"{daemon.url}/events/a", content=b"{}", headers={"Authorization": "Bearer wrong"}
    )
    assert refused.status_code == 401
    assert daemon.stop() == 0
    lines = _lines(daemon.log())

    journaled = [line for line in lines if line["msg"].startswith("webhook journaled")]
    assert journaled and all(line["level"] == "debug" for line in journaled), lines
    assert {line.get("site") for line in journaled} == {"a"}, journaled
    assert [
        line
        for line in lines
        if line["msg"].startswith("webhook refused") and "status=401" in line["msg"]
    ], lines
    assert not [line for line in lines if "POST /events" in line["msg"]], lines
    assert not [line for line in lines if line["logger"] == "uvicorn.access"], lines
