"""The aggregator's command router (zap): preview, routing, ack/result, TIMEOUT, repeats, audit.

Pure: a real ClusterGraph on a manual clock, the route and the deferred-reply delivery
recorded in lists instead of sockets (the sockets are covered by tests/integration/test_zap.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_for

from xctl.aggregator.commands import CommandRouter, Deferred, NodeUnavailableError
from xctl.core.clock import ManualClock
from xctl.core.cluster import ClusterGraph
from xctl.core.errors import NotFoundError, UsageError
from xctl.core.events import Event, EventType
from xctl.wire.messages import Ack, Command, Result

T0 = 1_732_350_000_000


class Harness:
    def __init__(self, tmp: Path, *, route_error: str | None = None, connected: bool = True) -> None:
        self.clock = ManualClock(T0)
        self.cluster = ClusterGraph(self.clock)
        self.sent: list[tuple[str, Command]] = []
        self.done: list[tuple[str, dict[str, Any]]] = []
        self.audit = tmp / "aggregator-audit.jsonl"
        self.route_error = route_error
        self.router = CommandRouter(
            self.cluster,
            self._route,
            lambda key, data: self.done.append((key, data)),
            clock=self.clock,
            audit_log=self.audit,
            connected=lambda _node: connected,
        )
        self._processes()

    def _route(self, node: str, command: Command) -> str | None:
        if self.route_error:
            return self.route_error
        self.sent.append((node, command))
        return None

    def _processes(self) -> None:
        def state(pid: int, ppid: int, name: str, ctime: float) -> Event:
            attrs = {"name": name, "ppid": ppid, "create_time": ctime}
            return Event(T0, EventType.PROCESS_STATE, name, "start", pid, "job-1", attrs)

        events = [
            state(4800, 1, "torchrun", 1000.5),
            state(4812, 4800, "python3", 1001.25),
            state(4813, 4800, "python3", 1001.5),
            state(4820, 4812, "pt_data_worker", 1002.0),
            state(5000, 1, "sshd", 10.0),
            Event(T0, EventType.COMPUTE_MEM, "gpu-0", "40", 4812, "job-1", {"used_mib": 3212}),
            Event(T0, EventType.COMPUTE_MEM, "gpu-1", "40", 4813, "job-1", {"used_mib": 1000}),
        ]
        self.cluster.apply_all("node3", events)

    def zap(self, **args: Any) -> Any:
        base: dict[str, Any] = {
            "command_id": "c1",
            "target": {"node": "node3", "pid": 4800, "create_time": 1000.5},
            "signal": "TERM",
            "grace_s": 10,
            "requested_by": "alice@laptop",
        }
        base.update(args)
        return self.router.op_zap(None, base)

    def ticked(self) -> list[tuple[str, dict[str, Any]]]:
        """One tick of the router (its deadlines run on the real clock); the answers so far."""
        self.router.tick()
        return self.done

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()] if self.audit.exists() else []


def result_for(command: Command, *, ok: bool = True, outcome: str = "DONE", node: str = "node3") -> Result:
    tree = [{"pid": 4800, "name": "torchrun", "outcome": "terminated"}]
    data = {"outcome": outcome, "reason": None, "tree": tree, "signals": [{"signal": "SIGTERM", "pids": [4800]}],
            "signal": "SIGTERM", "grace_s": 10.0, "duration_ms": 12, "target": {"name": "torchrun"}}
    return Result(command.id, node, ok, data, None if ok else "left something")


def test_dry_run_previews_the_tree_from_the_graph(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    preview = h.zap(dry_run=True, command_id=None)
    assert preview["kind"] == "ZapPreview" and preview["apiVersion"] == "xctl/v1"
    assert [(r["pid"], r["depth"]) for r in preview["tree"]] == [(4800, 0), (4812, 1), (4820, 2), (4813, 1)]
    assert preview["target"]["name"] == "torchrun" and preview["target"]["create_time"] == 1000.5
    assert preview["gpu_mem_mib"] == 4212
    assert preview["tree"][1]["gpus"] == [{"gpu": "gpu-0", "mem_used_mib": 3212.0}]
    assert preview["create_time_matches"] is True
    assert h.sent == [] and h.records() == [], "a preview sends nothing and records nothing"
    other = h.zap(dry_run=True, target={"node": "node3", "pid": 4800, "create_time": 5.0})
    assert other["create_time_matches"] is False


def test_unknown_node_and_unknown_process_are_not_found(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    with pytest.raises(NotFoundError, match="unknown node 'node9'"):
        h.zap(dry_run=True, target={"node": "node9", "pid": 4800})
    with pytest.raises(NotFoundError, match="node3:777"):
        h.zap(dry_run=True, target={"node": "node3", "pid": 777})
    assert h.zap(dry_run=True, target={"pid": 4812})["node"] == "node3", "a bare pid names the only node"


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    with pytest.raises(UsageError, match="create_time"):
        h.zap(target={"node": "node3", "pid": 4800})
    with pytest.raises(UsageError, match="command_id"):
        h.zap(command_id=None)
    with pytest.raises(UsageError, match="grace_s"):
        h.zap(grace_s=-1)
    with pytest.raises(UsageError, match="unknown argument"):
        h.zap(force=True)
    assert h.sent == []


def test_a_command_is_routed_and_answered_when_the_result_arrives(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert h.zap() == Deferred("c1")
    (node, command), = h.sent
    assert node == "node3" and command.op == "zap" and command.id == "c1"
    assert command.target == {"node": "node3", "pid": 4800, "create_time": 1000.5}
    assert command.deadline == T0 + 15_000, "grace + margin"
    assert command.args == {"signal": "TERM", "grace_s": 10.0}
    assert command.requested_by == "alice@laptop"

    h.router.on_ack(Ack("c1", "node3"))
    h.router.on_result(result_for(command))
    (key, answer), = h.done
    assert key == "c1"
    assert answer["kind"] == "ZapResult" and answer["ok"] is True and answer["outcome"] == "DONE"
    assert answer["acked"] is True and answer["node"] == "node3"
    assert answer["target"] == {"node": "node3", "pid": 4800, "create_time": 1000.5, "name": "torchrun"}
    assert answer["tree"] == [{"pid": 4800, "name": "torchrun", "outcome": "terminated"}]
    assert not h.router.pending

    command_line, outcome_line = h.records()
    assert command_line["event"] == "command" and command_line["command_id"] == "c1"
    assert command_line["requested_by"] == "alice@laptop" and command_line["node"] == "node3"
    assert outcome_line["event"] == "outcome" and outcome_line["result"] == "DONE"
    assert outcome_line["tree"] and outcome_line["signals"] == [{"signal": "SIGTERM", "pids": [4800]}]


def test_a_repeated_command_id_is_sent_once_and_answered_with_the_first_result(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert h.zap() == Deferred("c1")
    assert h.zap() == Deferred("c1"), "a retry while it runs waits for the same result"
    assert len(h.sent) == 1
    h.router.on_result(result_for(h.sent[0][1]))
    first = h.done[0][1]
    assert h.zap(signal="KILL") == first, "a repeat after it ended gets the first answer, not a new kill"
    assert len(h.sent) == 1
    assert [r["event"] for r in h.records()] == ["command", "outcome", "repeat"]


def test_a_result_from_another_node_is_ignored(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.zap()
    h.router.on_result(result_for(h.sent[0][1], node="node4"))
    assert h.done == [] and "c1" in h.router.pending


def test_timeout_at_the_deadline_then_a_late_result_is_recorded(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.zap(deadline_s=0.05)
    command = h.sent[0][1]
    h.router.tick()
    assert h.done == []
    wait_for(h.ticked, timeout=5, what="the TIMEOUT answer", interval=0.01)
    (_key, answer), = h.done
    assert answer["ok"] is False and answer["outcome"] == "TIMEOUT" and answer["acked"] is False
    assert "never acknowledged" in answer["reason"]
    assert h.zap() == answer, "a repeat after a TIMEOUT gets the TIMEOUT"

    h.router.on_result(result_for(command, ok=False, outcome="EXPIRED"))
    late = h.zap()
    assert late["outcome"] == "EXPIRED", "the late result replaces the TIMEOUT"
    events = [r["event"] for r in h.records()]
    assert events == ["command", "outcome", "repeat", "late_result", "repeat"]
    assert h.records()[1]["result"] == "TIMEOUT"


def test_timeout_after_an_ack_says_the_zap_may_still_complete(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.zap(deadline_s=0.05)
    h.router.on_ack(Ack("c1", "node3"))
    wait_for(h.ticked, timeout=5, what="the TIMEOUT answer after an ack", interval=0.01)
    answer = h.done[0][1]
    assert answer["acked"] is True and "may still complete" in answer["reason"]


def test_a_node_that_cannot_be_reached_is_refused_at_once_and_audited(tmp_path: Path) -> None:
    h = Harness(tmp_path, route_error="node node3 is not connected to this aggregator")
    with pytest.raises(NodeUnavailableError, match=r"not connected.*nothing was done"):
        h.zap()
    assert not h.router.pending
    (record,) = h.records()
    assert record["event"] == "outcome" and record["result"] == "NODE_DOWN" and record["ok"] is False

    down = Harness(tmp_path / "down", connected=False)
    with pytest.raises(NodeUnavailableError, match="is not connected"):
        down.zap()
    assert down.sent == []


def test_a_dead_node_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.clock.advance(60_000)
    with pytest.raises(NodeUnavailableError, match="node node3 is dead"):
        h.zap()
