"""Real daemons as subprocesses on 127.0.0.1 with ephemeral ports; the CLI as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import waiting

from xctl.cli.daemons import free_port_base
from xctl.core.errors import XctlError
from xctl.wire.client import QueryClient
from xctl.wire.sockets import endpoints

T = TypeVar("T")
XCTL = [sys.executable, "-m", "xctl.cli.main"]


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """``waiting.wait_for`` for the daemons here: an XctlError (no answer yet) counts as "not yet"."""
    return waiting.wait_for(check, timeout=timeout, what=what, interval=interval, ignoring=(XctlError,))


class Daemon:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        self._log_file = log.open("ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [*XCTL, "--log-level", "info", *args], stdout=self._log_file, stderr=subprocess.STDOUT, env=full_env,
            start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Cluster:
    """Start daemons and talk to them; everything started is stopped at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port_base()
        self.daemons: list[Daemon] = []
        self._client: QueryClient | None = None

    def aggregator(self, *extra: str) -> Daemon:
        d = Daemon(["aggregator", "--port", str(self.port), *extra], self.tmp / f"aggregator-{len(self.daemons)}.log")
        self.daemons.append(d)
        wait_for(lambda: self.query("health"), timeout=15, what="aggregator to answer health")
        return d

    def agent(self, node: str, *probes: str) -> Daemon:
        """Start an agent; ``probes`` are SPECs, and ``--option value`` pairs pass through."""
        args = ["agent", "--aggregator", f"127.0.0.1:{self.port}", "--node", node]
        items = list(probes)
        while items:
            item = items.pop(0)
            args += [item, items.pop(0)] if item.startswith("--") else ["--probe", item]
        d = Daemon(args, self.tmp / f"agent-{node}-{len(self.daemons)}.log")
        self.daemons.append(d)
        return d

    @property
    def client(self) -> QueryClient:
        if self._client is None:
            self._client = QueryClient(endpoints("127.0.0.1", self.port).query, timeout_s=3.0)
        return self._client

    def query(self, op: str, **args: Any) -> Any:
        return self.client.request(op, args)

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "XCTL_AGGREGATOR": f"127.0.0.1:{self.port}", "NO_COLOR": "1"}
        return subprocess.run([*XCTL, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)

    def close_client(self) -> None:
        """Drop the query client (its context), e.g. before the aggregator is stopped."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        self.close_client()
        for d in reversed(self.daemons):
            d.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
