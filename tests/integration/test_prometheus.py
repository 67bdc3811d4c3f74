"""A real Prometheus (Debian's `prometheus` package) scrapes a running aggregator; the series
and their labels are checked through Prometheus' own HTTP API, as a dashboard would see them.

.ci/run installs the package best-effort; where /usr/bin/prometheus is missing the test is
skipped and says so."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, wait_for

PROMETHEUS = "/usr/bin/prometheus"
SIM = "sim:gpus=2,ranks=4,nodes=2,index={i},interval=500ms,fault=xid79@gpu-1:node=node2:after=1s"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.access(PROMETHEUS, os.X_OK),
        reason=f"{PROMETHEUS} is not installed (Debian package `prometheus`, which .ci/run installs "
        "best-effort): cannot test against a real Prometheus here",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, tmp: Path, targets: list[str]) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: xctl\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.log = tmp / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the result vector ([] until Prometheus is up and has scraped)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                body = json.load(resp)
        except OSError:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.log.read_text()}") from None
            return []
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def by_node(result: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["metric"]["Hostname"]: r for r in result}


def test_prometheus_scrapes_the_aggregator_and_sees_the_series_with_their_labels(
    cluster: Cluster, tmp_path: Path
) -> None:
    mport = free_port()
    cluster.aggregator("--metrics-port", str(mport))
    cluster.agent("node1", SIM.format(i=0))
    cluster.agent("node2", SIM.format(i=1))
    target = f"127.0.0.1:{mport}"
    prom = Prometheus(tmp_path, [target])
    try:

        def both_up() -> dict[str, dict[str, Any]] | None:
            nodes = by_node(prom.query("xctl_agent_up == 1"))
            return nodes if len(nodes) == 2 else None

        up = wait_for(
            both_up,
            timeout=60,
            what="Prometheus to have scraped both agents as up",
            interval=0.5,
        )
        for node in ("node1", "node2"):
            metric = up[node]["metric"]
            assert metric == {
                "__name__": "xctl_agent_up",
                "Hostname": node,
                "state": "alive",
                "job": "xctl",
                "instance": target,
            }
            assert up[node]["value"][1] == "1"
        assert prom.query(f'up{{job="xctl",instance="{target}"}}')[0]["value"][1] == "1"

        xid = wait_for(
            lambda: prom.query('xctl_active_errors{code="XID_79"}'),
            timeout=30,
            what="the XID 79 on node2 in Prometheus",
            interval=0.5,
        )
        assert xid[0]["metric"]["Hostname"] == "node2"
        assert xid[0]["metric"]["entity"] == "gpu-1"
        assert xid[0]["metric"]["kind"] == "hardware"
        blocked = wait_for(
            lambda: prom.query('xctl_processes_blocked{Hostname="node2"} >= 1'),
            timeout=30,
            what="a blocked process on node2",
            interval=0.5,
        )
        assert blocked[0]["metric"]["Hostname"] == "node2"

        gpu = prom.query('xctl_gpu_utilization_ratio{Hostname="node1",gpu="0"}')
        assert len(gpu) == 1
        labels = gpu[0]["metric"]
        assert labels["UUID"].startswith("GPU-")
        assert labels["pci_bus_id"].startswith("00000000:")
        assert labels["device"] == "nvidia0"
        assert "pod" not in labels  # unknown workload labels are empty, which Prometheus drops
        assert 0.0 <= float(gpu[0]["value"][1]) <= 1.0

        # Counters and the histogram work with rate() and histogram_quantile().
        cluster.query("ps")
        rate = wait_for(
            lambda: prom.query('sum by (Hostname) (rate(xctl_events_received_total{Hostname="node1"}[10s])) > 0'),
            timeout=30,
            what="a positive event rate for node1",
            interval=0.5,
        )
        assert rate[0]["metric"] == {"Hostname": "node1"}
        p99 = wait_for(
            lambda: prom.query(
                'histogram_quantile(0.99, sum by (le, op) (xctl_query_duration_seconds_bucket{op="ps"})) > 0'
            ),
            timeout=30,
            what="a ps latency quantile",
            interval=0.5,
        )
        assert p99[0]["metric"] == {"op": "ps"}
    finally:
        prom.stop()
