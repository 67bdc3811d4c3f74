"""Kernel log parsing: records, dmesg lines, and every message form the node probes act on."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xctl.core.events import Event, EventType
from xctl.probes.kmsg_parse import (
    KernelLogInterpreter,
    classify,
    normalize_pci,
    parse_any,
    parse_dmesg_line,
    parse_kmsg_record,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kmsg"
H100_XID = (
    "[   67.427870] NVRM: Xid (PCI:0000:00:06): 31, pid=449, name=python3, channel 0x0000000a, intr 00000000. "
    "MMU Fault: ENGINE GRAPHICS GPC1 GPCCLIENT_T1_8 faulted @ 0x831a_91e00000. "
    "Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_WRITE"
)
NOW = 1_732_350_000_000


def gpu_index(bus_id: str) -> int | None:
    return {"0000:00:06.0": 0, "0000:3b:00.0": 1, "0000:8a:00.0": 2}.get(bus_id)


def feed_file(name: str, interp: KernelLogInterpreter | None = None) -> list[Event]:
    interp = interp or KernelLogInterpreter(gpu_index)
    events: list[Event] = []
    for line in (FIXTURES / name).read_text().splitlines():
        got = interp.feed_line(line, NOW)
        assert got is not None
        events.extend(got)
    return events


# --- records ---------------------------------------------------------------------------------


def test_kmsg_record_with_continuation_lines() -> None:
    rec = parse_kmsg_record(b"3,1201,67427870,-;NVRM: Xid (PCI:0000:00:06): 31, pid=449\n SUBSYSTEM=pci\n DEVICE=+x\n")
    assert rec is not None
    assert (rec.level, rec.facility, rec.seq, rec.usec) == (3, 0, 1201, 67427870)
    assert rec.message == "NVRM: Xid (PCI:0000:00:06): 31, pid=449"


def test_kmsg_record_real_boot_line_and_caller_field() -> None:
    rec = parse_kmsg_record("5,0,0,-;Linux version 6.18.44-fc-v782\n")
    assert rec is not None and rec.message == "Linux version 6.18.44-fc-v782" and rec.seq == 0
    rec = parse_kmsg_record("6,339,5140900,-,caller=T1;hello")
    assert rec is not None and rec.message == "hello" and rec.usec == 5140900


@pytest.mark.parametrize(
    "data",
    [b"no semicolon here\n", b"", b";msg", b"a,b,c,d;msg", b"5,0;msg", b"\xff\xfe\x00;", "1,2,x,-;m"],
)
def test_malformed_kmsg_records(data: bytes | str) -> None:
    assert parse_kmsg_record(data) is None


def test_dmesg_forms() -> None:
    rec = parse_dmesg_line(H100_XID)
    assert rec.usec == 67_427_870
    assert rec.message.startswith("NVRM: Xid (PCI:0000:00:06): 31")
    assert parse_dmesg_line("[Fri Nov 22 12:00:00 2024] nvme nvme0: x").message == "nvme nvme0: x"
    assert parse_dmesg_line("plain message\n").message == "plain message"
    assert parse_any("5,0,0,-;raw record").message == "raw record"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "norm"),
    [
        ("0000:00:06", "0000:00:06.0"),
        ("0000:00:06.0", "0000:00:06.0"),
        ("00000000:00:06.0", "0000:00:06.0"),
        ("00:06.0", "0000:00:06.0"),
        ("0000:8A:00", "0000:8a:00.0"),
        ("10000:e1:00.0", "10000:e1:00.0"),  # VMD domains are wider than 16 bits
        ("garbage", None),
        ("0000:00:ff.0", None),
    ],
)
def test_normalize_pci(text: str, norm: str | None) -> None:
    assert normalize_pci(text) == norm


# --- the real H100 line, verbatim ---------------------------------------------------------------


def test_h100_observed_xid_line() -> None:
    events = KernelLogInterpreter(gpu_index).feed_line(H100_XID, NOW)
    assert events is not None and len(events) == 1
    ev = events[0]
    assert (ev.type, ev.entity, ev.value, ev.pid, ev.ts) == (EventType.ERROR_HW, "gpu-0", "XID_31", 449, NOW)
    assert ev.attrs["xid"] == 31
    assert ev.attrs["pci_bus_id"] == "0000:00:06.0"
    assert ev.attrs["name"] == "python3"
    assert ev.attrs["raw"] == H100_XID.split("] ", 1)[1]


def test_h100_boot_lines_are_not_errors() -> None:
    events = feed_file("h100-observed.dmesg")
    assert [(e.entity, e.value, e.pid) for e in events] == [("gpu-0", "XID_31", 449)]


def test_unknown_gpu_gets_a_pci_entity() -> None:
    events = KernelLogInterpreter().feed_line(H100_XID, NOW)
    assert events is not None and events[0].entity == "gpu-pci-0000:00:06.0"


def test_failing_gpu_index_does_not_lose_the_xid() -> None:
    def broken(bus_id: str) -> int | None:
        raise RuntimeError("NVML went away")

    events = KernelLogInterpreter(broken).feed_line(H100_XID, NOW)
    assert events is not None and events[0].entity == "gpu-pci-0000:00:06.0"


# --- every message form ------------------------------------------------------------------------


def test_gpu_node_fixture_end_to_end() -> None:
    events = feed_file("gpu-node.dmesg")
    got = [(e.type.value, e.entity, e.value, e.pid) for e in events]
    assert got == [
        ("error.hw", "gpu-2", "XID_79", None),
        ("error.hw", "gpu-1", "XID_48", 1234),
        ("error.hw", "gpu-pci-0000:03:00.0", "XID_13", None),
        ("error.hw", "nvswitch-0", "SXID_12028", None),
        ("error.hw", "nvme0", "NVME_TIMEOUT", None),
        ("error.hw", "nvme0", "NVME_RESET", None),
        ("error.hw", "0000:01:00.0", "PCIE_AER_CORRECTED", None),  # the "PCIe Bus Error" twin is merged
        ("error.hw", "0000:01:00.0", "PCIE_AER_UNCORRECTED", None),
        ("process.state", "python3", "oom_killed", 4812),  # oom-kill: and "Out of memory:" are one kill
        ("process.state", "python3", "hung", 4813),
        ("error.net", "enp59s0f0", "LINK_DOWN", None),
        ("error.net", "enp59s0f0", "OK", None),
        ("error.net", "enp59s0f0", "LINK_FLAP", None),
        ("error.net", "eno1", "LINK_DOWN", None),
        ("error.net", "eno1", "OK", None),  # up 100 s later: healthy again, not a flap
    ]
    by_value = {e.value: e for e in events}
    assert by_value["XID_79"].attrs.get("name") is None
    assert by_value["XID_48"].attrs["name"] == "python"
    sxid = by_value["SXID_12028"].attrs
    assert (sxid["sxid"], sxid["severity"], sxid["link"]) == (12028, "Non-fatal", 32)
    assert sxid["pci_bus_id"] == "0000:05:00.0"
    assert by_value["NVME_TIMEOUT"].attrs["qid"] == 4
    aer = by_value["PCIE_AER_UNCORRECTED"].attrs
    assert (aer["severity"], aer["reporter"]) == ("Uncorrected (Non-Fatal)", "0000:00:01.0")
    oom = by_value["oom_killed"].attrs
    assert oom["name"] == "python3" and str(oom["task_memcg"]).startswith("/system.slice/slurmstepd.scope/job_4242")
    assert str(oom["raw"]).startswith("oom-kill:")
    assert by_value["hung"].attrs["blocked_s"] == 120
    assert by_value["LINK_FLAP"].attrs["down_s"] == 10.0
    assert by_value["OK"].attrs["code"] == "LINK_DOWN"


def test_xid_variants() -> None:
    old = classify("NVRM: Xid (0000:03:00): 13, Graphics Exception: ESR 0x404600=0x80000002")
    assert old is not None and (old.code, old.device, old.pid, old.name) == ("13", "0000:03:00", None, None)
    unknown = classify("NVRM: Xid (PCI:0000:8a:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.")
    assert unknown is not None and unknown.pid is None and unknown.name is None
    no_name = classify("NVRM: Xid (PCI:0000:03:00): 43, pid=77, Ch 00000010")
    assert no_name is not None and (no_name.pid, no_name.name) == (77, None)


def test_aer_variants() -> None:
    new = classify(
        "pcieport 0000:00:1c.0: AER: Multiple Uncorrectable (Non-Fatal) error message received from 0000:73:00.1"
    )
    assert new is not None and (new.code, new.device) == ("PCIE_AER_UNCORRECTED", "0000:73:00.1")
    old = classify("pcieport 0000:00:03.0: AER: Corrected error received: id=0018")
    assert old is not None and (old.code, old.device) == ("PCIE_AER_CORRECTED", "0000:00:03.0")
    bus = classify(
        "nvidia 0000:3b:00.0: PCIe Bus Error: severity=Uncorrected (Fatal), type=Transaction Layer, (Requester ID)"
    )
    assert bus is not None and (bus.code, bus.device) == ("PCIE_AER_UNCORRECTED", "0000:3b:00.0")


def test_aer_on_a_gpu_names_the_gpu() -> None:
    line = "nvidia 0000:3b:00.0: PCIe Bus Error: severity=Corrected, type=Physical Layer, (Receiver ID)"
    events = KernelLogInterpreter(gpu_index).feed_line(line, NOW)
    assert events is not None and [(e.entity, e.attrs["pci"]) for e in events] == [("gpu-1", "0000:3b:00.0")]
    assert "via" not in events[0].attrs


def test_oom_variants_and_dedupe_window() -> None:
    interp = KernelLogInterpreter()
    first = interp.feed_line("[ 10.0] Out of memory: Kill process 4812 (python3) score 900 or sacrifice child", NOW)
    again = interp.feed_line("[ 10.1] Killed process 4812 (python3) total-vm:1kB, anon-rss:1kB", NOW)
    cgroup = interp.feed_line("[ 99.0] Memory cgroup out of memory: Killed process 4812 (python3) total-vm:1kB", NOW)
    assert first is not None and [(e.value, e.pid) for e in first] == [("oom_killed", 4812)]
    assert again == []
    # 89 s later the same pid is a different kill (pid reuse)
    assert cgroup is not None and len(cgroup) == 1
    odd = interp.feed_line("Out of memory: Killed process 77 (my (odd) app) total-vm:1kB", NOW)
    assert odd is not None and odd[0].entity == "my (odd) app"


def test_hung_task_with_colons_in_name() -> None:
    events = KernelLogInterpreter().feed_line("INFO: task kworker/u16:3:123 blocked for more than 245 seconds.", NOW)
    assert events is not None
    assert (events[0].entity, events[0].pid, events[0].attrs["blocked_s"]) == ("kworker/u16:3", 123, 245)


def test_link_forms() -> None:
    interp = KernelLogInterpreter()
    lines = [
        ("igb 0000:01:00.0 eno1: igb: eno1 NIC Link is Down", "eno1", "LINK_DOWN"),
        ("ixgbe 0000:3b:00.0 eth2: NIC Link is Down", "eth2", "LINK_DOWN"),
        ("IPv6: ADDRCONF(NETDEV_UP): ib0: link is not ready", "ib0", "LINK_DOWN"),
        ("IPv6: ADDRCONF(NETDEV_CHANGE): ib0: link becomes ready", "ib0", "OK"),
        ("bond0: (slave eth1): link status definitely down, disabling slave", "eth1", "LINK_DOWN"),
    ]
    for line, entity, value in lines:
        events = interp.feed_line(line, NOW)
        assert events is not None and (events[0].entity, events[0].value) == (entity, value), line
    # a repeated "down" while down says nothing new
    assert interp.feed_line("ixgbe 0000:3b:00.0 eth2: NIC Link is Down", NOW) == []
    # without kernel timestamps the flap window runs on now_ms
    up = interp.feed_line("ixgbe 0000:3b:00.0 eth2: NIC Link is Up 10 Gbps, Flow Control: RX/TX", NOW + 5000)
    assert up is not None and [e.value for e in up] == ["OK", "LINK_FLAP"]
    assert classify("ata1: SATA link down (SStatus 0 SControl 300)") is None


def test_records_fixture_with_user_space_spoof_and_malformed() -> None:
    interp = KernelLogInterpreter(gpu_index)
    results = [interp.feed_line(line, NOW) for line in (FIXTURES / "records.kmsg").read_text().splitlines()]
    events = [e for r in results if r for e in r]
    # continuation lines carry no events; the user-space (facility 1) Xid is ignored; one line is malformed
    assert [(e.entity, e.value, e.pid) for e in events] == [("gpu-0", "XID_31", 449), ("python3", "hung", 449)]
    assert KernelLogInterpreter(gpu_index, kernel_only=False).feed_line(
        "14,1202,67500000,-;NVRM: Xid (PCI:0000:00:06): 79, pid=1, name=spoofed", NOW
    )


def test_nvme_abort_status_is_not_an_event() -> None:
    assert classify("nvme nvme0: Abort status: 0x0") is None
    newer = classify("nvme nvme1: I/O tag 12 (100c) opcode 0x1 (I/O Cmd) QID 7 timeout, reset controller")
    assert newer is not None and (newer.code, newer.device) == ("NVME_TIMEOUT", "nvme1")


@pytest.mark.parametrize(
    "line",
    [
        "NVRM: Xid (PCI:0000:00:06): ",
        "NVRM: Xid (PCI:",
        "NVRM: Xid (zz:zz): 31, pid=abc",
        "nvidia-nvswitch0: SXid (PCI:",
        "INFO: task :12 blocked for more than x seconds",
        "oom-kill:task=,pid=",
        "pcieport 0000:00:01.0: AER: Corrected error received:",
        "mlx5_core 0000:3b:00.0 : Link down",
        "\x00\x01\x02",
        "",
    ],
)
def test_truncated_messages_do_not_raise(line: str) -> None:
    assert KernelLogInterpreter(gpu_index).feed_line(line, NOW) is not None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_never_raises_on_arbitrary_text(text: str) -> None:
    interp = KernelLogInterpreter(gpu_index)
    interp.feed_line(text, NOW)
    interp.feed_line("3,1,2,-;" + text, NOW)
    interp.feed_line("[ 1.000000] NVRM: Xid (PCI:0000:00:06): " + text, NOW)
    parse_kmsg_record(text.encode("utf-8", "surrogatepass"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    KernelLogInterpreter(gpu_index).feed_line(data, NOW)
