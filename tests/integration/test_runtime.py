"""The distributed runtime end to end: daemons as subprocesses, the CLI as a subprocess."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import XCTL, Cluster, wait_for

from xctl.cli.daemons import free_port_base

PROBE_SCRIPT = r"""
import json, sys, time
now = int(time.time() * 1000)
pid = 424242
lines = [
    {"ts": now, "event_type": "process.state", "entity_id": "trainer", "pid": pid, "job_id": "job-7",
     "value": "start", "attrs": {"name": "trainer", "rank": 0, "create_time": now / 1000}},
    {"ts": now, "event_type": "compute.util", "entity_id": "gpu-0", "pid": pid, "job_id": "job-7", "value": 97},
    {"ts": now, "event_type": "error.hw", "entity_id": "gpu-0", "pid": pid, "value": "XID_48",
     "attrs": {"raw": "NVRM: Xid (PCI:0000:3b:00): 48, pid=424242, name=trainer, An uncorrectable double bit error"}},
]
for line in lines:
    print(json.dumps(line), flush=True)
print("not json at all", flush=True)
while True:  # the probe's own pace (a sample every 0.5 s), not synchronisation
    time.sleep(0.5)
    print(json.dumps({"type": "compute.util", "entity": "gpu-0", "value": 0}), flush=True)
