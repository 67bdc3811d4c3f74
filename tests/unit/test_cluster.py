"""The cluster view: liveness, the job index across nodes, resync by snapshot, and pids
that collide across nodes (DESIGN §4, §5)."""

from __future__ import annotations

from typing import Any

import pytest

from xctl.core.clock import ManualClock
from xctl.core.cluster import ClusterGraph, Liveness, LivenessConfig
from xctl.core.errors import NotFoundError, TargetError
from xctl.core.events import Event, EventType
from xctl.core.graph import GraphLimits, NodeGraph
from xctl.core.targets import Target, parse_target
from xctl.core.why import explain, resolve

T0 = 1_732_350_000_000
S = 1_000
ST, U, HW = EventType.PROCESS_STATE, EventType.COMPUTE_UTIL, EventType.ERROR_HW


class C:
    def __init__(self, liveness: LivenessConfig | None = None, limits: GraphLimits | None = None) -> None:
        self.clock = ManualClock(T0)
        self.cluster = ClusterGraph(self.clock, limits, liveness)

    def emit(
        self,
        node: str,
        etype: EventType,
        entity: str,
        value: str,
        pid: int | None = None,
        job: str | None = None,
        **a: Any,
    ) -> Event:
        ev = Event(self.clock.now, etype, entity, value, pid, job, a)
        self.cluster.apply(node, ev)
        return ev

    def rank(self, node: str, pid: int, job: str, rank: int, ctime: float | None = None) -> None:
        attrs: dict[str, Any] = {"name": "python3", "rank": rank}
        if ctime is not None:
            attrs["create_time"] = ctime
        self.emit(node, ST, "python3", "start", pid, job, **attrs)
        self.emit(node, U, f"gpu-{rank % 8}", "97", pid, job)


# ====================================================================== liveness
def test_liveness_alive_suspect_dead_on_the_receivers_clock() -> None:
    c = C(LivenessConfig(suspect_ms=5 * S, dead_ms=20 * S))
    c.emit("node1", U, "gpu-0", "50")
    assert c.cluster.liveness("node1") is Liveness.ALIVE
    c.clock.advance(5 * S - 1)
    assert c.cluster.liveness("node1") is Liveness.ALIVE
    c.clock.advance(1)
    assert c.cluster.liveness("node1") is Liveness.SUSPECT
    c.clock.advance(15 * S - 1)
    assert c.cluster.liveness("node1") is Liveness.SUSPECT
    c.clock.advance(1)
    assert c.cluster.liveness("node1") is Liveness.DEAD
    c.cluster.seen("node1")
    assert c.cluster.liveness("node1") is Liveness.ALIVE


def test_liveness_ignores_the_senders_timestamps() -> None:
    c = C(LivenessConfig(suspect_ms=5 * S, dead_ms=20 * S))
    c.cluster.apply("node1", Event(T0 - 3_600 * S, U, "gpu-0", "50"))
    assert c.cluster.liveness("node1") is Liveness.ALIVE
    c.clock.advance(21 * S)
    c.cluster.apply("node2", Event(c.clock.now + 3_600 * S, U, "gpu-0", "50"))
    assert c.cluster.liveness("node1") is Liveness.DEAD
    assert c.cluster.liveness("node2") is Liveness.ALIVE


def test_an_unknown_node_is_dead() -> None:
    assert C().cluster.liveness("nowhere") is Liveness.DEAD


def test_status_counts_events_per_node() -> None:
    c = C()
    c.emit("node1", U, "gpu-0", "50")
    c.cluster.apply_all("node1", [Event(T0, U, "gpu-1", "50"), Event(T0, U, "gpu-2", "50")])
    c.clock.advance(7 * S)
    c.cluster.seen("node1")
    status = c.cluster.status["node1"]
    assert (status.events, status.first_seen, status.last_seen) == (3, T0, T0 + 7 * S)


def test_remove_node_forgets_it() -> None:
    c = C()
    c.rank("node1", 10, "job-a", 0)
    c.cluster.remove_node("node1")
    assert c.cluster.nodes == {}
    assert c.cluster.liveness("node1") is Liveness.DEAD
    assert c.cluster.ranks("job-a") == []
    assert c.cluster.jobs() == []


# ====================================================================== job index
def three_node_job(c: C) -> None:
    # ranks deliberately interleaved across nodes and pids that collide across nodes
    for n, node in enumerate(("node2", "node0", "node1")):
        for local in range(4):
            c.rank(node, 4800 + local, "job-42", rank=local * 3 + n, ctime=float(local))


def test_ranks_lists_every_rank_on_every_node_sorted_by_rank() -> None:
    c = C()
    three_node_job(c)
    ranks = c.cluster.ranks("job-42")
    assert [r.rank for r in ranks] == list(range(12))
    assert [r.node for r in ranks[:3]] == ["node2", "node0", "node1"]
    assert {(r.node, r.process.pid) for r in ranks} == {
        (node, 4800 + i) for node in ("node0", "node1", "node2") for i in range(4)
    }
    assert c.cluster.job_nodes("job-42") == ["node0", "node1", "node2"]
    assert c.cluster.jobs() == ["job-42"]


