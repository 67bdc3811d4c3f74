"""``sim[:key=value,...]`` — a simulated GPU node of a multi-node training job.

For demos, docker compose and benchmarks. Several sim probes (one per agent) given the same
spec except ``index`` tell one consistent story: a fault on one node (``node=NAME``) shows
its hardware events there and *victim* symptoms (idle GPUs, zero bandwidth, then NCCL
timeouts) on every other node of the job.

Keys (all optional)::

    gpus=8  job=job-42  ranks=32  nodes=4  index=0  interval=1s  seed=0
    fault=KIND@ENTITY[:node=NAME][:after=DURATION]     (repeatable)

The core is :class:`SimNode`, a pure, clock-driven model: ``sample(now_ms)`` returns the
events due up to ``now_ms``; :class:`SimProbe` only calls it every interval. Given the same
seed and the same sample times, the output is identical.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import random
import re
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from xctl.core.errors import ProbeError
from xctl.core.events import AttrValue, Event, EventType
from xctl.probes._spec import format_duration, parse_duration, parse_int, split_pairs
from xctl.probes.base import ProbeContext

log = logging.getLogger(__name__)

#: The real H100 80GB HBM3 figure: 85520809984 bytes.
GPU_TOTAL_MIB: Final = 81559
#: What a GPU with no process holds (observed idle: 503316480 bytes).
GPU_IDLE_MIB: Final = 480
#: Host memory of the simulated node (a DGX H100 has 2 TiB).
HOST_TOTAL_MIB: Final = 2_063_937
RANK_PID_BASE: Final = 4800
LAUNCHER_PID: Final = 4700
LOADER_PID: Final = 4900
#: Delays of the consequences of a fault, in ms after the fault.
VICTIM_DELAY_MS: Final = 2000
NCCL_TIMEOUT_DELAY_MS: Final = 5000
SLOW_PEER_DELAY_MS: Final = 1000
FOLLOW_UP_MS: Final = 1000

#: Bus numbers of the eight GPUs of a DGX H100.
_DGX_BUSES: Final = ("18", "2a", "3a", "5d", "9a", "ab", "ba", "db")

#: KIND → what its entity names.
FAULT_KINDS: Final[dict[str, str]] = {
    "xid79": "gpu",
    "xid48": "gpu",
    "xid13": "gpu",
    "xid31": "gpu",
    "nvlink_down": "gpu",
    "thermal": "gpu",
    "pcie_x4": "gpu",
    "link_flap": "nic",
    "hang": "rank",
    "oom": "rank",
}
#: Faults that stall the whole job (its other ranks become victims and time out).
FATAL_KINDS: Final = frozenset({"xid79", "xid48", "xid13", "xid31", "hang", "oom", "link_flap", "nvlink_down"})
#: Faults that make one rank a straggler (its peers idle at the collective; no timeout).
SLOWING_KINDS: Final = frozenset({"thermal", "pcie_x4"})

_ENTITY_RE: Final = {
    "gpu": re.compile(r"^gpu-(\d+)$"),
    "nic": re.compile(r"^mlx5_(\d+)$"),
    "rank": re.compile(r"^rank-(\d+)$"),
}
_ENTITY_EXAMPLE: Final = {"gpu": "gpu-3", "nic": "mlx5_3", "rank": "rank-9"}
_KEYS: Final = ("gpus", "job", "ranks", "nodes", "index", "interval", "seed", "fault")
_JOB_RE: Final = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")

_XID_TEXT: Final = {
    13: "Graphics SM Warp Exception on (GPC 1, TPC 2, SM 0): Out Of Range Address",
    # The real line observed on an H100 (fixtures/h100-observed.md).
    31: (
        "channel 0x0000000a, intr 00000000. MMU Fault: ENGINE GRAPHICS GPC1 GPCCLIENT_T1_8 faulted @ "
        "0x831a_91e00000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_WRITE"
    ),
    48: (
        "An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer at "
        "partition 0, subpartition 0."
    ),
    63: "Row Remapper: New row marked for remapping, reset gpu to activate.",
    74: "NVLink: fatal error detected on link 0(0x10000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)",
    79: "GPU has fallen off the bus.",
}


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted fault: ``KIND@ENTITY[:node=NAME][:after=DURATION]``."""

    kind: str
    entity: str
    number: int
    node: str | None = None
    after_s: float = 0.0

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL_KINDS

    def __str__(self) -> str:
        text = f"{self.kind}@{self.entity}"
        if self.node is not None:
            text += f" on {self.node}"
        return text + f" after {format_duration(self.after_s)}"