"""


def test_exec_probe_events_visible_in_ps_and_why_within_a_second(cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE_SCRIPT)
    cluster.aggregator()
    cluster.agent("nodeA", f"exec:{sys.executable} {script}")

    def visible() -> tuple[dict, float] | None:
        data = cluster.query("why", target="nodeA:424242")
        return (data, time.time()) if data["root_cause"] else None

    why, seen_at = wait_for(visible, timeout=20, what="the exec probe's XID to reach why")
    event_ts = why["root_cause"]["first_seen_ms"] / 1000
    assert seen_at - event_ts < 1.0 + 0.1, f"visible {seen_at - event_ts:.3f}s after the probe printed it"
    assert why["root_cause"]["code"] == "XID_48"
    assert why["verdict"] == "blocked"

    ps = cluster.cli("ps", "-o", "json")
    assert ps.returncode == 0, ps.stderr
    rows = json.loads(ps.stdout)["items"]
    row = next(r for r in rows if r["pid"] == 424242)
    assert (row["node"], row["name"], row["job"], row["rank"]) == ("nodeA", "trainer", "job-7", 0)
    text = cluster.cli("why", "nodeA:424242")
    assert text.returncode == 0, text.stderr
    assert "XID_48" in text.stdout
    assert "BLOCKED" in text.stdout
    nodes = json.loads(cluster.cli("nodes", "-o", "json").stdout)["items"]
    probes = {p["name"]: p for p in nodes[0]["probes"]}
    assert probes["exec:python3" if "exec:python3" in probes else next(iter(probes))]["state"] == "running"


def test_why_json_names_the_remote_root_cause(cluster: Cluster) -> None:
    fault = "fault=xid79@gpu-3:node=nodeB:after=1s"
    cluster.aggregator()
    for i, node in enumerate(("nodeA", "nodeB")):
        cluster.agent(node, f"sim:gpus=4,job=job-9,ranks=8,nodes=2,index={i},interval=200ms,{fault}")

    def remote_root() -> dict | None:
        result = cluster.cli("why", "nodeA:4801", "-o", "json")
        if result.returncode != 0:
            return None
        data = json.loads(result.stdout)
        root = data["root_cause"]
        return data if root and root["node"] == "nodeB" else None

    data = wait_for(remote_root, timeout=30, what="why on nodeA to name nodeB", interval=0.3)
    assert data["apiVersion"] == "xctl/v1"
    assert data["kind"] == "Why"
    assert (data["root_cause"]["entity"], data["root_cause"]["code"]) == ("gpu-3", "XID_79")
    assert data["target"] == {
        "node": "nodeA",
        "pid": 4801,
        "name": "python3",
        "job": "job-9",
        "rank": 1,
        "state": data["target"]["state"],
    }
    assert [s["edge"] for s in data["chain"]][:2] == ["WaitsOn", "Member"]


def test_unknown_node_exits_4_with_a_clear_message(cluster: Cluster) -> None:
    cluster.aggregator()
    result = cluster.cli("why", "nosuchnode:123")
    assert result.returncode == 4
    assert "unknown node 'nosuchnode'" in result.stderr
    bad = cluster.cli("why", "node3:abc")
    assert bad.returncode == 2
    assert "pid must be a number" in bad.stderr


def test_aggregator_not_running_exits_3_within_the_timeout() -> None:
    import os
    import subprocess

    port = free_port_base()
    env = {**os.environ, "XCTL_AGGREGATOR": f"127.0.0.1:{port}"}
    started = time.monotonic()
    result = subprocess.run(
        [*XCTL, "ps", "--timeout", "1"], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 3
    assert "did not answer" in result.stderr
    assert elapsed < 1.0 + 3.0, f"took {elapsed:.1f}s"  # 1 s budget + interpreter start-up


def test_agent_stops_gracefully_on_sigterm_within_two_seconds(cluster: Cluster) -> None:
    cluster.aggregator()
    agent = cluster.agent("nodeS", "sim:gpus=2,ranks=2,nodes=1,interval=200ms")
    wait_for(
        lambda: any(n["node"] == "nodeS" for n in cluster.query("nodes")["items"]),
        timeout=15,
        what="nodeS to say hello",
    )
    started = time.monotonic()
    code = agent.stop(signal.SIGTERM)
    assert time.monotonic() - started < 2.0
    assert code == 0, agent.output()


def test_demo_runs_to_completion_and_names_a_root_cause_on_another_node() -> None:
    import subprocess

    result = subprocess.run([*XCTL, "demo", "-o", "json"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    root = data["why"]["root_cause"]
    assert data["why"]["target"]["node"] == "node1"
    assert (root["node"], root["entity"], root["code"]) == ("node3", "gpu-3", "XID_79")
    assert len(data["ps"]["items"]) == 32


def test_an_explicit_probe_that_cannot_run_here_is_a_usage_error() -> None:
    import subprocess

    result = subprocess.run(
        [*XCTL, "agent", "--node", "x", "--probe", "kmsg:path=/nonexistent/kmsg"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--probe kmsg:path=/nonexistent/kmsg" in result.stderr
    assert "not readable" in result.stderr


def test_default_probes_that_cannot_run_are_shown_disabled_with_the_reason(cluster: Cluster) -> None:
    from xctl.core.errors import ProbeError
    from xctl.probes.registry import make_probe

    probe = make_probe("nvml")
    try:
        probe.open()  # type: ignore[attr-defined]
    except ProbeError:
        pass
    else:
        probe.close()  # type: ignore[attr-defined]
        pytest.skip("NVML works on this machine: the nvml probe is not disabled here")
    cluster.aggregator()
    cluster.agent("plain")  # no --probe: the defaults

    def nvml_state() -> dict | None:
        items = cluster.query("nodes")["items"]
        probes = {p["name"]: p for p in items[0]["probes"]} if items else {}
        return probes.get("nvml") if probes.get("procfs", {}).get("state") == "running" else None

    nvml = wait_for(nvml_state, timeout=15, what="the agent's probe states")
    assert nvml["state"] == "disabled"
    assert "NVML" in nvml["detail"]


def test_the_aggregator_daemon_runs_the_collector_on_its_schedule(cluster: Cluster) -> None:
    """GC pauses are visibility lag: the daemon freezes survivors every second (xctl.gcpolicy)."""
    cluster.aggregator()

    def two_freezes() -> dict[str, float] | None:
        stats = cluster.query("health")["counters"].get("gc") or {}
        return stats if stats.get("freezes", 0) >= 2 else None

    stats = wait_for(two_freezes, timeout=10, what="two scheduled freezes in health")
    assert stats["pause_ms_max"] < 1000
