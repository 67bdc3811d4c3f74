"""End-to-end failure scenarios through the real runtime (issue 8).

Each scene under tests/fixtures/scenarios/<name>/ holds one JSON-lines file per node and an
expect.yaml. Per scene: a real aggregator and one `xctl agent --probe replay:<node>.jsonl`
per node (subprocesses, started together); once every node's last event is in the
aggregator's graph and no node is resyncing, `xctl why TARGET -o json` runs as a subprocess
and its answer must name the expected root cause (node, entity, code), rule and action, and
must not blame the scene's red herrings (each listed code is neither the root cause nor, when
the scene says so, missing from the symptoms or alternatives).

expect.yaml keys: target, root_cause ({node, entity, code[, pid, kind]} or null), rule,
action, verdict (optional), not_blamed (codes), symptoms / alternatives (codes that must be
listed there), silent (nodes whose agent is killed once it has reported; the aggregator then
runs with --suspect-after 1 --dead-after 3 and the test waits until they are dead).
Regenerate the scenes with tests/fixtures/scenarios/generate.py.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Cluster, wait_for

from xctl.core.clock import ManualClock
from xctl.core.graph import NodeGraph
from xctl.probes.replay import load_replay

SCENES = Path(__file__).resolve().parents[1] / "fixtures" / "scenarios"
NAMES = sorted(p.parent.name for p in SCENES.glob("*/expect.yaml"))


def _last_event(path: Path) -> dict[str, Any]:
    """The file's last event: the one the replay probe stamps "now", sent last."""
    last: dict[str, Any] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            last = json.loads(line)
    assert last is not None, f"{path} has no events"
    return last


def _expected_counts(path: Path, node: str) -> tuple[int, int]:
    """Live processes and active errors of the node's graph once the whole file is applied."""
    now = int(time.time() * 1000)
    events, errors = load_replay(path.read_text(), now, node)
    assert not errors, errors
    graph = NodeGraph(node, ManualClock(now))
    graph.apply_all(events)
    counts = graph.counts()
    return counts["processes"], counts["errors"]


def _reported(cluster: Cluster, item: dict[str, Any], last: dict[str, Any], expected: tuple[int, int]) -> bool:
    """The aggregator's graph of node ``item["node"]`` holds the whole file.

    Normally the batch carrying the file's last event has been received (then it was applied,
    or buffered and applied when the first-contact resync ended). A batch published before
    the agent's connection was up is lost, but then everything before it is in the snapshot
    the first contact asked for — so a node none of whose events arrived counts as complete
    once that resync is done and its graph has the file's processes and errors.
    """
    node = item["node"]
    args: dict[str, Any] = {"node": node, "type": last["type"], "entity": last["entity"], "limit": 2000}
    if "pid" in last:
        args["pid"] = last["pid"]
    items = cluster.query("events", **args)["items"]
    if any(event["value"] == last["value"] for event in items):
        return True
    anything = cluster.query("events", node=node, limit=1)["items"]
    return not anything and (item["processes"], item["errors"]) == expected


def _ready(cluster: Cluster, lasts: dict[str, dict[str, Any]], expected: dict[str, tuple[int, int]]) -> bool:
    nodes = {item["node"]: item for item in cluster.query("nodes")["items"]}
    if set(nodes) != set(lasts) or any(nodes[n]["resyncs"] < 1 for n in lasts):
        return False
    if cluster.query("health")["counters"]["syncing"]:
        return False
    return all(_reported(cluster, nodes[n], lasts[n], expected[n]) for n in lasts)


def _codes(items: list[dict[str, Any]]) -> set[str]:
    return {item["code"] for item in items}


def _stop_all(cluster: Cluster) -> None:
    """Stop every daemon at once (the fixture would stop them one after the other)."""
    cluster.close_client()
    procs = [d.proc for d in cluster.daemons if d.proc.poll() is None]
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)  # the fixture kills what is left


@pytest.mark.parametrize("name", NAMES)
def test_scenario(name: str, cluster: Cluster) -> None:
    try:
        _check(name, cluster)
    finally:
        _stop_all(cluster)


def _check(name: str, cluster: Cluster) -> None:
    scene = SCENES / name
    expect = yaml.safe_load((scene / "expect.yaml").read_text())
    files = {p.stem: p for p in sorted(scene.glob("*.jsonl"))}
    silent = list(expect.get("silent") or [])
    assert files and set(silent) <= set(files), f"{name}: nodes {sorted(files)}, silent {silent}"

    extra = ["--metrics-port", "0"]
    if silent:
        extra += ["--suspect-after", "1", "--dead-after", "3"]
    cluster.aggregator(*extra)
    agents = {node: cluster.agent(node, f"replay:{path}") for node, path in files.items()}
    lasts = {node: _last_event(path) for node, path in files.items()}
    expected = {node: _expected_counts(path, node) for node, path in files.items()}
    wait_for(
        lambda: _ready(cluster, lasts, expected),
        timeout=45,
        interval=0.1,
        what=f"{name}: every node's replay in the aggregator, none resyncing",
    )

    for node in silent:
        agents[node].proc.kill()
    if silent:

        def dead() -> bool:
            states = {i["node"]: i["state"] for i in cluster.query("nodes")["items"]}
            return all(states.get(n) == "dead" for n in silent)

        wait_for(dead, timeout=15, interval=0.1, what=f"{name}: {silent} dead")

    result = cluster.cli("why", expect["target"], "-o", "json")
    assert result.returncode == 0, f"{name}: why exited {result.returncode}: {result.stderr}"
    why = json.loads(result.stdout)
    summary = _summary(why)

    root, want = why["root_cause"], expect["root_cause"]
    if want is None:
        assert root is None, f"{name}: expected no root cause\n{summary}"
    else:
        assert root is not None, f"{name}: no root cause\n{summary}"
        got = {k: root.get(k) for k in want}
        assert got == want, f"{name}: root cause\n{summary}"
    rule = why["rule"]
    assert (rule or {}).get("id") == expect["rule"], f"{name}: rule\n{summary}"
    assert (rule or {}).get("action") == expect["action"], f"{name}: action\n{summary}"
    if "verdict" in expect:
        assert why["verdict"] == expect["verdict"], f"{name}: verdict\n{summary}"

    blamed = root["code"] if root else None
    for code in expect.get("not_blamed") or []:
        assert code != blamed, f"{name}: {code} is a red herring, yet blamed\n{summary}"
    symptoms, alternatives = _codes(why["symptoms"]), _codes(why["alternatives"])
    missing = set(expect.get("symptoms") or []) - symptoms
    assert not missing, f"{name}: {sorted(missing)} not among the symptoms\n{summary}"
    missing = set(expect.get("alternatives") or []) - alternatives
    assert not missing, f"{name}: {sorted(missing)} not among the alternatives\n{summary}"


def _summary(why: dict[str, Any]) -> str:
    root = why.get("root_cause") or {}
    rule = why.get("rule") or {}
    lines = [
        f"verdict {why.get('verdict')}; root {root.get('node')}/{root.get('entity')} {root.get('code')}; "
        f"rule {rule.get('id')} {rule.get('action')}",
        "alternatives: " + ", ".join(f"{a['node']}/{a['entity']} {a['code']}" for a in why.get("alternatives", [])),
        "symptoms: " + ", ".join(f"{s['node']}/{s['entity']} {s['code']}" for s in why.get("symptoms", [])),
    ]
    return "\n".join(lines)
