"""Shared fixtures: real registries on free ports with temporary storage."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

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
