"""A small builder for scenario tests: a cluster of nodes running one job, as event lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xctl.core.clock import ManualClock
from xctl.core.cluster import ClusterGraph, LivenessConfig
from xctl.core.events import Event, EventType
from xctl.core.graph import GraphLimits

T0 = 1_732_350_000_000


@dataclass
class Scenario:
    nodes: int = 4
    ranks_per_node: int = 8
    job: str = "job-42"
    clock: ManualClock = field(default_factory=lambda: ManualClock(T0))
    cluster: ClusterGraph = field(init=False)
    t: int = T0

    def __post_init__(self) -> None:
        self.cluster = ClusterGraph(self.clock, GraphLimits(), LivenessConfig(3_000, 30_000))

    # ---- building blocks
    def node(self, i: int) -> str:
        return f"node{i}"

    def pid(self, local: int) -> int:
        return 4800 + local

    def emit(
        self,
        node: str,
        etype: EventType,
        entity: str,
        value: str,
        pid: int | None = None,
        job: str | None = None,
        **attrs: Any,
    ) -> Event:
        ev = Event(self.t, etype, entity, value, pid, job, attrs)
        self.cluster.apply(node, ev)
        return ev

    def start_job(self, *, util: float = 97.0, job: str | None = None) -> None:
        job = job or self.job
        world = self.nodes * self.ranks_per_node
        for n in range(self.nodes):
            node = self.node(n)
            for i in range(self.ranks_per_node):
                rank = n * self.ranks_per_node + i
                pid = self.pid(i)
                self.emit(
                    node,
                    EventType.PROCESS_STATE,
                    "python3",
                    "start",
                    pid,
                    job,
                    name="python3",
                    cmdline=f"python3 train.py --rank {rank}",
                    create_time=T0 / 1000 + i,
                    ppid=4700,
                    rank=rank,
                    local_rank=i,
                    world_size=world,
                )
                self.emit(node, EventType.COMPUTE_UTIL, f"gpu-{i}", str(util), pid, job)
                self.emit(node, EventType.COMPUTE_MEM, f"gpu-{i}", "78", pid, job, used_mib=64000, total_mib=81559)
                self.emit(node, EventType.TRANSPORT_BW, f"mlx5_{i}", "190.5", pid, job)

    def advance(self, ms: int) -> None:
        self.t += ms
        self.clock.advance(ms)

    def heartbeat_all(self, *, except_nodes: tuple[str, ...] = ()) -> None:
        for n in range(self.nodes):
            if self.node(n) not in except_nodes:
                self.cluster.seen(self.node(n))

    def victims(self, *, skip: tuple[str, int] | None = None, nccl: bool = True) -> None:
        """Every rank except ``skip`` stalls, then reports NCCL_TIMEOUT."""
        for n in range(self.nodes):
            for i in range(self.ranks_per_node):
                node, pid = self.node(n), self.pid(i)
                if skip == (node, pid):
                    continue
                self.emit(node, EventType.COMPUTE_UTIL, f"gpu-{i}", "0", pid, self.job)
                self.emit(node, EventType.TRANSPORT_BW, f"mlx5_{i}", "0", pid, self.job)
                if nccl:
                    self.emit(
                        node,
                        EventType.ERROR_NET,
                        self.job,
                        "NCCL_TIMEOUT",
                        pid,
                        self.job,
                        raw="NCCL WARN Timeout waiting for peer",
                    )