def test_ranks_include_tombstoned_ranks() -> None:
    c = C()
    three_node_job(c)
    c.emit("node0", ST, "python3", "exit", 4802, "job-42", exit_code=1, create_time=2.0)
    ranks = c.cluster.ranks("job-42")
    assert len(ranks) == 12
    dead = [r for r in ranks if not r.process.alive]
    assert [(r.node, r.process.pid, r.rank, r.process.state) for r in dead] == [("node0", 4802, 7, "exit")]


def test_a_node_whose_ranks_all_died_stays_in_the_job() -> None:
    c = C()
    c.rank("node0", 1, "job-a", 0, ctime=1.0)
    c.rank("node1", 1, "job-a", 1, ctime=1.0)
    c.emit("node1", ST, "python3", "killed", 1, "job-a", create_time=1.0)
    assert c.cluster.job_nodes("job-a") == ["node0", "node1"]
    assert [r.rank for r in c.cluster.ranks("job-a")] == [0, 1]


def test_a_dead_rank_stays_when_another_job_reuses_its_pid() -> None:
    c = C()
    c.rank("node0", 4801, "job-a", 0, ctime=1.0)
    c.rank("node1", 4801, "job-a", 1, ctime=1.0)
    c.emit("node1", ST, "python3", "exit", 4801, "job-a", exit_code=1, create_time=1.0)
    c.rank("node1", 4801, "job-b", 0, ctime=2.0)
    assert [(r.node, r.rank, r.process.alive) for r in c.cluster.ranks("job-a")] == [
        ("node0", 0, True),
        ("node1", 1, False),
    ]
    assert [(r.node, r.rank) for r in c.cluster.ranks("job-b")] == [("node1", 0)]


def test_a_restarted_rank_is_listed_once() -> None:
    c = C()
    c.rank("node0", 4800, "job-a", 0)
    c.rank("node0", 4800, "job-a", 0)  # start again without create_time: a restart
    assert len(c.cluster.nodes["node0"].tombstones) == 1
    assert [(r.node, r.process.alive) for r in c.cluster.ranks("job-a")] == [("node0", True)]


def test_a_job_gone_from_a_node_is_pruned_from_the_index() -> None:
    c = C(limits=GraphLimits(tombstone_ttl_ms=60 * S))
    c.rank("node0", 1, "job-a", 0)
    c.rank("node1", 1, "job-a", 1)
    c.emit("node1", ST, "python3", "exit", 1, "job-a")
    c.clock.advance(61 * S)
    c.cluster.expire()
    assert c.cluster.job_nodes("job-a") == ["node0"]
    assert [r.node for r in c.cluster.ranks("job-a")] == ["node0"]


def test_ranks_of_an_unknown_job_is_empty() -> None:
    c = C()
    three_node_job(c)
    assert c.cluster.ranks("job-none") == []
    assert c.cluster.job_nodes("job-none") == []


def test_iter_processes_yields_live_and_dead_by_node() -> None:
    c = C()
    c.rank("node1", 1, "job-a", 0)
    c.rank("node0", 2, "job-a", 1, ctime=2.0)
    c.emit("node0", ST, "python3", "exit", 2, "job-a", create_time=2.0)
    assert [(n, p.pid, p.alive) for n, p in c.cluster.iter_processes()] == [("node0", 2, False), ("node1", 1, True)]


def test_apply_all_is_apply_for_each_event() -> None:
    one, batch = C(), C()
    events = [
        Event(T0, ST, "python3", "start", 7, "job-a", {"rank": 0}),
        Event(T0, U, "gpu-0", "90", 7, "job-a"),
        Event(T0, HW, "gpu-0", "XID_79"),
    ]
    for ev in events:
        one.cluster.apply("node0", ev)
    batch.cluster.apply_all("node0", events)
    assert one.cluster.nodes["node0"].digest() == batch.cluster.nodes["node0"].digest()
    assert one.cluster.job_nodes("job-a") == batch.cluster.job_nodes("job-a") == ["node0"]


