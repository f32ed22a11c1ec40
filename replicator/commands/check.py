"""`registry-replicator check`: is this configuration usable, and can we reach every site?

Validation first (exit 2 with every problem listed, nothing contacted), then
one authenticated `GET /v2/` per site, all at once, so a wrong password or a
firewall shows up before the daemon is deployed rather than at 3 a.m.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass

from replicator.config import Config, InvalidConfig, add_config_argument, load_config
from replicator.errors import ConfigError, ReplicatorError


@dataclass
class SiteResult:
    name: str
    url: str
    ok: bool
    error: str | None = None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate the configuration and test the connection to every site",
        description=(
            "Validate the configuration file (with environment overrides applied) and report "
            "every problem with its YAML path and line; exit 2 if there is any. Unless "
            "--offline, then read each site's credentials (password_env / password_file / "
            "docker_config) and send an authenticated GET /v2/ to every site concurrently, "
            "printing one line per site ('NAME  ok  URL' or 'NAME  FAILED  REASON'); "
            "exit 1 if any site failed. The secrets `run` reads at start (webhook tokens, "
            "the MQTT password) are read first: exit 2 if one is missing, as `run` would. "
            "Nothing is written anywhere."
        ),
        epilog="Exit codes: 0 all good, 1 a site failed, 2 the configuration is invalid.",
    )
    add_config_argument(parser)
    parser.add_argument(
        "--offline",
        action="store_true",
        help="only validate the file: contact no registry and read no "
        "secrets (for CI, where the secrets are not present)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the result as one JSON object on stdout"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up on a site after this long (default 10)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        if not args.offline:
            read_startup_secrets(config)
    except ConfigError as exc:
        if args.json:
            problems = getattr(exc, "problems", None) or [(exc.path, str(exc))]
            print(
                json.dumps(
                    {
                        "config": args.config,
                        "valid": False,
                        "errors": [{"path": p, "message": m} for p, m in problems],
                    }
                )
            )
        raise
    for warning in config.warnings:
        print(f"registry-replicator: warning: {warning}", file=sys.stderr)
    results: list[SiteResult] = []
    if not args.offline:
        results = asyncio.run(ping_all(config, args.timeout))
    failed = [r for r in results if not r.ok]
    if args.json:
        print(
            json.dumps(
                {
                    "config": str(config.source_path),
                    "valid": True,
                    "offline": args.offline,
                    "sites": [r.__dict__ for r in results],
                    "warnings": config.warnings,
                }
            )
        )
    else:
        if args.offline:
            print(
                f"{config.source_path}: valid ({_count(len(config.sites), 'site')}, "
                f"{_count(len(config.rules), 'rule')}, "
                f"{_count(len(config.gc.policies), 'GC policy', 'GC policies')})"
            )
        width = max((len(r.name) for r in results), default=0)
        for r in results:
            if r.ok:
                print(f"{r.name:<{width}}  ok      {r.url}")
            else:
                print(f"{r.name:<{width}}  FAILED  {r.error}")
    return 1 if failed else 0


def read_startup_secrets(config: Config) -> None:
    """Read the secrets `run` reads before it serves (webhook tokens, the MQTT password),
    so a missing one fails `check` as it fails `run`: exit 2, every one named."""
    reads = [site.webhook_token for site in config.sites.values()]
    reads += [config.mqtt.password] if config.mqtt else []
    errors = []
    for read in reads:
        try:
            read()
        except ConfigError as exc:
            errors.append(exc)
    if errors:
        raise InvalidConfig(
            f"{config.source_path}: secrets that `run` reads at start cannot be read:\n"
            + "\n".join(f"  {e}" for e in errors),
            [(e.path or "", str(e)) for e in errors],
        )


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


async def ping_all(config: Config, timeout: float) -> list[SiteResult]:
    """Ping every site concurrently; results in configuration order."""
    return list(await asyncio.gather(*(ping_site(config, name, timeout) for name in config.sites)))


async def ping_site(config: Config, name: str, timeout: float) -> SiteResult:
    from replicator.registry.client import RegistryClient
    from replicator.registry.site import SiteEndpoint

    url = config.sites[name].url
    try:
        endpoint = SiteEndpoint.from_config(
            config, name
        )  # reads secrets; errors never contain them
        async with RegistryClient(endpoint, retries=0, timeout=timeout) as client:
            await asyncio.wait_for(client.ping(), timeout)
    except TimeoutError:
        return SiteResult(name, url, False, f"{url}: no answer within {timeout:g}s")
    except ReplicatorError as exc:
        return SiteResult(name, url, False, _with_url(url, str(exc)))
    except Exception as exc:  # an unexpected failure still belongs to this site's line
        return SiteResult(name, url, False, _with_url(url, f"{type(exc).__name__}: {exc}"))
    return SiteResult(name, url, True)


def _with_url(url: str, reason: str) -> str:
    return reason if url in reason else f"{url}: {reason}"