@dataclass(frozen=True, slots=True)
class SimConfig:
    gpus: int = 8
    job: str = "job-42"
    ranks: int = 32
    nodes: int = 4
    index: int = 0
    interval_s: float = 1.0
    seed: int = 0
    faults: tuple[Fault, ...] = ()

    @property
    def ranks_per_node(self) -> int:
        return min(self.ranks // self.nodes, self.gpus)

    @property
    def first_rank(self) -> int:
        return self.index * self.ranks_per_node

    @property
    def local_ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.ranks_per_node)

    def describe(self) -> str:
        rpn = self.ranks_per_node
        first, last = self.first_rank, self.first_rank + rpn - 1
        ranks = f"rank {first}" if rpn == 1 else f"ranks {first}\u2013{last}"
        faults = "; ".join(str(f) for f in self.faults) or "none"
        return (
            f"simulated node: {self.gpus} GPUs, {ranks} of {self.job} ({self.ranks}), "
            f"node {self.index + 1} of {self.nodes}, every {format_duration(self.interval_s)}, faults: {faults}"
        )


def parse_sim_spec(arg: str | None) -> SimConfig:
    """``gpus=8,job=job-42,fault=xid79@gpu-3:node=node-2:after=10s`` → :class:`SimConfig`."""
    values: dict[str, str] = {}
    fault_texts: list[str] = []
    for key, value in split_pairs(arg or "", what="sim"):
        if key not in _KEYS:
            raise ProbeError(f"sim: unknown key {key!r}: use one of {', '.join(_KEYS)}")
        if key == "fault":
            fault_texts.append(value)
        elif key in values:
            raise ProbeError(f"sim: {key} given twice: give each key once (only fault= repeats)")
        else:
            values[key] = value
    gpus = parse_int(values.get("gpus", "8"), what="sim: gpus", example="gpus=8", minimum=1, maximum=64)
    ranks = parse_int(values.get("ranks", "32"), what="sim: ranks", example="ranks=32", minimum=1, maximum=1 << 20)
    nodes = parse_int(values.get("nodes", "4"), what="sim: nodes", example="nodes=4", minimum=1, maximum=1 << 16)
    if ranks < nodes:
        raise ProbeError(f"sim: ranks={ranks} is fewer than nodes={nodes}: give at least one rank per node")
    index = parse_int(values.get("index", "0"), what="sim: index", example="index=0", minimum=0, maximum=nodes - 1)
    seed = parse_int(values.get("seed", "0"), what="sim: seed", example="seed=0", minimum=0, maximum=2**31)
    interval = parse_duration(values.get("interval", "1s"), what="sim: interval")
    if not 0.01 <= interval <= 3600:
        raise ProbeError(f"sim: interval={values['interval']} is out of range: give 10ms to 1h, e.g. interval=1s")
    job = values.get("job", "job-42")
    if not _JOB_RE.match(job):
        raise ProbeError(f"sim: job={job!r} is not a job id: use letters, digits and -_.:/ e.g. job=job-42")
    config = SimConfig(gpus=gpus, job=job, ranks=ranks, nodes=nodes, index=index, interval_s=interval, seed=seed)
    faults = tuple(_parse_fault(text, config) for text in fault_texts)
    return SimConfig(gpus, job, ranks, nodes, index, interval, seed, faults)


