"""The node probes against THIS machine's real /proc, /sys and /dev/kmsg.

Synchronisation is by waiting.wait_for over samples, never by fixed sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psutil
import pytest
from waiting import wait_for

from xctl.core.events import Event, EventType
from xctl.probes.base import ProbeContext
from xctl.probes.kmsg import KmsgProbe
from xctl.probes.kmsg_parse import KmsgRecord
from xctl.probes.network import NetworkProbe
from xctl.probes.procfs import ProcfsProbe
from xctl.probes.storage import StorageProbe

DEADLINE_S = 5.0


def now_ms() -> int:
    return int(time.time() * 1000)


def sample_until(probe: ProcfsProbe, found: Callable[[Event], bool], seen: list[Event] | None = None) -> list[Event]:
    """Sample until an event satisfies ``found``; returns every event seen on the way."""
    seen = [] if seen is None else seen

    def sampled() -> bool:
        seen.extend(probe.sample(now_ms()))
        return any(found(e) for e in seen)

    try:
        wait_for(sampled, timeout=DEADLINE_S, what="a matching event", interval=0.02)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; saw {[(e.pid, e.value) for e in seen]}") from None
    return seen


def ours(pid: int, value: str) -> Callable[[Event], bool]:
    return lambda e: e.type is EventType.PROCESS_STATE and e.pid == pid and e.value == value


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # the workload: a process to see
    yield proc
    proc.kill()
    proc.wait()


def well_formed(event: Event) -> None:
    assert Event.from_wire(event.to_wire()) == event  # passes the wire validation
    assert event.entity and event.value


def test_procfs_start_and_exit_of_a_real_child(child: subprocess.Popen[bytes]) -> None:
    probe = ProcfsProbe("/proc", 0.1)
    # wait until the child has exec'd python (a fresh fork still shows pytest's argv)
    seen = sample_until(probe, lambda e: e.pid == child.pid and "sleep(30)" in str(e.attrs.get("cmdline", "")))
    start = [e for e in seen if ours(child.pid, "start")(e)]
    assert len(start) == 1
    assert start[0].attrs["ppid"] == os.getpid()
    expected = psutil.Process(child.pid).create_time()
    assert abs(float(start[0].attrs["create_time"]) - expected) < 0.05
    assert not [e for e in seen if e.pid == os.getpid()]  # the agent does not watch itself
    for event in seen:
        well_formed(event)

    child.kill()
    child.wait()
    seen = sample_until(probe, ours(child.pid, "exit"))
    exit_event = next(e for e in seen if ours(child.pid, "exit")(e))
    assert exit_event.attrs["create_time"] == start[0].attrs["create_time"]


def test_procfs_zombie_with_exit_code() -> None:
    probe = ProcfsProbe("/proc", 0.1)
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    try:
        seen = sample_until(probe, ours(proc.pid, "zombie"))  # exited, not reaped: a zombie
        zombie = next(e for e in seen if ours(proc.pid, "zombie")(e))
        assert zombie.attrs["exit_code"] == 3
    finally:
        assert proc.wait() == 3
    seen = sample_until(probe, ours(proc.pid, "exit"))
    assert next(e for e in seen if ours(proc.pid, "exit")(e)).attrs["exit_code"] == 3


def test_procfs_cpu_and_memory_of_a_busy_child() -> None:
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"]
    )
    try:
        probe = ProcfsProbe("/proc", 0.1)
        seen = sample_until(probe, lambda e: e.pid == busy.pid and e.type is EventType.COMPUTE_UTIL)
        mem = [e for e in seen if e.pid == busy.pid and e.type is EventType.COMPUTE_MEM]
        assert mem and mem[0].entity == "sysmem" and int(mem[0].attrs["total_mib"]) > 0
        cpu = [e for e in seen if e.pid == busy.pid and e.type is EventType.COMPUTE_UTIL]
        assert cpu[0].entity == "cpu" and 0.0 <= float(cpu[0].value) <= 400.0
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.parametrize("cls", [NetworkProbe, StorageProbe])
def test_network_and_storage_on_real_proc(cls: type[NetworkProbe] | type[StorageProbe]) -> None:
    bad: list[str] = []
    probe = cls()
    probe.sample(now_ms(), bad.append)
    time.sleep(0.2)  # an interval for the counters to move over, not synchronisation
    events = probe.sample(now_ms(), bad.append)
    for event in events:
        well_formed(event)
        if event.type in (EventType.TRANSPORT_BW, EventType.STORAGE_IOPS, EventType.STORAGE_QDEPTH):
            assert float(event.value) >= 0
    assert bad == []
    assert probe.describe().startswith(cls.name)


def _kmsg_unreadable() -> str | None:
    try:
        os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
    except OSError as exc:
        return f"/dev/kmsg not readable here: {exc.strerror}"
    return None


@pytest.mark.skipif(_kmsg_unreadable() is not None, reason=_kmsg_unreadable() or "")
def test_kmsg_starts_at_the_end_and_stops_quickly() -> None:
    probe = KmsgProbe("/dev/kmsg")
    assert probe.open()
    records, _ = probe.read_records()
    assert all(r.seq != 0 for r in records)  # the boot record is behind us
    if os.access("/dev/kmsg", os.W_OK):  # root: a harmless marker must come back through the reader
        marker = f"xctl component test marker {uuid.uuid4()} (ignore)"
        with open("/dev/kmsg", "w") as fh:
            fh.write(f"<6>{marker}\n")
        got = list[KmsgRecord]()

        def marker_back() -> bool:
            probe.wait_readable(0.1)  # blocks until there is something to read (0.1 s at most)
            got.extend(probe.read_records()[0])
            return any(marker in r.message for r in got)

        wait_for(marker_back, timeout=DEADLINE_S, what="the marker back through the reader", interval=0)
    probe.close()

    emitted: list[Event] = []
    polling = threading.Event()  # the run loop beats once it has opened the log and polled
    ctx = ProbeContext(node="test", clock=now_ms, emit=emitted.append, beat=polling.set, bad=lambda r: None)
    thread = threading.Thread(target=KmsgProbe("/dev/kmsg").run, args=(ctx,), daemon=True)
    thread.start()
    assert polling.wait(DEADLINE_S)
    stopped_at = time.monotonic()
    ctx.stop.set()
    thread.join(timeout=2.0)
    assert not thread.is_alive()
    assert time.monotonic() - stopped_at < 1.0


def test_kmsg_unreadable_path_degrades_quietly() -> None:
    probe = KmsgProbe("/nonexistent/kmsg")
    ctx = ProbeContext(node="t", clock=now_ms, emit=lambda e: None, beat=lambda: None, bad=lambda r: None)
    ctx.stop.set()
    probe.run(ctx)  # returns at once when stopped
    assert not probe.open()
    assert probe.describe() == "kmsg: /nonexistent/kmsg not readable (no such file or directory)"
