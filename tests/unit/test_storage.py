"""The storage probe against tests/fixtures/proc/diskstats and tests/fixtures/sys/class/block."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from xctl.core.errors import ProbeError
from xctl.core.events import EventType
from xctl.probes.storage import (
    DiskStat,
    StorageProbe,
    controller_of,
    disk_events,
    looks_like_partition,
    parse_diskstats,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NOW = 1_732_350_600_000


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    shutil.copy(FIXTURES / "proc" / "diskstats", proc / "diskstats")
    shutil.copytree(FIXTURES / "sys", sys)
    return proc, sys


def bump(proc: Path, device: str, **deltas: int) -> None:
    # /proc/diskstats columns after major, minor, name
    cols = {"reads": 0, "read_ms": 3, "writes": 4, "write_ms": 7, "in_flight": 8, "io_ms": 9, "weighted_ms": 10}
    path = proc / "diskstats"
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[2] == device:
            for key, delta in deltas.items():
                i = 3 + cols[key]
                parts[i] = str(int(parts[i]) + delta) if key != "in_flight" else str(delta)
            out.append(" ".join(parts))
        else:
            out.append(line)
    path.write_text("\n".join(out) + "\n")


def test_parse_diskstats_fixture() -> None:
    stats = parse_diskstats((FIXTURES / "proc" / "diskstats").read_text())
    assert set(stats) == {"nvme0n1", "nvme0n1p1", "nvme0n1p2", "sda", "sda1", "loop0", "zram0", "dm-0"}
    assert stats["nvme0n1"] == DiskStat("nvme0n1", 8510, 4891, 1352, 1802, 0, 2264, 7503)


def test_parse_diskstats_malformed_and_empty() -> None:
    bad: list[str] = []
    assert parse_diskstats("", bad.append) == {}
    assert parse_diskstats("\n\n", bad.append) == {}
    stats = parse_diskstats(" 259 0 nvme0n1 1 2 3\n 8 0 sda 1 2 3 4 5 6 7 8 x 10 11\ngarbage\n", bad.append)
    assert stats == {} and bad == ["diskstats_malformed"] * 3


def test_names() -> None:
    assert all(looks_like_partition(n) for n in ("nvme0n1p1", "sda1", "vdb2", "mmcblk0p1", "xvda1"))
    assert not any(looks_like_partition(n) for n in ("nvme0n1", "sda", "dm-0", "md0", "loop0"))
    assert controller_of("nvme0n1") == "nvme0" and controller_of("nvme1c2n1") == "nvme1"
    assert controller_of("sda") is None and controller_of("nvme0n1p1") is None


def test_disk_events_math() -> None:
    prev = {"nvme0n1": DiskStat("nvme0n1", 1000, 500, 2000, 1000, 0, 10_000, 20_000)}
    # 2 s: 400 reads taking 800 ms, 600 writes taking 1200 ms; busy 1500 ms; 4 in flight now
    cur = {"nvme0n1": DiskStat("nvme0n1", 1400, 1300, 2600, 2200, 4, 11_500, 26_000)}
    events = disk_events(prev, cur, 2.0, NOW)
    iops = next(e for e in events if e.type is EventType.STORAGE_IOPS)
    q = next(e for e in events if e.type is EventType.STORAGE_QDEPTH)
    assert (iops.entity, iops.value, iops.ts) == ("nvme0n1", "500.0", NOW)
    a = iops.attrs
    assert (a["read_iops"], a["write_iops"], a["await_ms"], a["util"]) == (200.0, 300.0, 2.0, 75.0)
    assert a["controller"] == "nvme0"
    assert (q.value, q.attrs["avg_qdepth"]) == ("4", 3.0)
    assert disk_events(cur, prev, 2.0, NOW) == []  # counters went backwards: re-base silently


def test_reader_skips_partitions_loop_and_ram(roots: tuple[Path, Path]) -> None:
    proc, sys = roots
    clock = Clock()
    probe = StorageProbe(str(proc), str(sys), 5.0, monotonic=clock)
    assert probe.sample(NOW) == []
    bump(proc, "nvme0n1", reads=500, read_ms=250, writes=500, write_ms=750, io_ms=2500, in_flight=7)
    bump(proc, "loop0", reads=10)
    clock.t += 5
    events = probe.sample(NOW + 5000)
    assert sorted({e.entity for e in events}) == ["dm-0", "nvme0n1", "sda"]
    iops = {e.entity: e for e in events if e.type is EventType.STORAGE_IOPS}
    assert iops["nvme0n1"].value == "200.0" and iops["nvme0n1"].attrs["await_ms"] == 1.0
    assert iops["nvme0n1"].attrs["util"] == 50.0 and iops["sda"].value == "0.0"
    assert {e.entity: e.value for e in events if e.type is EventType.STORAGE_QDEPTH}["nvme0n1"] == "7"
    assert "nvme0n1" in probe.describe() and "loop0" not in probe.describe()


def test_without_sysfs_partitions_are_guessed_by_name(roots: tuple[Path, Path], tmp_path: Path) -> None:
    proc, _ = roots
    clock = Clock()
    probe = StorageProbe(str(proc), str(tmp_path / "no-sys"), monotonic=clock)
    probe.sample(NOW)
    clock.t += 5
    assert sorted({e.entity for e in probe.sample(NOW + 5000)}) == ["dm-0", "nvme0n1", "sda"]
    everything = StorageProbe(str(proc), str(tmp_path / "no-sys"), include_all=True, monotonic=clock)
    everything.sample(NOW)
    clock.t += 5
    assert len({e.entity for e in everything.sample(NOW + 5000)}) == 8


def test_empty_and_missing_diskstats(roots: tuple[Path, Path], tmp_path: Path) -> None:
    proc, sys = roots
    (proc / "diskstats").write_text("")
    bad: list[str] = []
    probe = StorageProbe(str(proc), str(sys))
    assert probe.sample(NOW, bad.append) == [] and probe.sample(NOW + 5000, bad.append) == [] and bad == []
    gone = StorageProbe(str(tmp_path / "none"), str(sys))
    assert gone.sample(NOW) == []
    assert "not readable" in gone.describe()


def test_from_spec() -> None:
    probe = StorageProbe.from_spec("interval=10s,all=true")
    assert (probe.interval_s, probe.include_all, probe.heartbeat_s) == (10.0, True, 35.0)
    assert StorageProbe.from_spec(None).interval_s == 5.0
    for bad in ("all=perhaps", "interval=-1s", "depth=3"):
        with pytest.raises(ProbeError):
            StorageProbe.from_spec(bad)
