"""Docker Hub as a source, on the stand-in (tests/harness/hub_front.py): the stand-in
behaves like Hub, the transport follows its CDN redirects without credentials and
keeps within its pull budget, and `sync` mirrors literal repositories from it."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
import yaml

from replicator.registry.client import RegistryClient
from replicator.registry.limits import PullBudget, is_pull, parse_ratelimit
from replicator.registry.site import SiteEndpoint
from tests.harness.hub_front import HubStandIn
from tests.harness.images import assert_image_complete, layer_bytes
from tests.test_sync import cli

MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


@pytest.fixture
def hub(tmp_path):
    with HubStandIn(tmp_path / "hub", limit=5, window=2) as stand_in:
        with stand_in.pusher() as p:
            p.push_image("library/nginx", "1.25", [layer_bytes("nginx", 2000)])
        yield stand_in


def _anonymous_token(hub: HubStandIn, repo: str) -> str:
    scope = f"repository:{repo}:pull"
    answer = httpx.get(hub.tokens.realm, params={"service": hub.tokens.service, "scope": scope})
    return answer.json()["token"]


# ----------------------------------------------------------------------- the stand-in
def test_the_stand_in_behaves_like_docker_hub(hub):
    plain = httpx.get(f"{hub.url}/v2/library/nginx/manifests/1.25")
    assert plain.status_code == 401
    assert hub.tokens.realm in plain.headers["www-authenticate"]  # a token endpoint elsewhere
    assert httpx.get(f"{hub.url}/v2/_catalog").status_code == 401

    auth = {"Authorization": f"Bearer {_anonymous_token(hub, 'library/nginx')}"}
    headers = {**auth, "Accept": MANIFEST_ACCEPT}
    url = f"{hub.url}/v2/library/nginx/manifests/1.25"
    head = httpx.head(url, headers=headers)
    assert head.headers["ratelimit-remaining"] == "5;w=2"  # a HEAD spends nothing
    left = [httpx.get(url, headers=headers).headers["ratelimit-remaining"] for _ in range(5)]
    assert left == ["4;w=2", "3;w=2", "2;w=2", "1;w=2", "0;w=2"]
    assert httpx.head(url, headers=headers).headers["ratelimit-remaining"] == "0;w=2"
    spent = httpx.get(url, headers=headers)
    assert spent.status_code == 429 and b"TOOMANYREQUESTS" in spent.content
    assert spent.headers["ratelimit-limit"] == "5;w=2" and "retry-after" in spent.headers
    assert hub.throttled == 1

    manifest = httpx.get(url, headers=headers, timeout=5)
    deadline = time.monotonic() + 5
    while manifest.status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
        manifest = httpx.get(url, headers=headers)
    assert manifest.status_code == 200  # the window reset
    layer = manifest.json()["layers"][0]["digest"]
    blob = httpx.get(f"{hub.url}/v2/library/nginx/blobs/{layer}", headers=auth)
    assert blob.status_code == 307
    location = blob.headers["location"]
    assert location.startswith(hub.cdn.url)
    assert httpx.get(location).content == layer_bytes("nginx", 2000)


# ----------------------------------------------------------------------- the transport
def test_copy_follows_the_cdn_redirect_without_credentials(hub, registry):
    out = cli("copy", "--insecure", f"docker://{hub.host}/library/nginx:1.25", f"{registry.host}/n")
    assert out.returncode == 0, out.stderr
    assert_image_complete(registry.url, "n", "1.25")
    assert hub.cdn.requests("GET", r"^/cdn/"), "blobs came from the CDN"
    assert hub.cdn_requests_with_authorization() == []
    redirected = hub.front.requests("GET", r"/blobs/sha256:")
    assert redirected and all(s.status == 307 for s in redirected)
    assert all("authorization" in s.headers for s in redirected)  # the registry did get it


def test_pulls_pause_until_the_budget_allows_instead_of_collecting_429s(hub, registry):
    """7 manifest GETs on a budget of 5 per 2 s: the transport waits for the window."""

    async def main() -> tuple[int, float, dict | None]:
        site = SiteEndpoint.from_url(hub.host, insecure=True, name="hub")
        async with RegistryClient(site) as client:
            started = time.monotonic()
            for _ in range(7):
                await client.get_manifest("library/nginx", "1.25")
            return client.stats["retries"], time.monotonic() - started, client.pull_budget()

    retries, seconds, budget = asyncio.run(main())
    assert hub.throttled == 0 and retries == 0
    assert hub.budget.pulls == 7
    assert seconds > 0.5  # it did wait for the window
    assert budget is not None and budget["limit"] == 5 and budget["window"] == 2.0


def test_a_429_with_retry_after_still_works(hub):
    """Budget spent by someone else: the 429s are retried after their Retry-After."""

    async def main() -> int:
        site = SiteEndpoint.from_url(hub.host, insecure=True, name="hub")
        async with RegistryClient(site) as client:
            while hub.budget.spend():  # another client empties the budget
                pass
            hub.budget.throttled = 0
            await client.get_manifest("library/nginx", "1.25")
            return client.stats["retries"]

    assert asyncio.run(main()) >= 1
    assert hub.throttled >= 1


# ----------------------------------------------------------------------- pure budget
def test_ratelimit_headers_parse():
    assert parse_ratelimit("100;w=21600") == (100, 21600.0)
    assert parse_ratelimit("76") == (76, None)
    assert parse_ratelimit(None) is None and parse_ratelimit("lots") is None
    assert is_pull("GET", "https://r/v2/library/nginx/manifests/1.25")
    assert not is_pull("HEAD", "https://r/v2/library/nginx/manifests/1.25")
    assert not is_pull("GET", "https://r/v2/library/nginx/blobs/sha256:00")


def test_answers_out_of_order_never_raise_the_estimate():
    async def main() -> int | None:
        budget = PullBudget("hub")

        async def no_probe():
            raise AssertionError("not paused")

        await budget.acquire(no_probe)
        budget.release({"ratelimit-limit": "10;w=60", "ratelimit-remaining": "10"}, 200)
        for _ in range(3):
            await budget.acquire(no_probe)
        # the registry counted them in order: 9, 8, 7 left; the answers arrive 7, 9, 8
        for left in (7, 9, 8):
            budget.release({"ratelimit-limit": "10;w=60", "ratelimit-remaining": f"{left}"}, 200)
        assert budget.remaining is not None and budget.remaining <= 7  # never above the truth
        await budget.acquire(no_probe)  # one at a time, the estimate is exact
        budget.release({"ratelimit-limit": "10;w=60", "ratelimit-remaining": "6"}, 200)
        return budget.remaining

    assert asyncio.run(main()) <= 6


def test_a_spent_budget_pauses_and_probes_until_the_registry_allows_more():
    async def main() -> tuple[int, int]:
        budget = PullBudget("hub", min_poll=0.01)
        probes = 0

        async def probe():
            nonlocal probes
            probes += 1
            return {
                "ratelimit-limit": "2;w=0.02",
                "ratelimit-remaining": "0" if probes < 3 else "2",
            }

        await budget.acquire(probe)
        budget.release({"ratelimit-limit": "2;w=0.02", "ratelimit-remaining": "0"}, 200)
        await budget.acquire(probe)  # spent: probes at once, then every poll until allowed
        return probes, budget.remaining or 0

    assert asyncio.run(main()) == (3, 1)


def test_until_the_first_answer_tells_one_pull_goes_at_a_time():
    async def main() -> list[str]:
        budget = PullBudget("hub")
        order: list[str] = []

        async def probe():
            raise AssertionError("not spent")

        async def pull(name: str) -> None:
            await budget.acquire(probe)
            order.append(f"{name} sent")

        await pull("first")
        second = asyncio.create_task(pull("second"))
        await asyncio.sleep(0.05)
        order.append("first answered")
        budget.release({"ratelimit-limit": "10;w=60", "ratelimit-remaining": "9"}, 200)
        await asyncio.wait_for(second, 5)
        return order

    assert asyncio.run(main()) == ["first sent", "first answered", "second sent"]


def test_a_registry_without_ratelimit_headers_is_unmetered():
    async def main() -> bool:
        budget = PullBudget("plain")

        async def probe():
            raise AssertionError("never paused")

        for _ in range(50):
            await budget.acquire(probe)
            budget.release({"content-type": "application/json"}, 200)
        return budget.snapshot() is None

    assert asyncio.run(main())


# ----------------------------------------------------------------------- the figure
def test_mirroring_20_literal_repositories_on_100_pulls_per_window_meets_no_429(tmp_path, registry):
    """The note's figure: 20 repositories x 2 tags x (index + 2 platform manifests) =
    120 pulls on a budget of 100 per 3 s window: the sync pauses, no 429 is sent."""
    repos = [f"library/app{i}" for i in range(20)]
    with HubStandIn(tmp_path / "hub", limit=100, window=3) as hub:
        with hub.pusher() as p:
            for repo in repos:
                for tag in ("1", "2"):
                    p.push_multiarch(repo, tag, f"{repo}-{tag}")
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "journal": str(tmp_path / "journal.db"),
                    "sites": {
                        "hub": {"url": hub.url, "insecure": True},
                        "mirror": {"url": registry.url, "insecure": True},
                    },
                    "rules": [
                        {"name": "hub", "from": "hub", "to": ["mirror"], "repositories": repos}
                    ],
                }
            )
        )
        started = time.monotonic()
        out = cli("sync", "-c", str(config), "--json")
        seconds = time.monotonic() - started
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        print(
            f"\nFIGURE hub mirror: {hub.budget.pulls} pulls, {hub.throttled} answered 429, "
            f"{seconds:.1f} s"
        )
        assert hub.throttled == 0
        assert hub.budget.pulls >= 120  # more than one window's budget: it paused
        assert result["copied"] == 40 and result["failed"] == 0
        assert result["ratelimits"]["hub"]["limit"] == 100
        assert hub.cdn_requests_with_authorization() == []
        assert hub.front.requests("GET", r"^/v2/_catalog") == []

        status = cli("status", "-c", str(config), "--json")
        assert status.returncode == 0, status.stderr
        budgets = json.loads(status.stdout)["ratelimits"]
        assert budgets["hub"]["limit"] == 100
        assert 0 <= budgets["hub"]["remaining"] < 100
        text = cli("status", "-c", str(config)).stdout
        assert re.search(r"pull budget hub: \d+ of 100 per 3 s left", text), text
    for repo in repos:
        assert_image_complete(registry.url, repo, "2")


# ----------------------------------------------------------------------- metrics
def test_ratelimit_metrics_exist_at_zero_and_follow_the_budget(hub):
    from replicator.clients import ClientPool
    from replicator.config import config_from_dict
    from replicator.metrics import Metrics

    config = config_from_dict(
        {
            "journal": "/tmp/unused.db",
            "sites": {
                "hub": {"url": hub.url, "insecure": True},
                "plain": {"url": "http://127.0.0.1:1", "insecure": True},
            },
            "rules": [],
        }
    )
    metrics = Metrics()
    metrics.know(config)
    text = metrics.render()
    for site in ("hub", "plain"):
        assert f'registry_replicator_ratelimit_remaining{{site="{site}"}} 0.0' in text
        assert f'registry_replicator_ratelimit_limit{{site="{site}"}} 0.0' in text

    async def main() -> str:
        async with ClientPool(config) as pool:
            metrics.watch_budgets(pool.budgets)
            await pool["hub"].get_manifest("library/nginx", "1.25")
            return metrics.render()

    text = asyncio.run(main())
    assert 'registry_replicator_ratelimit_limit{site="hub"} 5.0' in text
    assert 'registry_replicator_ratelimit_remaining{site="hub"} 4.0' in text
    assert 'registry_replicator_ratelimit_limit{site="plain"} 0.0' in text
