"""Shared fixtures: real registries on free ports with temporary storage."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.fault_proxy import FaultProxy
from tests.harness.registry import Registry


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """Start as many real registries ("sites") as a test wants; all stop at teardown."""
    started: list[Registry] = []

    def make(name: str = "site", **kwargs) -> Registry:
        reg = Registry(root=tmp_path / f"{name}-{len(started)}", **kwargs)
        started.append(reg)
        return reg.start()

    yield make
    for reg in started:
        reg.stop()


@pytest.fixture
def registry(registry_factory) -> Registry:
    return registry_factory("a")


@pytest.fixture
def two_registries(registry_factory) -> tuple[Registry, Registry]:
    return registry_factory("src"), registry_factory("dst")


@pytest.fixture
def proxy_factory() -> Iterator[Callable[..., FaultProxy]]:
    """Put a fault-injecting proxy in front of a registry: `proxy_factory(registry)`."""
    started: list[FaultProxy] = []

    def make(reg: Registry) -> FaultProxy:
        proxy = FaultProxy("127.0.0.1", reg.port).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def fault_proxy(registry, proxy_factory) -> FaultProxy:
    """A FaultProxy in front of the `registry` fixture; tests switch faults at run time."""
    return proxy_factory(registry)


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A real Mosquitto broker with persistence on a free port; stopped at teardown."""
    from tests.harness.mosquitto import Mosquitto

    broker = Mosquitto(root=tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture
def daemons():
    """Daemon processes a test starts (append them); each is stopped at teardown."""
    started = []
    yield started
    for d in started:
        d.stop()