def _parse_fault(text: str, config: SimConfig) -> Fault:
    what = f"sim: fault={text!r}"
    head, *options = text.split(":")
    kind, at, entity = head.partition("@")
    kind = kind.strip().lower()
    entity = entity.strip()
    if not at or not kind or not entity:
        raise ProbeError(f"{what}: write KIND@ENTITY[:node=NAME][:after=DURATION], e.g. fault=xid79@gpu-3:after=10s")
    if kind not in FAULT_KINDS:
        raise ProbeError(f"{what}: unknown kind {kind!r}: use one of {', '.join(FAULT_KINDS)}")
    target = FAULT_KINDS[kind]
    match = _ENTITY_RE[target].match(entity)
    if match is None:
        raise ProbeError(f"{what}: {kind} needs a {target} entity like {_ENTITY_EXAMPLE[target]}, not {entity!r}")
    number = int(match.group(1))
    rpn_total = config.nodes * config.ranks_per_node
    if target in ("gpu", "nic") and number >= config.gpus:
        first = "gpu-0" if target == "gpu" else "mlx5_0"
        last = f"gpu-{config.gpus - 1}" if target == "gpu" else f"mlx5_{config.gpus - 1}"
        raise ProbeError(f"{what}: {entity} does not exist with gpus={config.gpus}: use {first} to {last}")
    if target == "rank" and number >= rpn_total:
        raise ProbeError(
            f"{what}: {entity} does not exist: the simulated job has ranks 0 to {rpn_total - 1} "
            f"({config.ranks_per_node} per node on {config.nodes} nodes)"
        )
    if kind == "nvlink_down" and config.gpus < 2:
        raise ProbeError(f"{what}: nvlink_down needs a peer GPU: give gpus=2 or more")
    node: str | None = None
    after = 0.0
    for option in options:
        key, eq, value = option.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if key == "node" and eq and value:
            node = value
        elif key == "after" and eq:
            after = parse_duration(value, what=f"{what}: after")
        else:
            raise ProbeError(f"{what}: unknown option {option!r}: use :node=NAME and/or :after=DURATION")
    return Fault(kind=kind, entity=entity, number=number, node=node, after_s=after)


# -- the model ----------------------------------------------------------------------------


class Cond(IntEnum):
    """What a rank is doing; the most severe active condition wins."""

    HEALTHY = 0
    SLOW_PEER = 1  # idles at the collective, waiting for a straggler
    STRAGGLER = 2  # the slow one: busy, everyone waits for it
    NVLINK_SLOW = 3  # its NVLink is down; crawls over the fallback path
    VICTIM = 4  # the job is stuck because of someone else
    IO_WAIT = 5  # its NIC flapped; stalled on the network
    HUNG = 6  # no progress (application hang)
    LOST = 7  # its GPU fell off the bus
    DEAD = 8  # exited / OOM-killed


_UTIL_RANGE: Final[dict[Cond, tuple[float, float]]] = {
    Cond.SLOW_PEER: (5.0, 15.0),
    Cond.STRAGGLER: (98.0, 100.0),
    Cond.NVLINK_SLOW: (25.0, 45.0),
    Cond.IO_WAIT: (0.0, 2.0),
    Cond.VICTIM: (0.0, 0.0),
    Cond.HUNG: (0.0, 0.0),
}


@dataclass(slots=True)
class _Rank:
    rank: int
    local: int
    pid: int
    mem_mib: float
    bw_base: float
    util: float = 97.0
    effects: list[tuple[int, Cond]] = field(default_factory=list)
    nccl_due: int | None = None

    def cond(self, now_ms: int) -> Cond:
        return max((c for at, c in self.effects if at <= now_ms), default=Cond.HEALTHY)


