"""The cluster view: one NodeGraph per node, a job index, and node liveness (DESIGN §4, §6).

Liveness runs on the receiver's clock: a node is *alive* within ``suspect_ms`` of its last
message, *suspect* until ``dead_ms``, then *dead*. A node's subgraph can be replaced
atomically from a snapshot (resync), so readers never see half a node.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from operator import attrgetter
from typing import Final

from xctl.core.clock import Clock
from xctl.core.events import Event
from xctl.core.graph import GraphLimits, NodeGraph, Process

_JOB: Final = attrgetter("job")


class Liveness(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class LivenessConfig:
    suspect_ms: int = 3_000
    dead_ms: int = 30_000


@dataclass(slots=True)
class NodeStatus:
    """What the cluster knows about a node besides its graph."""

    name: str
    first_seen: int
    last_seen: int
    epoch: str = ""
    seq: int = -1
    events: int = 0
    resyncs: int = 0
    version: str = ""
    probes: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Rank:
    """One process of a job, wherever it runs."""

    node: str
    process: Process

    @property
    def rank(self) -> int | None:
        return self.process.rank


class ClusterGraph:
    """All nodes' graphs plus the job index and liveness. One owner thread mutates it."""

    def __init__(
        self,
        clock: Clock,
        limits: GraphLimits | None = None,
        liveness: LivenessConfig | None = None,
    ) -> None:
        self.clock = clock
        self.limits = limits or GraphLimits()
        self.liveness_config = liveness or LivenessConfig()
        self.nodes: dict[str, NodeGraph] = {}
        self.status: dict[str, NodeStatus] = {}
        #: job → nodes that have (or had) processes of it; pruned lazily.
        self._job_nodes: dict[str, set[str]] = {}

    # ------------------------------------------------------------------ updates
    def graph(self, node: str) -> NodeGraph:
        graph = self.nodes.get(node)
        if graph is None:
            graph = self.nodes[node] = NodeGraph(node, self.clock, self.limits)
            self.seen(node)
        return graph

    def seen(self, node: str) -> NodeStatus:
        """Record that a message arrived from ``node`` (liveness)."""
        now = self.clock()
        status = self.status.get(node)
        if status is None:
            status = self.status[node] = NodeStatus(node, now, now)
        else:
            status.last_seen = now
        return status

    def apply(self, node: str, event: Event) -> None:
        self.graph(node).apply(event)
        status = self.seen(node)
        status.events += 1
        if event.job is not None:
            self._job_nodes.setdefault(event.job, set()).add(node)

    def apply_all(self, node: str, events: Sequence[Event]) -> None:
        """Apply a batch from ``node`` (the ingest hot path: one clock read, one job scan)."""
        graph = self.graph(node)
        status = self.seen(node)
        graph.apply_all(events)
        status.events += len(events)
        job_nodes = self._job_nodes
        jobs = set(map(_JOB, events))
        jobs.discard(None)
        for job in jobs:
            nodes = job_nodes.get(job)
            if nodes is None:
                job_nodes[job] = {node}
            else:
                nodes.add(node)

    def replace_node(self, node: str, events: Sequence[Event]) -> NodeGraph:
        """Rebuild ``node``'s subgraph from a snapshot and swap it in at once."""
        fresh = NodeGraph(node, self.clock, self.limits)
        fresh.apply_all(events)
        self.nodes[node] = fresh
        self.seen(node)
        for job in fresh.jobs:
            self._job_nodes.setdefault(job, set()).add(node)
        for proc in fresh.tombstones.values():
            # A dead rank still belongs to its job (graph.jobs only indexes live processes).
            if proc.job is not None:
                self._job_nodes.setdefault(proc.job, set()).add(node)
        return fresh

    def remove_node(self, node: str) -> None:
        self.nodes.pop(node, None)
        self.status.pop(node, None)

    def expire(self) -> None:
        now = self.clock()
        for graph in self.nodes.values():
            graph.expire(now)

    # ------------------------------------------------------------------ queries
    def liveness(self, node: str) -> Liveness:
        status = self.status.get(node)
        if status is None:
            return Liveness.DEAD
        silent = self.clock() - status.last_seen
        if silent < self.liveness_config.suspect_ms:
            return Liveness.ALIVE
        if silent < self.liveness_config.dead_ms:
            return Liveness.SUSPECT
        return Liveness.DEAD

    def find(self, node: str, pid: int) -> Process | None:
        graph = self.nodes.get(node)
        return None if graph is None else graph.find(pid)

    def nodes_with_pid(self, pid: int) -> list[str]:
        return sorted(n for n, g in self.nodes.items() if g.find(pid) is not None)

    def job_nodes(self, job: str) -> list[str]:
        nodes = self._job_nodes.get(job)
        if not nodes:
            return []
        live = {n for n in nodes if n in self.nodes and job in self.nodes[n].jobs}
        # Keep nodes whose ranks are all tombstones: a dead rank still belongs to its job.
        live |= {n for n in nodes if n in self.nodes and self._has_tombstone_of(self.nodes[n], job)}
        if live != nodes:
            self._job_nodes[job] = live
        return sorted(live)

    def ranks(self, job: str) -> list[Rank]:
        """Every process of ``job`` on every node, live ones and tombstones, by rank."""
        out: list[Rank] = []
        for node in self.job_nodes(job):
            graph = self.nodes[node]
            seen: set[int] = set()
            for pid in graph.jobs.get(job, ()):
                proc = graph.processes.get(pid)
                if proc is not None:
                    out.append(Rank(node, proc))
                    seen.add(pid)
            for proc in graph.tombstones.values():
                # (a live process of another job may have reused the pid: the dead rank stays)
                if proc.job == job and proc.pid not in seen:
                    out.append(Rank(node, proc))
        out.sort(key=lambda r: (r.rank if r.rank is not None else 1 << 30, r.node, r.process.pid))
        return out

    def jobs(self) -> list[str]:
        return sorted(j for j in list(self._job_nodes) if self.job_nodes(j))

    def iter_processes(self) -> Iterator[tuple[str, Process]]:
        for node in sorted(self.nodes):
            graph = self.nodes[node]
            for proc in graph.processes.values():
                yield node, proc
            for proc in graph.tombstones.values():
                yield node, proc

    @staticmethod
    def _has_tombstone_of(graph: NodeGraph, job: str) -> bool:
        return any(p.job == job for p in graph.tombstones.values())
