"""NVML tells procfs which pids use a GPU and kmsg which gpu-N a PCI address is (issue 5/6)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from fake_nvml import FakeNvml
from waiting import wait_for

from xctl.agent.wiring import GpuView, link
from xctl.probes.kmsg import KmsgProbe
from xctl.probes.nvml import NvmlProbe
from xctl.probes.procfs import ProcfsProbe

XID_LINE = (
    "4,1234,67427870,-;NVRM: Xid (PCI:0000:28:00): 31, pid=449, name=python3, channel 0x0000000a, intr 00000000."
)


def test_a_gpu_consumer_and_its_children_are_watched_although_no_name_matches() -> None:
    # A launcher that is not called python, with a child: NVML reports the launcher as a GPU user.
    launcher = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        fake = FakeNvml(gpus=1)
        fake.gpus[0].processes = [(launcher.pid, 2 * 1024**3)]
        view = GpuView()
        nvml = link(NvmlProbe(lib=fake, interval_s=1.0), view)
        procfs = link(ProcfsProbe("/proc", 1.0), view)
        unlinked = ProcfsProbe("/proc", 1.0)
        assert isinstance(nvml, NvmlProbe)
        nvml.open()
        try:
            nvml.sample(int(time.time() * 1000))
            started: set[int] = set()

            def both_started() -> bool:
                events = procfs.sample(int(time.time() * 1000))  # type: ignore[attr-defined]
                started.update(e.pid for e in events if e.value == "start" and e.pid is not None)
                return len(started) >= 2

            wait_for(both_started, timeout=5, what="the launcher and its child to be seen starting", interval=0.02)
            kids = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text()
            children = {int(p) for p in kids.split()}
            assert launcher.pid in started
            assert children <= started
            plain = unlinked.sample(int(time.time() * 1000))
            assert launcher.pid not in {e.pid for e in plain}
        finally:
            nvml.close()
    finally:
        launcher.kill()
        launcher.wait()


def test_kmsg_maps_the_pci_address_through_nvml() -> None:
    fake = FakeNvml(gpus=2)  # bus ids 00000000:18:00.0 and 00000000:28:00.0
    view = GpuView()
    nvml = link(NvmlProbe(lib=fake, interval_s=1.0), view)
    kmsg = link(KmsgProbe("/nonexistent/kmsg", sys_root="/nonexistent"), view)
    assert isinstance(nvml, NvmlProbe)
    assert isinstance(kmsg, KmsgProbe)
    nvml.open()
    try:
        nvml.sample(int(time.time() * 1000))
        events = kmsg.interpreter.feed_line(XID_LINE, int(time.time() * 1000))
    finally:
        nvml.close()
    assert events is not None
    xid = [e for e in events if e.value == "XID_31"]
    assert [(e.entity, e.pid) for e in xid] == [("gpu-1", 449)]


def test_restarted_nvml_instances_are_followed() -> None:
    view = GpuView()
    first, second = FakeNvml(gpus=1), FakeNvml(gpus=1)
    first.gpus[0].processes = [(111, 1024**3)]
    second.gpus[0].processes = [(222, 1024**3)]
    for fake, expected in ((first, {111}), (second, {222})):
        probe = link(NvmlProbe(lib=fake, interval_s=1.0), view)
        assert isinstance(probe, NvmlProbe)
        probe.open()
        probe.sample(int(time.time() * 1000))
        assert view.gpu_pids() == expected
        probe.close()