class SimNode:
    """The clock-driven model of one simulated node. No threads, no I/O."""

    def __init__(self, config: SimConfig, node: str, start_ms: int) -> None:
        self.config = config
        self.node = node
        self.start_ms = start_ms
        self._rng = random.Random(config.seed + config.index)
        self._create_time = start_ms / 1000
        self._pending: list[tuple[int, int, Event]] = []
        self._seq = 0
        self._gpu_lost: dict[int, int] = {}
        self._thermal: dict[int, int] = {}
        self._loader_oom_at: int | None = None
        self._loader_pct = 30.0
        self._ranks = [
            _Rank(
                rank=r,
                local=i,
                pid=RANK_PID_BASE + i,
                mem_mib=self._rng.uniform(61_000, 69_000),
                bw_base=self._rng.uniform(184.0, 191.0),
            )
            for i, r in enumerate(config.local_ranks)
        ]
        self._uuids = [_uuid(config.seed, node, i) for i in range(config.gpus)]
        self._buses = [_bus(i) for i in range(config.gpus)]
        for rank in self._ranks:
            self._at(start_ms, self._proc(rank, "start", start_ms))
        for fault in config.faults:
            self._schedule(fault)

    # -- public ---------------------------------------------------------------------------

    @property
    def ranks(self) -> list[int]:
        return [r.rank for r in self._ranks]

    def pid_of(self, rank: int) -> int:
        for r in self._ranks:
            if r.rank == rank:
                return r.pid
        raise KeyError(rank)

    def is_local(self, fault: Fault) -> bool:
        """Whether ``fault`` happens on this node (otherwise this node only sees its effects)."""
        if fault.node is not None and fault.node != self.node:
            return False
        if FAULT_KINDS[fault.kind] == "rank":
            return fault.number in self.config.local_ranks
        return True

    def sample(self, now_ms: int) -> list[Event]:
        """Everything due up to ``now_ms``: scheduled events (at their own time), then metrics."""
        out: list[Event] = []
        while self._pending and self._pending[0][0] <= now_ms:
            out.append(heapq.heappop(self._pending)[2])
        for rank in self._ranks:
            due = rank.nccl_due
            if due is not None and due <= now_ms:
                rank.nccl_due = None
                if rank.cond(due) == Cond.VICTIM:
                    out.append(self._nccl_timeout(rank, due))
        out.extend(self._metrics(now_ms))
        return out

    # -- scheduling -----------------------------------------------------------------------

    def _at(self, ts: int, event: Event) -> None:
        heapq.heappush(self._pending, (ts, self._seq, event))
        self._seq += 1

    def _hit_rank(self, fault: Fault) -> _Rank | None:
        """The local rank the fault strikes directly, if it is local and strikes one."""
        if not self.is_local(fault):
            return None
        kind = FAULT_KINDS[fault.kind]
        for rank in self._ranks:
            if (rank.rank if kind == "rank" else rank.local) == fault.number:
                return rank
        return None

    def _hits_job(self, fault: Fault) -> bool:
        """Whether the fault strikes a rank of the job (on whichever node it happens)."""
        if FAULT_KINDS[fault.kind] == "rank":
            return True
        return fault.number < self.config.ranks_per_node

    def _schedule(self, fault: Fault) -> None:
        t = self.start_ms + round(fault.after_s * 1000)
        if (
            fault.node is not None
            and fault.node == self.node
            and FAULT_KINDS[fault.kind] == "rank"
            and not self.is_local(fault)
        ):
            log.warning(
                "sim: %s names node %s, but %s is not one of its ranks (%s); check index=",
                fault,
                self.node,
                fault.entity,
                self.config.describe(),
            )
        hit = self._hit_rank(fault)
        if self.is_local(fault):
            self._local_events(fault, t, hit)
        if not self._hits_job(fault):
            return
        for rank in self._ranks:
            if rank is hit:
                continue
            if fault.fatal:
                rank.effects.append((t + VICTIM_DELAY_MS, Cond.VICTIM))
                due = t + NCCL_TIMEOUT_DELAY_MS
                rank.nccl_due = due if rank.nccl_due is None else min(rank.nccl_due, due)
            else:
                rank.effects.append((t + SLOW_PEER_DELAY_MS, Cond.SLOW_PEER))

    def _local_events(self, fault: Fault, t: int, hit: _Rank | None) -> None:
        kind, n = fault.kind, fault.number
        pid = hit.pid if hit is not None else None
        job = self.config.job if hit is not None else None
        if kind.startswith("xid"):
            xid = int(kind[3:])
            self._at(t, self._xid(n, xid, t, pid, job))
            if kind == "xid79":
                self._gpu_lost[n] = min(t, self._gpu_lost.get(n, t))
                if hit is not None:
                    hit.effects.append((t, Cond.LOST))
                    self._at(t, self._proc(hit, "hung", t))
            else:
                if hit is not None:
                    hit.effects.append((t, Cond.DEAD))
                    self._at(t, self._proc(hit, "exit", t, exit_code=1))
                if xid == 48:
                    self._at(t + FOLLOW_UP_MS, self._xid(n, 63, t + FOLLOW_UP_MS, pid, job))
        elif kind == "nvlink_down":
            self._at(
                t,
                Event(t, EventType.TOPO_LINK_DOWN, f"gpu-{n}/nvlink-0", "NVLINK_DOWN", attrs={"link": 0}),
            )
            peer = (n + 1) % self.config.gpus
            self._at(t + FOLLOW_UP_MS, self._xid(peer, 74, t + FOLLOW_UP_MS, None, None))
            if hit is not None:
                hit.effects.append((t, Cond.NVLINK_SLOW))
        elif kind == "thermal":
            self._thermal[n] = min(t, self._thermal.get(n, t))
            if hit is not None:
                hit.effects.append((t, Cond.STRAGGLER))
        elif kind == "pcie_x4":
            attrs: dict[str, AttrValue] = {"width": 4, "max_width": 16, "gen": 5, "max_gen": 5}
            attrs["pci_bus_id"] = self._pci(n)
            self._at(t, Event(t, EventType.TOPO_LINK_DOWN, f"gpu-{n}/pcie", "PCIE_DEGRADED", attrs=attrs))
            if hit is not None:
                hit.effects.append((t, Cond.STRAGGLER))
        elif kind == "link_flap":
            self._at(t, Event(t, EventType.ERROR_NET, f"mlx5_{n}", "LINK_FLAP", attrs={"count": 1}))
            if hit is not None:
                hit.effects.append((t, Cond.IO_WAIT))
        elif kind == "hang":
            if hit is not None:
                hit.effects.append((t, Cond.HUNG))
                self._at(t, self._proc(hit, "hung", t))
        elif kind == "oom" and hit is not None:
            if self._loader_oom_at is None:
                self._at(self.start_ms, self._loader_start())
            self._loader_oom_at = min(t, self._loader_oom_at or t)
            hit.effects.append((t, Cond.DEAD))
            self._at(t, self._proc(hit, "oom_killed", t, exit_code=137))

    # -- event builders -------------------------------------------------------------------

    def _pci(self, gpu: int) -> str:
        return f"00000000:{self._buses[gpu]}:00.0"

    def _proc(self, rank: _Rank, state: str, ts: int, exit_code: int | None = None) -> Event:
        attrs: dict[str, AttrValue] = {
            "name": "python3",
            "cmdline": f"python3 train.py --rank {rank.rank}",
            "create_time": self._create_time,
            "ppid": LAUNCHER_PID,
            "rank": rank.rank,
            "local_rank": rank.local,
            "world_size": self.config.ranks,
            "gpu": f"gpu-{rank.local}",
        }
        if exit_code is not None:
            attrs["exit_code"] = exit_code
        return Event(ts, EventType.PROCESS_STATE, "python3", state, pid=rank.pid, job=self.config.job, attrs=attrs)

    def _loader_start(self) -> Event:
        attrs: dict[str, AttrValue] = {
            "name": "data_loader",
            "cmdline": "python3 -m data_loader --workers 16 --prefetch 64",
            "create_time": self._create_time,
            "ppid": LAUNCHER_PID,
        }
        return Event(
            self.start_ms,
            EventType.PROCESS_STATE,
            "data_loader",
            "start",
            pid=LOADER_PID,
            job=self.config.job,
            attrs=attrs,
        )

    def _xid(self, gpu: int, xid: int, ts: int, pid: int | None, job: str | None) -> Event:
        if pid is None or xid in (74, 79):
            who = "pid='<unknown>', name=<unknown>"
        else:
            who = f"pid={pid}, name=python3"
        raw = f"NVRM: Xid (PCI:0000:{self._buses[gpu]}:00): {xid}, {who}, {_XID_TEXT[xid]}"
        attrs: dict[str, AttrValue] = {"xid": xid, "pci_bus_id": self._pci(gpu), "raw": raw}
        return Event(ts, EventType.ERROR_HW, f"gpu-{gpu}", f"XID_{xid}", pid=pid, job=job, attrs=attrs)

    def _nccl_timeout(self, rank: _Rank, ts: int) -> Event:
        raw = (
            f"{self.node}:{rank.pid}:{rank.pid + 211} [{rank.local}] NCCL WARN Timeout: rank {rank.rank} "
            f"waited 600000 ms for ALLREDUCE (SeqNum=48211) to complete; watchdog aborting communicator"
        )
        attrs: dict[str, AttrValue] = {"rank": rank.rank, "raw": raw}
        return Event(
            ts, EventType.ERROR_NET, self.config.job, "NCCL_TIMEOUT", pid=rank.pid, job=self.config.job, attrs=attrs
        )

    # -- periodic samples -----------------------------------------------------------------

    def _metrics(self, now: int) -> list[Event]:
        cfg = self.config
        rng = self._rng
        out: list[Event] = []
        by_gpu = {r.local: r for r in self._ranks}
        for gpu in range(cfg.gpus):
            lost = self._gpu_lost.get(gpu)
            if lost is not None and lost <= now:
                continue
            entity = f"gpu-{gpu}"
            ids: dict[str, AttrValue] = {"uuid": self._uuids[gpu], "pci_bus_id": self._pci(gpu)}
            rank = by_gpu.get(gpu)
            cond = rank.cond(now) if rank is not None else Cond.DEAD
            util, used = 0, float(GPU_IDLE_MIB)
            if rank is not None and cond < Cond.LOST:
                util = self._util(rank, cond)
                rank.mem_mib = min(69_500.0, max(60_500.0, rank.mem_mib + rng.gauss(0, 40)))
                proc_mib = round(rank.mem_mib)
                used += proc_mib
                out.append(Event(now, EventType.COMPUTE_UTIL, entity, str(util), pid=rank.pid, job=cfg.job))
                out.append(
                    Event(
                        now,
                        EventType.COMPUTE_MEM,
                        entity,
                        _pct(proc_mib, GPU_TOTAL_MIB),
                        pid=rank.pid,
                        job=cfg.job,
                        attrs={"used_mib": proc_mib, "total_mib": GPU_TOTAL_MIB},
                    )
                )
            used_mib = round(used)
            out.append(Event(now, EventType.COMPUTE_UTIL, entity, str(util), attrs=dict(ids)))
            mem_attrs: dict[str, AttrValue] = {"used_mib": used_mib, "total_mib": GPU_TOTAL_MIB, **ids}
            out.append(Event(now, EventType.COMPUTE_MEM, entity, _pct(used_mib, GPU_TOTAL_MIB), attrs=mem_attrs))
            since = self._thermal.get(gpu)
            if since is not None and since <= now:
                temp = 91 + rng.randint(0, 2)
                attrs: dict[str, AttrValue] = {"temp_c": temp, "pci_bus_id": self._pci(gpu)}
                out.append(Event(now, EventType.ERROR_HW, entity, "CLOCK_EVENT_HW_THERMAL", attrs=attrs))
        for rank in self._ranks:
            cond = rank.cond(now)
            if cond >= Cond.HUNG:
                continue
            if cond == Cond.VICTIM:
                value = "0"
            elif cond == Cond.IO_WAIT:
                value = "IO_WAIT"
            else:
                value = f"{min(195.0, max(180.0, rank.bw_base + rng.gauss(0, 1.5))):.2f}"
            out.append(Event(now, EventType.TRANSPORT_BW, f"mlx5_{rank.local}", value, pid=rank.pid, job=cfg.job))
        out.extend(self._sysmem(now))
        return out

    def _util(self, rank: _Rank, cond: Cond) -> int:
        rng = self._rng
        if cond == Cond.HEALTHY:
            # A noisy series around 97 that pulls back towards it (AR(1)).
            rank.util = min(100.0, max(92.0, 97.0 + 0.6 * (rank.util - 97.0) + rng.gauss(0, 1.6)))
            return round(rank.util)
        low, high = _UTIL_RANGE[cond]
        return round(rng.uniform(low, high)) if high > low else round(low)

    def _sysmem(self, now: int) -> list[Event]:
        oom_at = self._loader_oom_at
        if oom_at is None:
            return []
        ramp = 1.0 if oom_at <= self.start_ms else min(1.0, (now - self.start_ms) / (oom_at - self.start_ms))
        self._loader_pct = 30.0 + 40.0 * ramp + self._rng.uniform(-0.4, 0.4)
        loader_mib = round(HOST_TOTAL_MIB * self._loader_pct / 100)
        # The ranks together hold ~27 % of host memory, the OS ~2 %: ~99 % just before the kill.
        alive = sum(1 for r in self._ranks if r.cond(now) < Cond.DEAD) / max(1, len(self._ranks))
        host_mib = min(HOST_TOTAL_MIB, loader_mib + round(HOST_TOTAL_MIB * (0.27 * alive + 0.02)))
        job = self.config.job
        return [
            Event(
                now,
                EventType.COMPUTE_MEM,
                "sysmem",
                _pct(loader_mib, HOST_TOTAL_MIB),
                pid=LOADER_PID,
                job=job,
                attrs={"used_mib": loader_mib, "total_mib": HOST_TOTAL_MIB},
            ),
            Event(
                now,
                EventType.COMPUTE_MEM,
                "sysmem",
                _pct(host_mib, HOST_TOTAL_MIB),
                attrs={"used_mib": host_mib, "total_mib": HOST_TOTAL_MIB},
            ),
        ]


