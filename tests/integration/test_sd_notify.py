"""`xctl agent` under a (pretend) systemd Type=notify unit: READY=1, then WATCHDOG=1 from its
main loop, then STOPPING=1 on SIGTERM — received on a test socket, as systemd would."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from pathlib import Path

from conftest import Cluster, Daemon


def test_agent_notifies_ready_then_watchdog_then_stopping(cluster: Cluster) -> None:
    folder = tempfile.mkdtemp(prefix="xctl-sd-", dir="/tmp")  # AF_UNIX paths are short
    path = str(Path(folder) / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(15)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"}
        args = ["agent", "--aggregator", f"127.0.0.1:{cluster.port}", "--node", "n1", "--probe", "sim:gpus=1"]
        agent = Daemon(args, cluster.tmp / "agent.log", env=env)  # no aggregator needed to start
        try:
            started = time.monotonic()
            assert sock.recv(64) == b"READY=1"
            assert sock.recv(64) == b"WATCHDOG=1"
            assert sock.recv(64) == b"WATCHDOG=1"  # again, about a second later: from the loop
            assert time.monotonic() - started < 10
            agent.proc.send_signal(signal.SIGTERM)
            assert sock.recv(64) == b"STOPPING=1"
        finally:
            rc = agent.stop()
            os.unlink(path)
            os.rmdir(folder)
    assert rc == 0, agent.output()
