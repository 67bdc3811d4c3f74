"""The storage probe: block device IOPS, latency, utilisation and queue depth from ``/proc/diskstats``.

Per whole disk (partitions, loop, ram/zram, sr and fd devices are ignored unless
``include_all``), every sample after the first:

- ``storage.iops`` value = completed reads+writes per second (1 decimal); attrs read_iops,
  write_iops, await_ms (mean time per completed I/O over the interval), util (percent of the
  interval the device was busy), interval_s, and controller (``nvme0`` for ``nvme0n1``) so the
  graph can join kernel NVMe errors, which name the controller.
- ``storage.qdepth`` value = I/Os in flight now; attrs avg_qdepth (mean over the interval).

Partitions are recognised by ``<sys>/class/block/NAME/partition``; without sysfs, by name.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from xctl.core.events import AttrValue, Event, EventType
from xctl.probes.base import ProbeContext, run_every
from xctl.probes.procfs import spec_args, spec_bool, spec_interval

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S: Final = 5.0
IGNORED_DEVICES: Final = re.compile(r"(?:loop|ram|zram|sr|fd)\d+")
_PARTITION_NAME: Final = re.compile(
    r"(?:nvme\d+(?:c\d+)?n\d+p\d+|mmcblk\d+p\d+|(?:sd|vd|xvd|hd)[a-z]+\d+|md\d+p\d+|nbd\d+p\d+)"
)
_NVME_NS: Final = re.compile(r"(nvme\d+)(?:c\d+)?n\d+")


def _noop_bad(reason: str) -> None:
    del reason


@dataclass(frozen=True, slots=True)
class DiskStat:
    """The ``/proc/diskstats`` fields this probe uses."""

    name: str
    reads: int
    read_ms: int
    writes: int
    write_ms: int
    in_flight: int
    io_ms: int
    weighted_ms: int


def parse_diskstats(text: str, bad: Callable[[str], None] = _noop_bad) -> dict[str, DiskStat]:
    """``/proc/diskstats`` → {device: DiskStat}. Malformed lines are skipped and counted."""
    out: dict[str, DiskStat] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 14 or not all(p.isdigit() for p in parts[3:14]):
            bad("diskstats_malformed")
            continue
        v = [int(p) for p in parts[3:14]]
        # reads, reads merged, sectors read, ms reading, writes, merged, sectors, ms writing,
        # in flight, ms doing I/O, weighted ms doing I/O
        out[parts[2]] = DiskStat(parts[2], v[0], v[3], v[4], v[7], v[8], v[9], v[10])
    return out


def looks_like_partition(name: str) -> bool:
    """Name-based guess, used only when sysfs cannot say."""
    return bool(_PARTITION_NAME.fullmatch(name))


def controller_of(name: str) -> str | None:
    m = _NVME_NS.fullmatch(name)
    return m.group(1) if m else None


def disk_events(
    prev: Mapping[str, DiskStat],
    cur: Mapping[str, DiskStat],
    dt_s: float,
    now_ms: int,
    include: Callable[[str], bool] = lambda name: True,
) -> list[Event]:
    """storage.iops and storage.qdepth for every included device seen in both samples."""
    events: list[Event] = []
    if dt_s <= 0:
        return events
    interval = round(dt_s, 3)
    for name in sorted(cur):
        before, after = prev.get(name), cur[name]
        if before is None or not include(name):
            continue
        reads, writes = after.reads - before.reads, after.writes - before.writes
        busy_ms = after.read_ms - before.read_ms + after.write_ms - before.write_ms
        io_ms, weighted = after.io_ms - before.io_ms, after.weighted_ms - before.weighted_ms
        if min(reads, writes, io_ms, weighted) < 0:
            continue  # counters reset (device re-created) or wrapped: re-base silently
        ops = reads + writes
        iops_attrs: dict[str, AttrValue] = {
            "read_iops": round(reads / dt_s, 1),
            "write_iops": round(writes / dt_s, 1),
            "await_ms": round(busy_ms / ops, 2) if ops and busy_ms >= 0 else 0.0,
            "util": round(min(100.0, io_ms / (dt_s * 1000) * 100), 1),
            "interval_s": interval,
        }
        controller = controller_of(name)
        if controller:
            iops_attrs["controller"] = controller
        events.append(
            Event(now_ms, EventType.STORAGE_IOPS, name, f"{ops / dt_s:.1f}", attrs=MappingProxyType(iops_attrs))
        )
        q_attrs: dict[str, AttrValue] = {"avg_qdepth": round(weighted / (dt_s * 1000), 2), "interval_s": interval}
        events.append(
            Event(now_ms, EventType.STORAGE_QDEPTH, name, str(after.in_flight), attrs=MappingProxyType(q_attrs))
        )
    return events


class StorageProbe:
    """Samples ``<proc>/diskstats`` every ``interval_s``; see the module doc."""

    name = "storage"

    def __init__(
        self,
        proc_root: str = "/proc",
        sys_root: str = "/sys",
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        include_all: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc_root = proc_root
        self.sys_root = sys_root
        self.interval_s = interval_s
        self.heartbeat_s: float | None = 3 * interval_s + 5.0
        self.include_all = include_all
        self.monotonic = monotonic
        self._prev: dict[str, DiskStat] = {}
        self._prev_t: float | None = None
        self._partition: dict[str, bool] = {}
        self._devices: list[str] = []
        self._problem: str | None = None

    @classmethod
    def from_spec(cls, arg: str | None) -> StorageProbe:
        args = spec_args(arg, ("interval", "root", "sys", "all"), "storage")
        return cls(
            args.get("root", "/proc"),
            args.get("sys", "/sys"),
            spec_interval(args, DEFAULT_INTERVAL_S, "storage"),
            include_all=spec_bool(args, "all", False, "storage"),
        )

    def describe(self) -> str:
        if self._problem:
            return f"storage: {self._problem}"
        devices = ", ".join(self._devices[:8]) + (" …" if len(self._devices) > 8 else "")
        return f"storage: {self.proc_root}/diskstats every {self.interval_s:g}s ({devices or 'no devices yet'})"

    def run(self, ctx: ProbeContext) -> None:
        run_every(ctx, self.interval_s, self.sample)

    def is_partition(self, name: str) -> bool:
        cached = self._partition.get(name)
        if cached is not None:
            return cached
        block = os.path.join(self.sys_root, "class", "block", name)
        if os.path.isdir(block):
            result = os.path.exists(os.path.join(block, "partition"))
        else:
            result = looks_like_partition(name)
        if len(self._partition) > 4096:
            self._partition.clear()
        self._partition[name] = result
        return result

    def include(self, name: str) -> bool:
        if self.include_all:
            return True
        return not IGNORED_DEVICES.fullmatch(name) and not self.is_partition(name)

    def sample(self, now_ms: int, bad: Callable[[str], None] = _noop_bad) -> list[Event]:
        try:
            with open(os.path.join(self.proc_root, "diskstats"), encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError as exc:
            self._problem = f"{self.proc_root}/diskstats not readable ({(exc.strerror or str(exc)).lower()})"
            return []
        self._problem = None
        t = self.monotonic()
        dt = t - self._prev_t if self._prev_t is not None else 0.0
        cur = parse_diskstats(text, bad)
        events = disk_events(self._prev, cur, dt, now_ms, self.include)
        self._prev, self._prev_t = cur, t
        self._devices = sorted(n for n in cur if self.include(n))
        return events
