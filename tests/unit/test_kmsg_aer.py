"""PCIe AER errors on the GPUs they hit: a GPU's own address, or every GPU below a bridge or
root port, found in a fixture /sys tree; and `why` on a process of such a GPU reaches it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _scenario import Scenario
from fake_nvml import FakeNvml

from xctl.agent.wiring import GpuView, link
from xctl.core.events import Event, EventType
from xctl.core.targets import Target
from xctl.core.why import explain
from xctl.probes.kmsg import KmsgProbe, SysfsGpuIndex, SysfsGpusBelow
from xctl.probes.kmsg_parse import gpus_below
from xctl.probes.nvml import NvmlProbe
from xctl.rules import load_rules
from xctl.rules.engine import Engine

NOW = 1_732_350_000_000

#: Two GPUs behind a PCIe switch under root port 17:00.0, one GPU (with its audio function)
#: directly under root port 5c:00.0, and a SATA controller with nothing below it.
DEVICES = {
    "0000:17:00.0": "pci0000:17/0000:17:00.0",
    "0000:18:00.0": "pci0000:17/0000:17:00.0/0000:18:00.0",
    "0000:19:00.0": "pci0000:17/0000:17:00.0/0000:18:00.0/0000:19:00.0",
    "0000:19:08.0": "pci0000:17/0000:17:00.0/0000:18:00.0/0000:19:08.0",
    "0000:1a:00.0": "pci0000:17/0000:17:00.0/0000:18:00.0/0000:19:00.0/0000:1a:00.0",
    "0000:1b:00.0": "pci0000:17/0000:17:00.0/0000:18:00.0/0000:19:08.0/0000:1b:00.0",
    "0000:5c:00.0": "pci0000:5c/0000:5c:00.0",
    "0000:5d:00.0": "pci0000:5c/0000:5c:00.0/0000:5d:00.0",
    "0000:5d:00.1": "pci0000:5c/0000:5c:00.0/0000:5d:00.1",
    "0000:00:1f.2": "pci0000:00/0000:00:1f.2",
}
GPUS = ("0000:1a:00.0", "0000:1b:00.0", "0000:5d:00.0")  # gpu-0, gpu-1, gpu-2 in bus order


def make_sys(root: Path, devices: dict[str, str] = DEVICES, gpus: tuple[str, ...] = GPUS) -> Path:
    """A /sys tree as the kernel lays it out: devices/ holds the hierarchy, bus/pci/devices/ and
    the nvidia driver's directory link into it."""
    sys_root = root / "sys"
    bus = sys_root / "bus" / "pci" / "devices"
    driver = sys_root / "bus" / "pci" / "drivers" / "nvidia"
    bus.mkdir(parents=True)
    driver.mkdir(parents=True)
    for addr, path in devices.items():
        (sys_root / "devices" / path).mkdir(parents=True, exist_ok=True)
        os.symlink(f"../../../devices/{path}", bus / addr)
    for addr in gpus:
        os.symlink(f"../../../../devices/{devices[addr]}", driver / addr)
    (driver / "bind").write_text("")
    return sys_root


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    return make_sys(tmp_path)


def aer(probe: KmsgProbe, line: str, now: int = NOW) -> list[tuple[str, str, object, object]]:
    events = probe.interpreter.feed_line(line, now)
    assert events is not None
    return [(e.entity, e.value, e.attrs.get("pci"), e.attrs.get("via")) for e in events]


def test_gpus_below_is_a_path_prefix_test() -> None:
    paths = {gpu: f"/sys/devices/{DEVICES[gpu]}" for gpu in GPUS}
    assert gpus_below("0000:17:00.0", paths) == ["0000:1a:00.0", "0000:1b:00.0"]
    assert gpus_below("0000:19:08.0", paths) == ["0000:1b:00.0"]
    assert gpus_below("0000:5c:00.0", paths) == ["0000:5d:00.0"]
    assert gpus_below("0000:1a:00.0", paths) == []  # a GPU is not below itself
    assert gpus_below("0000:00:1f.2", paths) == []
    assert gpus_below("0000:17:00", paths) == []  # whole path components only


def test_sysfs_gpus_below_reads_the_device_links(sysfs: Path) -> None:
    below = SysfsGpusBelow(str(sysfs), SysfsGpuIndex(str(sysfs)))
    assert below("0000:17:00.0") == ["0000:1a:00.0", "0000:1b:00.0"]
    assert below("0000:18:00.0") == ["0000:1a:00.0", "0000:1b:00.0"]  # the switch's upstream port
    assert below("17:00.0") == ["0000:1a:00.0", "0000:1b:00.0"]  # any common address form
    assert below("0000:19:00.0") == ["0000:1a:00.0"]
    assert below("0000:5c:00.0") == ["0000:5d:00.0"]
    assert below("0000:5d:00.1") == []
    assert below("0000:00:1f.2") == []
    assert below("not an address") == []
    assert SysfsGpusBelow(str(sysfs / "nope"), SysfsGpuIndex(str(sysfs / "nope")))("0000:17:00.0") == []


def test_aer_on_a_gpu_is_on_that_gpu(sysfs: Path) -> None:
    probe = KmsgProbe("/nonexistent/kmsg", sys_root=str(sysfs))
    line = "nvidia 0000:5d:00.0: PCIe Bus Error: severity=Uncorrected (Non-Fatal), type=Transaction Layer"
    assert aer(probe, line) == [("gpu-2", "PCIE_AER_UNCORRECTED", "0000:5d:00.0", None)]


