"""`registry-replicator check`: is this configuration usable, and can we reach every site?

Validation first (exit 2 with every problem listed, nothing contacted), then
one authenticated `GET /v2/` per site, all at once, so a wrong password or a
firewall shows up before the daemon is deployed rather than at 3 a.m. Then what
`run` needs on this host, so that "all OK" means `run` starts: the journal (its
directory takes files, an existing file opens at a schema this version reads),
the listen address (bindable, or already served by a running registry-replicator)
and the MQTT broker (connected with the configured TLS and credentials through the
bus's own code, under a throw-away client id so a running daemon's session is not
touched, then disconnected). Nothing is written anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import math
import os
import socket
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


@dataclass
class LocalResult:
    """One thing `run` needs on this host; `name` is the configuration field."""

    name: str  # journal | listen | mqtt
    ok: bool
    detail: str  # what was found; on failure what is wrong, starting with the field


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
            "exit 1 if any site failed. Then the journal (directory writable, an existing "
            "file readable at a known schema), the listen address (bindable) and the MQTT "
            "broker (connect with the configured TLS and credentials, then disconnect) get "
            "one line each; exit 1 if one failed. The secrets `run` reads at start "
            "(webhook tokens, the MQTT password) are read first: exit 2 if one is missing, "
            "as `run` would. "
            "Nothing is written anywhere."
        ),
        epilog="Exit codes: 0 all good, 1 a site, the journal, the listen address or the "
        "broker failed, 2 the configuration is invalid.",
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
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up on a site or the MQTT broker after this long (default 10)",
    )
    parser.set_defaults(handler=run)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"a positive number of seconds, got {text!r}")
    return value


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
    local: list[LocalResult] = []
    if not args.offline:
        results, local = asyncio.run(_check_all(config, args.timeout))
    failed = [r for r in results if not r.ok] + [r for r in local if not r.ok]
    if args.json:
        print(
            json.dumps(
                {
                    "config": str(config.source_path),
                    "valid": True,
                    "offline": args.offline,
                    "sites": [r.__dict__ for r in results],
                    "local": [r.__dict__ for r in local],
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
        width = max([len(r.name) for r in results] + [len(x.name) for x in local], default=0)
        for r in results:
            if r.ok:
                print(f"{r.name:<{width}}  ok      {r.url}")
            else:
                print(f"{r.name:<{width}}  FAILED  {r.error}")
        for x in local:
            print(f"{x.name:<{width}}  {'ok    ' if x.ok else 'FAILED'}  {x.detail}")
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


async def _check_all(config: Config, timeout: float) -> tuple[list[SiteResult], list[LocalResult]]:
    sites, journal, listen, mqtt = await asyncio.gather(
        ping_all(config, timeout),
        asyncio.to_thread(check_journal, config),
        check_listen(config),
        check_mqtt(config, timeout),
    )
    return sites, [journal, listen, *([mqtt] if mqtt else [])]


def check_journal(config: Config) -> LocalResult:
    from replicator.journal.probe import probe_journal

    found = probe_journal(config.journal)
    return LocalResult(
        "journal", found.ok, found.detail if found.ok else f"journal: {found.detail}"
    )


async def check_listen(config: Config) -> LocalResult:
    """Bind the listen address as uvicorn will (SO_REUSEADDR), then let go. In use by a
    registry-replicator that answers /healthz is fine: this checks a deployed config."""
    host, port = config.listen_host, config.listen_port
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and await _serves_replicator(host, port):
            return LocalResult(
                "listen",
                True,
                f"{config.listen} (in use by a running registry-replicator that answers "
                "/healthz; another `run` with this file would have to wait for it to stop)",
            )
        why = "in use by another program" if exc.errno == errno.EADDRINUSE else exc.strerror
        return LocalResult("listen", False, f"listen: cannot bind {config.listen}: {why}")
    return LocalResult("listen", True, config.listen)


async def _serves_replicator(host: str, port: int) -> bool:
    import httpx

    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            resp = await client.get(url)
        return resp.status_code == 200 and resp.json() == {"status": "ok"}
    except (httpx.HTTPError, ValueError):
        return False


async def check_mqtt(config: Config, timeout: float) -> LocalResult | None:
    """Connect to the broker as the daemon would (same TLS context, credentials and
    protocol) but as `<client id>-check-<pid>` with a session that expires at once,
    subscribe to nothing, disconnect. None when no broker is configured."""
    from replicator.daemon.bus import MqttBus, MqttSettings

    mqtt = config.mqtt
    if mqtt is None:
        return None
    base = mqtt.client_id or socket.gethostname()
    try:
        settings = MqttSettings(
            mqtt.url,
            mqtt.topic,
            f"{base[:100]}-check-{os.getpid()}",
            group=mqtt.group,
            username=mqtt.username,
            password=mqtt.password(),
            qos=mqtt.qos,
            tls=mqtt.tls,
            session_expiry=1,
            connect_timeout=timeout,
        )
        bus = MqttBus(settings)
    except ConfigError as exc:
        field = (exc.path or "mqtt").replace("bus.", "mqtt.", 1)
        return LocalResult("mqtt", False, f"{field}: {exc.args[0].split(': ', 1)[-1]}")
    try:
        await bus.wait_connected(timeout)
    except TimeoutError:
        error = bus.last_connect_error or f"no connection within {timeout:g}s"
        return LocalResult("mqtt", False, _mqtt_field(error) + f": {mqtt.url}: {error}")
    finally:
        await bus.stop()
    return LocalResult("mqtt", True, mqtt.url)


def _mqtt_field(error: str) -> str:
    """The configuration field a broker's refusal points at."""
    text = error.lower()
    if "not authorized" in text or "user name or password" in text or "bad user" in text:
        return "mqtt.username/mqtt.password_env/mqtt.password_file"
    if "tls" in text or "ssl" in text or "certificate" in text:
        return "mqtt.tls"
    return "mqtt.url"


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
