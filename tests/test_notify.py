"""systemd notify protocol against real AF_UNIX datagram sockets (path and abstract)."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.daemon.notify import Notifier


@pytest.fixture
def receiver() -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket under a short path (AF_UNIX paths are limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        path = str(Path(d) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5)
        yield path, sock
        sock.close()


def recv(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_messages_reach_a_path_socket(receiver):
    path, sock = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("listening on :8080")
    assert recv(sock) == {"READY": "1", "STATUS": "listening on :8080"}
    assert n.status("2 tasks\nqueued")
    assert recv(sock) == {"STATUS": "2 tasks queued"}
    assert n.watchdog() and recv(sock) == {"WATCHDOG": "1"}
    assert n.stopping() and recv(sock) == {"STOPPING": "1"}
    n.close()


def test_abstract_socket_name():
    name = f"replicator-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert recv(sock) == {"READY": "1"}
    finally:
        sock.close()


def test_no_socket_is_a_noop():
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready("x") is False and n.watchdog() is False
    assert n.watchdog_interval() is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False


def test_unreachable_socket_reports_false_without_raising():
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        n = Notifier.from_env({"NOTIFY_SOCKET": str(Path(d) / "gone")})
        assert n.ready() is False


def test_full_receiver_never_blocks(receiver):
    path, _ = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    results = [n.status("x" * 1000) for _ in range(5000)]  # nobody reads: queue fills up
    assert results[0] is True and results[-1] is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(receiver, env, expected):
    path, _ = receiver
    assert Notifier.from_env({"NOTIFY_SOCKET": path, **env}).watchdog_interval() == expected