def test_aer_on_a_port_is_on_every_gpu_below_it(sysfs: Path) -> None:
    probe = KmsgProbe("/nonexistent/kmsg", sys_root=str(sysfs))
    root_port = "pcieport 0000:17:00.0: AER: Uncorrected (Fatal) error received: 0000:17:00.0"
    assert aer(probe, root_port) == [
        ("gpu-0", "PCIE_AER_UNCORRECTED", "0000:1a:00.0", "0000:17:00.0"),
        ("gpu-1", "PCIE_AER_UNCORRECTED", "0000:1b:00.0", "0000:17:00.0"),
    ]
    switch_port = "pcieport 0000:17:00.0: AER: Corrected error received: 0000:19:08.0"
    events = probe.interpreter.feed_line(switch_port, NOW)
    assert events is not None and [(e.entity, e.attrs["via"], e.attrs["reporter"]) for e in events] == [
        ("gpu-1", "0000:19:08.0", "0000:17:00.0")
    ]


def test_aer_elsewhere_stays_on_the_pci_address(sysfs: Path) -> None:
    probe = KmsgProbe("/nonexistent/kmsg", sys_root=str(sysfs))
    sata = "pcieport 0000:00:1c.0: AER: Corrected error received: 0000:00:1f.2"
    assert aer(probe, sata) == [("0000:00:1f.2", "PCIE_AER_CORRECTED", None, None)]
    audio = "snd_hda_intel 0000:5d:00.1: PCIe Bus Error: severity=Corrected, type=Physical Layer, (Receiver ID)"
    assert aer(probe, audio) == [("0000:5d:00.1", "PCIE_AER_CORRECTED", None, None)]
    # no /sys at all: as before
    bare = KmsgProbe("/nonexistent/kmsg", sys_root="/nonexistent")
    port = "pcieport 0000:17:00.0: AER: Uncorrected (Fatal) error received: 0000:17:00.0"
    assert aer(bare, port) == [("0000:17:00.0", "PCIE_AER_UNCORRECTED", None, None)]


def test_why_on_a_process_of_a_gpu_below_the_port_reaches_the_aer(sysfs: Path) -> None:
    s = Scenario(nodes=1, ranks_per_node=4)  # rank i on gpu-i
    s.start_job()
    s.advance(5_000)
    probe = KmsgProbe("/nonexistent/kmsg", sys_root=str(sysfs))
    line = "pcieport 0000:17:00.0: AER: Uncorrected (Non-Fatal) error received: 0000:17:00.0"
    events = probe.interpreter.feed_line(line, s.t)
    assert events is not None and len(events) == 2
    for ev in events:
        s.cluster.apply("node0", ev)
    s.advance(1_000)
    s.heartbeat_all()

    exp = explain(s.cluster, Target(node="node0", pid=s.pid(1)))  # the rank on gpu-1
    assert exp.root is not None, exp.to_text()
    assert (exp.root.node, exp.root.entity, exp.root.code) == ("node0", "gpu-1", "PCIE_AER_UNCORRECTED")
    assert exp.verdict == "blocked"
    assert [step.edge for step in exp.chain] == ["Consumes", "BlockedBy"]
    evidence: list[Event] = [e for step in exp.chain for e in step.evidence]
    assert any(e.type is EventType.ERROR_HW and e.attrs.get("via") == "0000:17:00.0" for e in evidence)

    engine = Engine(load_rules([]))
    facts = engine.facts(exp, s.cluster)
    match = engine.best(facts)
    assert match is not None and match.rule.id == "pcie-aer-uncorrected-upstream"
    rendered = Engine.render(match.rule, facts)
    assert "0000:17:00.0" in rendered.summary and "{" not in rendered.summary

    # the rank on gpu-2 (under the other root port) is not blamed on it
    other = explain(s.cluster, Target(node="node0", pid=s.pid(2)))
    assert other.root is None or other.root.entity != "gpu-2"


def test_gpus_nvml_knows_are_found_below_a_port_through_the_wiring(tmp_path: Path) -> None:
    # NVML's GPUs (bus ids 00000000:18:00.0 and 00000000:28:00.0) are not bound to a driver
    # directory sysfs lists here: the agent's wiring hands kmsg NVML's addresses and indexes.
    devices = {
        "0000:17:00.0": "pci0000:17/0000:17:00.0",
        "0000:18:00.0": "pci0000:17/0000:17:00.0/0000:18:00.0",
        "0000:27:00.0": "pci0000:27/0000:27:00.0",
        "0000:28:00.0": "pci0000:27/0000:27:00.0/0000:28:00.0",
    }
    sysfs = make_sys(tmp_path, devices, gpus=())
    view = GpuView()
    nvml = link(NvmlProbe(lib=FakeNvml(gpus=2), interval_s=1.0), view)
    kmsg = link(KmsgProbe("/nonexistent/kmsg", sys_root=str(sysfs)), view)
    assert isinstance(nvml, NvmlProbe) and isinstance(kmsg, KmsgProbe)
    line = "pcieport 0000:27:00.0: AER: Uncorrected (Non-Fatal) error received: 0000:27:00.0"
    assert aer(kmsg, line) == [("0000:27:00.0", "PCIE_AER_UNCORRECTED", None, None)]  # NVML not open yet
    kmsg.gpus_below.refresh_s = 0.0  # look again at once (GPUs appear when NVML opens)
    nvml.open()
    try:
        nvml.sample(NOW)
        assert aer(kmsg, line, NOW + 10_000) == [  # past the AER pair window: a new error
            ("gpu-1", "PCIE_AER_UNCORRECTED", "0000:28:00.0", "0000:27:00.0")
        ]
        own = "nvidia 0000:18:00.0: PCIe Bus Error: severity=Corrected, type=Physical Layer, (Receiver ID)"
        assert aer(kmsg, own) == [("gpu-0", "PCIE_AER_CORRECTED", "0000:18:00.0", None)]
    finally:
        nvml.close()
