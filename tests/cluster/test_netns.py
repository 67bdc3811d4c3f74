"""Multi-host: a head namespace with the aggregator and three node namespaces, each agent in
its own PID namespace so PIDs collide across nodes (issue 4).

Needs root, iproute2 and util-linux's unshare; skipped with the reason otherwise. Every
namespace, veth and bridge made here is removed even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_for

from xctl.core.errors import XctlError
from xctl.wire.client import QueryClient
from xctl.wire.sockets import endpoints

NODES = ("nodeA", "nodeB", "nodeC")
PORT = 7400
# Waits poll the aggregator every POLL_S; an XctlError there (no answer yet) counts as "not yet".
POLL_S = 0.2
NOT_YET = (XctlError,)
#: How long a cut-off node is watched, from the cut, for being counted alive (it must not be):
#: a bounded observation window, sampled every CUT_SAMPLE_S, not synchronisation.
CUT_WATCH_S = 10.0
CUT_SAMPLE_S = 0.5


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network and PID namespaces"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2 / util-linux)"
    probe = f"xctlprobe{secrets.token_hex(2)}"
    made = _sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create network namespaces here: {made.stderr.strip()}"
    _sh("ip", "netns", "del", probe, check=False)
    return None


SKIP = _why_skip()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


class Net:
    def __init__(self, tmp: Path) -> None:
        tag = secrets.token_hex(2)
        self.tag = tag
        self.subnet = f"10.231.{int(tag, 16) % 250 + 1}"
        self.bridge = f"xbr{tag}"
        self.head_ns = f"xhead{tag}"
        self.ns = {node: f"x{node[-1].lower()}{tag}" for node in NODES}
        self.veth: dict[str, str] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = tmp

    def setup(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, (name, ns) in enumerate([("head", self.head_ns), *self.ns.items()], start=1):
            outer, inner = f"xv{self.tag}{i}", f"xe{self.tag}{i}"
            self.veth[name] = outer
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _sh("ip", "link", "set", inner, "netns", ns)
            _sh("ip", "link", "set", outer, "master", self.bridge)
            _sh("ip", "link", "set", outer, "up")
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.subnet}.{i}/24", "dev", inner)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def spawn(self, ns: str, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        out = (self.tmp / log).open("ab")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(proc)
        return proc

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for ns in [self.head_ns, *self.ns.values()]:
            _sh("ip", "netns", "pids", ns, check=False)
            _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path)
    try:
        n.setup()
        yield n
    finally:
        n.teardown()


def test_colliding_pids_resolve_per_node_and_a_cut_link_recovers(net: Net) -> None:
    head_ip = f"{net.subnet}.1"
    xctl = [sys.executable, "-m", "xctl.cli.main", "--log-level", "info"]
    help_text = _sh(*xctl, "aggregator", "--help").stdout
    insecure = ["--insecure"] if "--insecure" in help_text else []
    net.spawn(net.head_ns, [*xctl, "aggregator", "--bind", head_ip, "--port", str(PORT), "--suspect-after", "1",
                            "--dead-after", "30", *insecure], "aggregator.log")
    for node, ns in net.ns.items():
        # In a fresh PID namespace the shell is pid 1; the sleeper it starts is pid 2 on every node.
        script = (f"{sys.executable} -c 'import time; time.sleep(600)  # workload of {node}' & "
                  f"exec {' '.join(xctl)} agent --aggregator {head_ip}:{PORT} --node {node} "
                  f"--probe procfs:interval=500ms")
        net.spawn(ns, ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script], f"agent-{node}.log")

    with QueryClient(endpoints(head_ip, PORT).query, timeout_s=3.0) as client:

        def all_nodes_report_pid_2() -> bool:
            rows = client.request("ps", {})["items"]
            return {r["node"] for r in rows if r["pid"] == 2} == set(NODES)

        wait_for(all_nodes_report_pid_2, timeout=30, what="pid 2 on all three nodes", interval=POLL_S, ignoring=NOT_YET)
        why = client.request("why", {"target": "nodeB:2"})
        assert why["target"]["node"] == "nodeB"
        assert why["target"]["pid"] == 2
        rows = client.request("ps", {"node": "nodeB"})["items"]
        assert "workload of nodeB" in next(r for r in rows if r["pid"] == 2)["cmdline"]
        with pytest.raises(XctlError, match="nodeA, nodeB, nodeC"):
            client.request("why", {"target": "2"})  # ambiguous without a node

        def liveness(node: str) -> str:
            return next(n["state"] for n in client.request("nodes", {})["items"] if n["node"] == node)

        cut_at = time.monotonic()
        _sh("ip", "link", "set", net.veth["nodeB"], "down")
        try:
            wait_for(lambda: liveness("nodeB") == "suspect", timeout=5, what="nodeB suspect while cut", interval=POLL_S,
                     ignoring=NOT_YET)
            assert liveness("nodeA") == "alive"
            while time.monotonic() - cut_at < CUT_WATCH_S:
                assert liveness("nodeB") in ("suspect", "dead")
                time.sleep(CUT_SAMPLE_S)  # the window's sampling pace
            # The aggregator was taking heartbeats in all along: nodeA is still alive.
            wait_for(lambda: liveness("nodeA") == "alive", timeout=5, what="nodeA alive after the window",
                     interval=POLL_S, ignoring=NOT_YET)
        finally:
            _sh("ip", "link", "set", net.veth["nodeB"], "up")
        wait_for(lambda: liveness("nodeB") == "alive", timeout=20, what="nodeB alive after the link is back",
                 interval=POLL_S, ignoring=NOT_YET)

        def complete() -> bool:
            rows = client.request("ps", {"node": "nodeB"})["items"]
            syncing = client.request("health", {})["counters"]["syncing"]
            return "nodeB" not in syncing and any(
                r["pid"] == 2 and "workload of nodeB" in (r["cmdline"] or "") for r in rows
            )

        wait_for(complete, timeout=20, what="nodeB's complete state after the cut", interval=POLL_S, ignoring=NOT_YET)