# ====================================================================== resync
def test_replace_node_replaces_rather_than_merges() -> None:
    c = C()
    c.rank("node0", 100, "job-a", 0, ctime=1.0)
    c.rank("node1", 100, "job-a", 1, ctime=1.0)
    c.rank("node1", 200, "job-old", 0, ctime=1.0)
    c.emit("node1", HW, "gpu-5", "XID_79")
    # what node1 really holds now (its agent's graph): rank 1 of job-a and a new job-b rank
    agent = NodeGraph("node1", c.clock)
    agent.apply(Event(T0, ST, "python3", "start", 100, "job-a", {"rank": 1, "create_time": 1.0}))
    agent.apply(Event(T0, ST, "python3", "start", 300, "job-b", {"rank": 0, "create_time": 3.0}))
    fresh = c.cluster.replace_node("node1", agent.snapshot_events())
    assert c.cluster.nodes["node1"] is fresh
    assert fresh.digest() == agent.digest()
    assert sorted(fresh.processes) == [100, 300]
    assert c.cluster.find("node1", 200) is None, "gone, not merged"
    assert list(fresh.active_errors()) == []
    assert [(r.node, r.rank) for r in c.cluster.ranks("job-a")] == [("node0", 0), ("node1", 1)]
    assert c.cluster.ranks("job-old") == []
    assert c.cluster.job_nodes("job-b") == ["node1"]
    assert c.cluster.jobs() == ["job-a", "job-b"]


def test_replace_node_keeps_dead_ranks_in_their_job_on_a_fresh_aggregator() -> None:
    c = C()
    agent = NodeGraph("node1", c.clock)
    agent.apply(Event(T0, ST, "python3", "start", 100, "job-a", {"rank": 1, "create_time": 1.0}))
    agent.apply(Event(T0, HW, "gpu-1", "XID_79", 100, "job-a"))
    agent.apply(Event(T0, ST, "python3", "exit", 100, "job-a", {"create_time": 1.0, "exit_code": 1}))
    c.rank("node0", 100, "job-a", 0, ctime=1.0)
    c.cluster.replace_node("node1", agent.snapshot_events())
    ranks = c.cluster.ranks("job-a")
    assert [(r.node, r.rank, r.process.alive) for r in ranks] == [("node0", 0, True), ("node1", 1, False)]
    c.emit("node0", U, "gpu-0", "0", 100, "job-a")  # the survivor stalls: it waits on its dead peer
    exp = explain(c.cluster, Target(node="node0", pid=100))
    assert exp.root is not None
    assert (exp.root.node, exp.root.entity, exp.root.code) == ("node1", "gpu-1", "XID_79")


def test_replace_node_marks_the_node_seen() -> None:
    c = C(LivenessConfig(suspect_ms=5 * S, dead_ms=20 * S))
    c.emit("node1", U, "gpu-0", "50")
    c.clock.advance(30 * S)
    assert c.cluster.liveness("node1") is Liveness.DEAD
    c.cluster.replace_node("node1", [])
    assert c.cluster.liveness("node1") is Liveness.ALIVE


# ====================================================================== colliding pids
def colliding() -> C:
    c = C()
    c.rank("node1", 4812, "job-a", 0)
    c.rank("node3", 4812, "job-b", 0)
    c.rank("node3", 5000, "job-b", 1)
    return c


def test_a_pid_on_two_nodes_resolves_per_node() -> None:
    c = colliding()
    for node, job in (("node1", "job-a"), ("node3", "job-b")):
        got_node, proc = resolve(c.cluster, parse_target(f"{node}:4812"))
        assert (got_node, proc.pid, proc.job) == (node, 4812, job)
        assert proc is c.cluster.nodes[node].processes[4812]


def test_a_bare_pid_on_two_nodes_is_ambiguous_and_names_them() -> None:
    c = colliding()
    assert c.cluster.nodes_with_pid(4812) == ["node1", "node3"]
    with pytest.raises(TargetError) as info:
        resolve(c.cluster, parse_target("4812"))
    assert "node1" in str(info.value) and "node3" in str(info.value)
    assert "node1:4812" in str(info.value)
    with pytest.raises(TargetError):
        explain(c.cluster, parse_target("4812"))


def test_a_bare_pid_on_one_node_resolves() -> None:
    c = colliding()
    assert resolve(c.cluster, parse_target("5000"))[0] == "node3"


def test_a_tombstone_counts_for_ambiguity() -> None:
    c = colliding()
    c.emit("node1", ST, "python3", "exit", 4812, "job-a")
    assert c.cluster.nodes_with_pid(4812) == ["node1", "node3"]
    node, proc = resolve(c.cluster, Target(node="node1", pid=4812))
    assert (node, proc.alive) == ("node1", False)


def test_an_unknown_node_is_not_found() -> None:
    c = colliding()
    with pytest.raises(NotFoundError) as info:
        resolve(c.cluster, parse_target("node9:4812"))
    assert "node9" in str(info.value) and "node1, node3" in str(info.value)


def test_an_unknown_pid_is_not_found() -> None:
    c = colliding()
    with pytest.raises(NotFoundError):
        resolve(c.cluster, parse_target("node1:5000"))
    with pytest.raises(NotFoundError):
        resolve(c.cluster, parse_target("777"))


def test_find_is_per_node() -> None:
    c = colliding()
    a, b = c.cluster.find("node1", 4812), c.cluster.find("node3", 4812)
    assert a is not None and b is not None and a is not b
    assert c.cluster.find("node9", 4812) is None
