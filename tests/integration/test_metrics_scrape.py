"""/metrics over real HTTP from `xctl aggregator --metrics-port` and `xctl agent --metrics-port`
subprocesses, with simulated nodes running a job that a fault on node2 stalls."""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request

from conftest import Cluster, Daemon, wait_for
from prometheus_client.parser import text_string_to_metric_families

SIM = "sim:gpus=2,ranks=4,nodes=2,index={i},interval=200ms,fault=xid79@gpu-1:node=node2:after=1s"

Series = list[tuple[str, dict[str, str], float]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Series:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def pick(series: Series, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [(lab, v) for n, lab, v in series if n == name and all(lab.get(k) == v2 for k, v2 in labels.items())]


def test_aggregator_and_agents_serve_metrics_over_http(cluster: Cluster) -> None:
    mport, a1, a2 = free_port(), free_port(), free_port()
    aggregator = cluster.aggregator("--metrics-port", str(mport))
    cluster.agent("node1", SIM.format(i=0), "--metrics-port", str(a1))
    cluster.agent("node2", SIM.format(i=1), "--metrics-port", str(a2))

    def story() -> Series | None:
        s = scrape(mport)
        up = {lab["Hostname"]: v for lab, v in pick(s, "xctl_agent_up", state="alive")}
        xid = pick(s, "xctl_active_errors", Hostname="node2", code="XID_79", entity="gpu-1")
        blocked = pick(s, "xctl_processes_blocked", Hostname="node2")
        # Probe states arrive with the agents' first heartbeats (hello only names the probes).
        probes = [pick(s, "xctl_agent_probe_up", Hostname=n, probe="sim", state="running") for n in ("node1", "node2")]
        ready = up == {"node1": 1.0, "node2": 1.0} and xid and blocked and blocked[0][1] >= 1 and all(probes)
        return s if ready else None

    series = wait_for(story, timeout=30, what="both nodes alive and node2's XID 79 blocking a rank", interval=0.2)
    assert pick(series, "xctl_active_errors", Hostname="node2", code="XID_79")[0][0]["kind"] == "hardware"
    for node in ("node1", "node2"):
        assert pick(series, "xctl_events_received_total", Hostname=node)[0][1] > 0
        assert pick(series, "xctl_resyncs_total", Hostname=node)[0][1] >= 1  # first contact is a resync
        assert pick(series, "xctl_agent_probe_up", Hostname=node, probe="sim", state="running")[0][1] == 1
        assert pick(series, "xctl_graph_vertices", Hostname=node, kind="process")[0][1] == 2
    # GPU series carry dcgm-exporter's labels, identities from the probe's attrs.
    gpu0 = pick(series, "xctl_gpu_utilization_ratio", Hostname="node1", gpu="0")
    assert len(gpu0) == 1
    labels, value = gpu0[0]
    assert labels["UUID"].startswith("GPU-") and labels["pci_bus_id"].startswith("00000000:")
    assert labels["device"] == "nvidia0"
    assert 0.0 <= value <= 1.0
    assert pick(series, "xctl_gpu_memory_used_bytes", Hostname="node1", gpu="0")[0][1] > 1024**3

    # Queries are timed per op.
    cluster.query("ps")
    cluster.query("ps")
    after = scrape(mport)
    assert pick(after, "xctl_query_duration_seconds_count", op="ps")[0][1] >= 2
    assert pick(after, "xctl_query_duration_seconds_bucket", op="ps", le="+Inf")[0][1] >= 2

    # Each agent's own endpoint.
    own = scrape(a1)
    assert pick(own, "xctl_probe_up", Hostname="node1", probe="sim", state="running")[0][1] == 1
    assert pick(own, "xctl_agent_events_sent_total", Hostname="node1")[0][1] > 0
    assert pick(own, "xctl_agent_queue_dropped_total", Hostname="node1")[0][1] == 0
    # What each sampling pass costs: counters here, the average in `xctl nodes`.
    assert pick(own, "xctl_probe_cycles_total", Hostname="node1", probe="sim")[0][1] > 0
    assert pick(own, "xctl_probe_cycle_seconds_total", Hostname="node1", probe="sim")[0][1] > 0
    node1 = next(n for n in cluster.query("nodes")["items"] if n["node"] == "node1")
    assert float(next(p for p in node1["probes"] if p["name"] == "sim")["cycle_ms"]) > 0

    # A clean stop takes the HTTP server down with it.
    cluster.close_client()
    assert aggregator.stop(signal.SIGTERM) == 0
    try:
        scrape(mport)
    except (urllib.error.URLError, ConnectionError):
        pass
    else:
        raise AssertionError("/metrics still answers after the aggregator stopped")


def test_an_explicit_metrics_port_in_use_is_a_clear_error(cluster: Cluster) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        d = Daemon(["aggregator", "--port", str(cluster.port), "--metrics-port", str(port)], cluster.tmp / "a.log")
        try:
            rc = d.proc.wait(15)
        finally:
            d.stop()
    assert rc == 1
    out = d.output()
    assert f"cannot serve aggregator /metrics on 127.0.0.1:{port}" in out
    assert "--metrics-port" in out


def test_metrics_port_0_disables_the_endpoint(cluster: Cluster) -> None:
    d = cluster.aggregator("--metrics-port", "0")
    assert "listening on" in d.output()
    assert "/metrics" not in d.output()
