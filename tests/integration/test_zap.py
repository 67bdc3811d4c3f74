"""`xctl zap` end to end: CLI → aggregator → agent → real process trees (daemons as subprocesses).

The agent's procfs probe watches the real /proc for processes whose argv[0] matches
``zaptree-.*`` (the trees of tests/fixtures/zaptree.py), so ``ps`` and the zap preview know
their pids, parents and create times; the agent's actuator then ends them for real.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Cluster, Daemon, wait_for

from xctl.wire.client import QueryClient
from xctl.wire.sockets import endpoints

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
_spec = importlib.util.spec_from_file_location("zaptree", FIXTURES / "zaptree.py")
assert _spec is not None and _spec.loader is not None
zaptree = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zaptree)

PROCFS = "procfs:interval=200ms,watch=zaptree-.*"


@pytest.fixture
def trees(tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    made: list[Any] = []

    def make(spec: str, env: dict[str, str] | None = None) -> Any:
        tree = zaptree.Tree(tmp_path / f"tree-{len(made)}.pids", spec, env=env)
        made.append(tree)
        return tree

    yield make
    for tree in made:
        tree.close()


class ZapCluster:
    """An aggregator and one agent (node n1) with audit logs, and helpers around them."""

    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.cluster = cluster
        self.agg_audit = tmp / "aggregator-audit.jsonl"
        self.agent_audit = tmp / "agent-audit.jsonl"
        cluster.aggregator("--metrics-port", "0", "--audit-log", str(self.agg_audit))
        self.agent = self.start_agent()

    def start_agent(self) -> Daemon:
        args = ["agent", "--aggregator", f"127.0.0.1:{self.cluster.port}", "--node", "n1", "--probe", PROCFS]
        agent = Daemon([*args, "--audit-log", str(self.agent_audit)], self.cluster.tmp / "agent-n1.log")
        self.cluster.daemons.append(agent)
        wait_for(self._connected, timeout=15, what="agent n1 to connect")
        return agent

    def _connected(self) -> bool:
        nodes = self.cluster.query("nodes")["items"]
        return any(n["node"] == "n1" and n["state"] == "alive" for n in nodes)

    def known(self, tree: Any) -> None:
        """Wait until the aggregator's view holds every process of ``tree`` (for the preview)."""

        def all_there() -> bool:
            pids = {r["pid"] for r in self.cluster.query("ps", node="n1")["items"] if r["state"] == "running"}
            return set(tree.members) <= pids

        wait_for(all_there, timeout=15, what="the tree to show in ps")

    def zap_json(self, target: str, *extra: str, timeout: float = 60) -> tuple[int, dict[str, Any], float]:
        started = time.monotonic()
        out = self.cluster.cli("zap", target, "--yes", "-o", "json", *extra, timeout=timeout)
        took = time.monotonic() - started
        assert out.stdout, out.stderr
        return out.returncode, json.loads(out.stdout), took

    def lines(self, path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def query_zap(self, timeout_s: float, **args: Any) -> Any:
        with QueryClient(endpoints("127.0.0.1", self.cluster.port).query, timeout_s=timeout_s, retries=0) as client:
            return client.request("zap", args)


@pytest.fixture
def zc(cluster: Cluster, tmp_path: Path) -> ZapCluster:
    return ZapCluster(cluster, tmp_path)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_zap_ends_the_whole_real_tree_and_records_it(zc: ZapCluster, trees: Callable[[str], Any]) -> None:
    tree = trees("sleeper,stubborn,session,parent")
    zc.known(tree)
    root = tree.pid("root")

    preview = zc.cluster.cli("zap", f"n1:{root}", "--dry-run")
    assert preview.returncode == 0, preview.stderr
    for pid in tree.members:
        assert str(pid) in preview.stdout
    assert "6 processes" in preview.stdout
    assert all(alive(p) for p in tree.members), "--dry-run kills nothing"

    code, result, took = zc.zap_json(f"n1:{root}", "--grace", "1")
    assert code == 0, result
    assert result["apiVersion"] == "xctl/v1" and result["kind"] == "ZapResult"
    assert result["ok"] is True and result["outcome"] == "DONE" and result["node"] == "n1"
    assert result["target"]["pid"] == root
    assert len(result["command_id"]) == 32
    got = {r["pid"]: r["outcome"] for r in result["tree"]}
    assert set(got) == set(tree.members)
    assert got[tree.pid("stubborn")] == "killed"
    assert {got[tree.pid(r)] for r in ("root", "sleeper", "session", "parent", "grandchild")} == {"terminated"}
    assert all({"pid", "name", "outcome"} <= set(r) for r in result["tree"])
    assert not any(alive(p) for p in tree.members)
    assert alive(tree.pid("launcher"))
    assert took < 1.0 + 5.0, f"zap took {took:.2f}s"

    # The audit logs of both sides hold the command and its outcome.
    agg = zc.lines(zc.agg_audit)
    assert [r["event"] for r in agg] == ["command", "outcome"]
    assert {r["command_id"] for r in agg} == {result["command_id"]}
    assert agg[1]["result"] == "DONE" and agg[1]["requested_by"] and agg[1]["node"] == "n1"
    assert {r["pid"] for r in agg[1]["tree"]} == set(tree.members)
    assert [s["signal"] for s in agg[1]["signals"]] == ["SIGTERM", "SIGKILL"]
    (agent_line,) = zc.lines(zc.agent_audit)
    assert agent_line["command_id"] == result["command_id"] and agent_line["outcome"] == "DONE"

    # The graph shows what was done: killed tombstones and the ZAP action.
    def killed() -> bool:
        rows = {r["pid"]: r["state"] for r in zc.cluster.query("ps", node="n1")["items"]}
        return all(rows.get(p) == "killed" for p in tree.members)

    wait_for(killed, timeout=10, what="the tree to show as killed in ps")
    actions = zc.cluster.query("events", node="n1", type="action.exec")["items"]
    assert any(a["value"] == "ZAP" and a["pid"] == root and a["attrs"]["result"] == "DONE" for a in actions)


def test_dry_run_json_previews_and_kills_nothing(zc: ZapCluster, trees: Callable[[str], Any]) -> None:
    tree = trees("sleeper,parent")
    zc.known(tree)
    root = tree.pid("root")
    out = zc.cluster.cli("zap", f"n1:{root}", "--dry-run", "-o", "json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["kind"] == "ZapPreview"
    assert {r["pid"] for r in data["tree"]} == set(tree.members)
    assert data["target"]["create_time"] is not None
    assert all(alive(p) for p in tree.members)
    assert zc.lines(zc.agg_audit) == [] and zc.lines(zc.agent_audit) == []


def test_without_yes_off_a_terminal_nothing_is_done(zc: ZapCluster, trees: Callable[[str], Any]) -> None:
    tree = trees("sleeper")
    zc.known(tree)
    out = zc.cluster.cli("zap", f"n1:{tree.pid('root')}")
    assert out.returncode == 2
    assert "--yes" in out.stderr
    assert all(alive(p) for p in tree.members)


def test_refusals_through_the_stack(zc: ZapCluster, trees: Callable[[str], Any]) -> None:
    tree = trees("sleeper")
    zc.known(tree)
    root = tree.pid("root")
    real = psutil.Process(root).create_time()

    code, result, _ = zc.zap_json(f"n1:{root}", "--create-time", str(real - 100))
    assert code == 1 and result["outcome"] == "REFUSED" and "reused" in result["reason"]
    assert all(alive(p) for p in tree.members)

    code, result, _ = zc.zap_json("n1:1", "--create-time", str(psutil.Process(1).create_time()))
    assert code == 1 and result["outcome"] == "REFUSED" and "pid 1" in result["reason"]

    agent_pid = zc.agent.proc.pid
    code, result, _ = zc.zap_json(f"n1:{agent_pid}", "--create-time", str(psutil.Process(agent_pid).create_time()))
    assert code == 1 and result["outcome"] == "REFUSED" and "this agent itself" in result["reason"]
    assert zc.agent.proc.poll() is None

    unknown_node = zc.cluster.cli("zap", "n9:123", "--yes")
    assert unknown_node.returncode == 4 and "unknown node" in unknown_node.stderr
    unknown_pid = zc.cluster.cli("zap", "n1:999999", "--yes")
    assert unknown_pid.returncode == 4


def test_the_same_command_id_executes_once(zc: ZapCluster, trees: Callable[[str], Any]) -> None:
    tree = trees("sleeper")
    zc.known(tree)
    root = tree.pid("root")
    args = {
        "command_id": "0123456789abcdef",
        "target": {"node": "n1", "pid": root, "create_time": psutil.Process(root).create_time()},
        "grace_s": 1.0,
        "requested_by": "test@here",
    }
    first = zc.query_zap(10, **args)
    again = zc.query_zap(10, **args)
    assert first["ok"] and again == first
    assert len(zc.lines(zc.agent_audit)) == 1, "the agent executed it once"
    assert [r["event"] for r in zc.lines(zc.agg_audit)] == ["command", "outcome", "repeat"]


def test_the_agent_keeps_serving_while_a_zap_waits_out_its_grace(zc: ZapCluster, trees: Callable[[str], Any]) -> None:
    slow, quick = trees("stubborn"), trees("sleeper")
    zc.known(slow)
    zc.known(quick)
    answers: dict[str, Any] = {}

    def zap_slow() -> None:
        root = slow.pid("root")
        target = {"node": "n1", "pid": root, "create_time": psutil.Process(root).create_time()}
        answers["slow"] = zc.query_zap(20, command_id="slow", target=target, grace_s=4.0)
        answers["slow_done"] = time.monotonic()

    worker = threading.Thread(target=zap_slow)
    worker.start()
    try:
        wait_for(lambda: not alive(slow.pid("root")), timeout=10, what="the slow zap to start")
        root = quick.pid("root")
        target = {"node": "n1", "pid": root, "create_time": psutil.Process(root).create_time()}
        answers["quick"] = zc.query_zap(10, command_id="quick", target=target, grace_s=4.0)
        answers["quick_done"] = time.monotonic()
        assert "slow_done" not in answers, "the quick zap finished while the slow one waits out its grace"
    finally:
        worker.join(20)
    assert answers["quick"]["ok"] and answers["slow"]["ok"]
    assert answers["quick_done"] < answers["slow_done"]
    assert {r["outcome"] for r in answers["slow"]["tree"]} >= {"killed"}


def test_a_stopped_agent_gives_timeout_and_an_expired_command_is_never_run(
    zc: ZapCluster, trees: Callable[[str], Any]
) -> None:
    tree = trees("sleeper")
    zc.known(tree)
    root = tree.pid("root")
    target = {"node": "n1", "pid": root, "create_time": psutil.Process(root).create_time()}
    os.kill(zc.agent.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = zc.query_zap(10, command_id="stopped", target=target, grace_s=0.5, deadline_s=1.5)
        took = time.monotonic() - started
    finally:
        os.kill(zc.agent.proc.pid, signal.SIGCONT)
    assert answer["ok"] is False and answer["outcome"] == "TIMEOUT" and answer["acked"] is False
    assert 1.4 <= took < 4.0
    # Resumed, the agent finds the command expired and refuses it; the aggregator records that.
    wait_for(
        lambda: any(r["event"] == "late_result" for r in zc.lines(zc.agg_audit)),
        timeout=15,
        what="the late result in the audit log",
    )
    late = next(r for r in zc.lines(zc.agg_audit) if r["event"] == "late_result")
    assert late["result"] == "EXPIRED"
    assert [r["event"] for r in zc.lines(zc.agg_audit)][:2] == ["command", "outcome"]
    assert zc.lines(zc.agg_audit)[1]["result"] == "TIMEOUT"
    assert zc.lines(zc.agent_audit)[0]["outcome"] == "EXPIRED"
    assert all(alive(p) for p in tree.members), "an expired command kills nothing"


def test_an_agent_that_is_down_gives_a_clear_error_at_once(zc: ZapCluster, trees: Callable[[str], Any]) -> None:
    tree = trees("sleeper")
    zc.known(tree)
    root = tree.pid("root")
    zc.agent.stop()
    started = time.monotonic()
    out = zc.cluster.cli("zap", f"n1:{root}", "--yes", "--grace", "30")
    took = time.monotonic() - started
    assert out.returncode == 1, out
    assert "n1 is not connected" in out.stderr and "nothing was done" in out.stderr
    assert took < 10, "long before the 35 s deadline"
    assert all(alive(p) for p in tree.members)
    (record,) = zc.lines(zc.agg_audit)
    assert record["result"] == "NODE_DOWN"


def test_zap_job_ends_every_rank_tree_of_the_job_and_nothing_else(zc: ZapCluster, trees: Callable[..., Any]) -> None:
    ranks = [trees("sleeper,parent", {"SLURM_JOB_ID": "zjob-7", "SLURM_PROCID": str(r)}) for r in (0, 1)]
    other = trees("sleeper")
    for tree in (*ranks, other):
        zc.known(tree)

    def job_known() -> bool:
        rows = zc.cluster.query("ps", job="zjob-7", all=False)["items"]
        return {r["pid"] for r in rows} >= {p for t in ranks for p in t.members}

    wait_for(job_known, timeout=15, what="both rank trees to carry job zjob-7")

    preview = zc.cluster.cli("zap", "job:zjob-7", "--dry-run", "-o", "json")
    assert preview.returncode == 0, preview.stderr
    plan = json.loads(preview.stdout)
    assert plan["kind"] == "ZapJobPreview" and plan["nodes"] == ["n1"]
    assert {r["pid"] for r in plan["roots"]} == {t.pid("root") for t in ranks}  # the tops of the job's trees
    assert [r["rank"] for r in plan["roots"]] == [0, 1]
    assert all(alive(p) for t in ranks for p in t.members), "--dry-run kills nothing"

    refused = zc.cluster.cli("zap", "job:zjob-7")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert all(alive(p) for t in ranks for p in t.members)

    code, result, _took = zc.zap_json("job:zjob-7", "--grace", "1")
    assert code == 0, json.dumps(result)[:3000]
    assert result["kind"] == "ZapJobResult" and result["ok"] is True and result["job"] == "zjob-7"
    assert sorted(r["target"]["pid"] for r in result["results"]) == sorted(t.pid("root") for t in ranks)
    assert {r["outcome"] for r in result["results"]} == {"DONE"}
    assert not any(alive(p) for t in ranks for p in t.members)
    assert all(alive(t.pid("launcher")) for t in ranks), "the launchers are outside the job"
    assert all(alive(p) for p in other.members), "a process outside the job was hit"
    audited = [r for r in zc.lines(zc.agg_audit) if r["event"] == "outcome"]
    assert len(audited) == 2 and {r["result"] for r in audited} == {"DONE"}

    gone = zc.cluster.cli("zap", "job:zjob-7", "--yes")
    assert gone.returncode == 4 and "no live process" in gone.stderr
