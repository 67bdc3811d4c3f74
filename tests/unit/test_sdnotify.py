"""sd_notify without systemd: datagrams on a test socket, path and abstract addresses."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from xctl.agent.sdnotify import Notifier


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    folder = tempfile.mkdtemp(prefix="xctl-sd-", dir="/tmp")  # AF_UNIX paths are short (108 bytes)
    path = str(Path(folder) / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def test_ready_watchdog_stopping_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    assert n.enabled
    assert n.ready() and n.watchdog() and n.stopping()
    assert [sock.recv(64) for _ in range(3)] == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]
    n.close()


def test_abstract_socket_address() -> None:
    name = f"xctl-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(64) == b"READY=1"
        n.close()


def test_watchdog_only_when_asked_for_and_for_this_pid(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    assert not Notifier({"NOTIFY_SOCKET": path}).watchdog()  # no WatchdogSec=
    other = str(os.getpid() + 1)
    assert not Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": other}).watchdog()
    mine = str(os.getpid())
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": mine}).watchdog()


def test_outside_systemd_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()


def test_a_vanished_socket_is_ignored() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/xctl-notify"})
    assert n.enabled and not n.ready()