def _pct(used: float, total: float) -> str:
    return f"{100.0 * used / total:.1f}"


def _uuid(seed: int, node: str, gpu: int) -> str:
    h = hashlib.sha256(f"xctl-sim/{seed}/{node}/{gpu}".encode()).hexdigest()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _bus(gpu: int) -> str:
    return _DGX_BUSES[gpu] if gpu < len(_DGX_BUSES) else f"{0x60 + gpu - len(_DGX_BUSES):02x}"


# -- the probe ----------------------------------------------------------------------------


class SimProbe:
    """Runs a :class:`SimNode` in real time, sampling every ``interval``."""

    name = "sim"

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.heartbeat_s: float | None = max(10.0, 5 * self.config.interval_s)

    @classmethod
    def from_spec(cls, arg: str | None) -> SimProbe:
        return cls(parse_sim_spec(arg))

    def describe(self) -> str:
        return self.config.describe()

    def run(self, ctx: ProbeContext) -> None:
        start = ctx.clock()
        sim = SimNode(self.config, ctx.node, start)
        log.info("sim on %s: %s", ctx.node, self.config.describe())
        interval_ms = max(1, round(self.config.interval_s * 1000))
        next_ms = start
        while True:
            now = ctx.clock()
            started = time.perf_counter()
            for event in sim.sample(now):
                ctx.emit(event)
            ctx.cycle(time.perf_counter() - started)
            ctx.beat()
            next_ms += interval_ms
            if next_ms <= now:  # fell behind: skip the missed ticks rather than burst
                next_ms = now + interval_ms
            if ctx.stop.wait((next_ms - now) / 1000):
                return
