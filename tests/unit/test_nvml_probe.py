"""nvml probe: the pure sampler, the watchdog wrapper, and the probe against a fake NVML with
the values observed on a real H100 (tests/unit/fake_nvml.py). No GPU needed."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from fake_nvml import (
    H100_BUS,
    H100_MEM_TOTAL,
    H100_MEM_USED_IDLE,
    H100_NAME,
    H100_PID,
    H100_PROC_MEM,
    H100_UUID,
    FakeNvml,
)
from waiting import wait_for

from xctl.core.clock import ManualClock
from xctl.core.errors import ProbeError
from xctl.core.events import Event, EventType
from xctl.probes import nvml_wrap
from xctl.probes.base import ProbeContext
from xctl.probes.nvml import LOST_RETRY_SAMPLES, NvmlProbe
from xctl.probes.nvml_sample import (
    CLOCK_EVENT_BITS,
    IDENTITY_EVERY,
    GpuIdentity,
    GpuReading,
    GpuTracker,
    MigReading,
    PcieReading,
    ProcessReading,
    RemapReading,
    hung_event,
    normalize_bus_id,
    xid_event,
)
from xctl.probes.nvml_wrap import GpuLost, Nvml, NvmlCallError, NvmlHung
from xctl.probes.registry import make_probe

T0 = 1_732_350_000_000
HUNG_TIMEOUT_S = 0.3
MARGIN_S = 0.7
ERR, UTIL, MEM, LINK, DROP = (
    EventType.ERROR_HW,
    EventType.COMPUTE_UTIL,
    EventType.COMPUTE_MEM,
    EventType.TOPO_LINK_DOWN,
    EventType.TRANSPORT_DROP,
)


def of(
    events: list[Event],
    etype: EventType,
    value: str | None = None,
    entity: str | None = None,
    *,
    pid: int | bool | None = False,
) -> list[Event]:
    """Filter; ``pid=False`` = any pid, ``None`` = only without a pid."""
    return [
        e
        for e in events
        if e.type is etype
        and (value is None or e.value == value)
        and (entity is None or e.entity == entity)
        and (pid is False or e.pid == pid)
    ]


def one(
    events: list[Event], etype: EventType, value: str | None = None, entity: str | None = None, **kw: object
) -> Event:
    found = of(events, etype, value, entity, **kw)  # type: ignore[arg-type]
    assert len(found) == 1, (etype, value, entity, events)
    return found[0]


IDENT = GpuIdentity(0, H100_UUID, H100_BUS, H100_NAME)


def tracker() -> GpuTracker:
    return GpuTracker(IDENT)


def busy(**kw: object) -> GpuReading:
    return GpuReading(util_gpu=100, util_mem=9, mem_used=2 * 1024**3, mem_total=H100_MEM_TOTAL, **kw)  # type: ignore[arg-type]


@pytest.fixture
def fake() -> Iterator[FakeNvml]:
    f = FakeNvml()
    yield f
    f.release_all()


@pytest.fixture
def probes() -> Iterator[list[NvmlProbe]]:
    made: list[NvmlProbe] = []
    yield made
    for p in made:
        p.close()


def new_probe(probes: list[NvmlProbe], fake: FakeNvml, **kw: object) -> NvmlProbe:
    kw.setdefault("xid", False)
    p = NvmlProbe(fake, **kw)  # type: ignore[arg-type]
    probes.append(p)
    return p


# --- pure sampler ---------------------------------------------------------------------------


class TestSampler:
    def test_bus_ids_normalise_to_nvml_form(self) -> None:
        for text in ("00000000:00:06.0", "0000:00:06", "0000:00:06.0", "00:06.0", b"00000000:00:06.0\x00"):
            assert normalize_bus_id(text) == "00000000:00:06.0"
        assert normalize_bus_id("00000000:3B:00.0") == "00000000:3b:00.0"
        assert normalize_bus_id("not a bus") is None
        assert normalize_bus_id("00:3f.0") is None  # device > 0x1f

    def test_util_event_carries_temperature_power_clock_and_identity_periodically(self) -> None:
        t = tracker()
        reading = GpuReading(util_gpu=100, util_mem=9, temp_c=35, power_mw=696090, sm_clock_mhz=1980)
        first = one(t.update(reading, T0), UTIL, "100", "gpu-0")
        assert dict(first.attrs) == {
            "mem_util": 9,
            "temp_c": 35,
            "power_w": 696.1,
            "sm_clock_mhz": 1980,
            "uuid": H100_UUID,
            "pci_bus_id": H100_BUS,
            "name": H100_NAME,
        }
        later = [one(t.update(reading, T0 + 1000 * i), UTIL) for i in range(1, IDENTITY_EVERY + 1)]
        assert all("uuid" not in e.attrs for e in later[:-1])
        assert later[-1].attrs["uuid"] == H100_UUID  # sample number IDENTITY_EVERY again

    def test_memory_is_a_percentage_with_mib(self) -> None:
        events = tracker().update(GpuReading(mem_used=H100_MEM_USED_IDLE, mem_total=H100_MEM_TOTAL), T0)
        mem = one(events, MEM, entity="gpu-0", pid=None)
        assert mem.value == "0.6"
        assert mem.attrs["used_mib"] == 480
        assert mem.attrs["total_mib"] == 81559
        # No utilisation reading (MIG): temperature etc. and identity move to the memory event.
        events = tracker().update(GpuReading(mem_used=1, mem_total=H100_MEM_TOTAL, temp_c=40), T0)
        mem = one(events, MEM)
        assert mem.attrs["temp_c"] == 40
        assert mem.attrs["uuid"] == H100_UUID
        assert not of(events, UTIL)

    @pytest.mark.parametrize(("bit", "code"), sorted(CLOCK_EVENT_BITS.items()))
    def test_each_clock_event_bit_while_active_then_ok(self, bit: int, code: str) -> None:
        t = tracker()
        for i in range(3):  # emitted on every sample while active
            ev = one(t.update(busy(clock_reasons=bit | 0x1, temp_c=88), T0 + i), ERR, code, "gpu-0")
            assert ev.attrs["reasons"] == f"0x{bit | 1:x}"
            assert ev.attrs["temp_c"] == 88
        cleared = t.update(busy(clock_reasons=0), T0 + 10)
        ok = one(cleared, ERR, "OK", "gpu-0")
        assert ok.attrs["code"] == code
        assert not of(t.update(busy(clock_reasons=0), T0 + 11), ERR)

    def test_idle_and_benign_reasons_are_not_errors(self) -> None:
        t = tracker()
        for reasons in (0x0, 0x1, 0x2, 0x10, 0x100, 0x1 | 0x10):
            assert not of(t.update(busy(clock_reasons=reasons), T0), ERR)

    def test_several_reasons_and_partial_clear(self) -> None:
        t = tracker()
        events = t.update(busy(clock_reasons=0x4 | 0x40), T0)
        assert {e.value for e in of(events, ERR)} == {"CLOCK_EVENT_SW_POWER_CAP", "CLOCK_EVENT_HW_THERMAL"}
        events = t.update(busy(clock_reasons=0x4), T0 + 1)
        assert {e.value for e in of(events, ERR)} == {"CLOCK_EVENT_SW_POWER_CAP", "OK"}
        assert one(events, ERR, "OK").attrs["code"] == "CLOCK_EVENT_HW_THERMAL"
        # Unknown this time (None): no change, no OK.
        assert not of(t.update(busy(), T0 + 2), ERR, "OK")

    def test_ecc_dbe_is_reported_as_deltas(self) -> None:
        t = tracker()
        assert not of(t.update(busy(ecc_dbe=0), T0), ERR)
        ev = one(t.update(busy(ecc_dbe=2), T0 + 1), ERR, "ECC_DBE", "gpu-0")
        assert (ev.attrs["count"], ev.attrs["total"]) == (2, 2)
        assert not of(t.update(busy(ecc_dbe=2), T0 + 2), ERR)
        ev = one(t.update(busy(ecc_dbe=3), T0 + 3), ERR, "ECC_DBE")
        assert (ev.attrs["count"], ev.attrs["total"]) == (1, 3)
        ok = one(t.update(busy(ecc_dbe=0), T0 + 4), ERR, "OK")  # counter reset: GPU reset
        assert ok.attrs["code"] == "ECC_DBE"

    def test_ecc_dbe_already_counted_at_start_is_reported_once(self) -> None:
        t = tracker()
        ev = one(t.update(busy(ecc_dbe=4), T0), ERR, "ECC_DBE")
        assert ev.attrs["count"] == 4
        assert not of(t.update(busy(ecc_dbe=4), T0 + 1), ERR)

    def test_row_remap_pending_and_failure_on_onset_and_clear(self) -> None:
        t = tracker()
        assert not of(t.update(busy(remap=RemapReading(0, 0, False, False)), T0), ERR)
        ev = one(t.update(busy(remap=RemapReading(0, 1, True, False)), T0 + 1), ERR, "ROW_REMAP_PENDING")
        assert (ev.attrs["correctable"], ev.attrs["uncorrectable"]) == (0, 1)
        assert not of(t.update(busy(remap=RemapReading(0, 1, True, False)), T0 + 2), ERR)
        events = t.update(busy(remap=RemapReading(0, 1, False, True)), T0 + 3)
        assert one(events, ERR, "ROW_REMAP_FAILURE")
        assert one(events, ERR, "OK").attrs["code"] == "ROW_REMAP_PENDING"
        assert one(t.update(busy(remap=RemapReading(0, 0, False, False)), T0 + 4), ERR, "OK").attrs["code"] == (
            "ROW_REMAP_FAILURE"
        )

    def test_pcie_degraded_only_under_load_and_ok_on_recovery(self) -> None:
        t = tracker()
        slow = PcieReading(gen=1, max_gen=5, width=16, max_width=16)
        idle = GpuReading(util_gpu=0, pcie=slow)
        assert not of(t.update(idle, T0), LINK)  # GPUs downtrain at idle: not a fault
        assert not of(t.update(GpuReading(util_gpu=10, pcie=slow), T0), LINK)  # 10 % is not busy
        ev = one(t.update(busy(pcie=slow), T0 + 1), LINK, "PCIE_DEGRADED", "gpu-0/pcie")
        assert dict(ev.attrs) == {"width": 16, "max_width": 16, "gen": 1, "max_gen": 5}
        assert not of(t.update(busy(pcie=slow), T0 + 2), LINK)  # a condition: once
        narrow = PcieReading(gen=5, max_gen=5, width=8, max_width=16)
        assert one(t.update(busy(pcie=narrow), T0 + 3), LINK, "PCIE_DEGRADED").attrs["width"] == 8
        assert not of(t.update(idle, T0 + 4), LINK)  # idle: cannot tell, keep the state
        ok = one(t.update(busy(pcie=PcieReading(5, 5, 16, 16)), T0 + 5), LINK, "OK", "gpu-0/pcie")
        assert ok.attrs["code"] == "PCIE_DEGRADED"
        assert not of(t.update(busy(pcie=PcieReading(5, 5, 16, 16)), T0 + 6), LINK)

    def test_nvlink_down_only_for_a_link_seen_up(self) -> None:
        t = tracker()
        assert not of(t.update(busy(nvlink={0: True, 1: True, 2: False}), T0), LINK)  # 2 never up
        ev = one(t.update(busy(nvlink={0: True, 1: False, 2: False}), T0 + 1), LINK, "NVLINK_DOWN", "gpu-0/nvlink-1")
        assert ev.attrs["link"] == 1
        assert not of(t.update(busy(nvlink={0: True, 1: False, 2: False}), T0 + 2), LINK)
        ok = one(t.update(busy(nvlink={0: True, 1: True, 2: True}), T0 + 3), LINK, "OK", "gpu-0/nvlink-1")
        assert ok.attrs["code"] == "NVLINK_DOWN"

    def test_link_error_counters_become_drop_deltas(self) -> None:
        t = tracker()
        assert not of(t.update(busy(nvlink_errors={(3, "crc_flit"): 10}, pcie_replay=5), T0), DROP)
        events = t.update(busy(nvlink_errors={(3, "crc_flit"): 17}, pcie_replay=5), T0 + 2000)
        ev = one(events, DROP, "7", "gpu-0/nvlink-3")
        assert dict(ev.attrs) == {"counter": "crc_flit", "interval_s": 2.0}
        ev = one(t.update(busy(nvlink_errors={(3, "crc_flit"): 17}, pcie_replay=9), T0 + 3000), DROP, "4", "gpu-0/pcie")
        assert ev.attrs["counter"] == "pcie_replay"

    def test_processes_consume_the_gpu(self) -> None:
        t = tracker()
        reading = busy(
            processes=(ProcessReading(H100_PID, H100_PROC_MEM), ProcessReading(600, None)),
            proc_util={H100_PID: 100},
        )
        events = t.update(reading, T0)
        assert one(events, UTIL, "100", "gpu-0", pid=H100_PID)
        mem = one(events, MEM, entity="gpu-0", pid=H100_PID)
        assert (mem.value, mem.attrs["used_mib"], mem.attrs["total_mib"]) == ("1.7", 1386, 81559)
        assert one(events, UTIL, "0", "gpu-0", pid=600)  # listed, no samples: idle
        assert one(events, MEM, "0.0", pid=600).attrs["mem_unknown"] is True
        assert reading.pids() == {H100_PID, 600}
        # Per-process utilisation unavailable: memory only.
        events = t.update(busy(processes=(ProcessReading(H100_PID, H100_PROC_MEM),), proc_util=None), T0 + 1)
        assert not of(events, UTIL, pid=H100_PID)
        assert one(events, MEM, pid=H100_PID)

    def test_mig_instances(self) -> None:
        t = tracker()
        gib = 1024**3
        inst = MigReading(1, "MIG-abc", 10 * gib, 40 * gib, (ProcessReading(700, 5 * gib),))
        reading = GpuReading(mem_used=11 * gib, mem_total=80 * gib, mig_enabled=True, mig=(inst,))
        events = t.update(reading, T0)
        mem = one(events, MEM, entity="gpu-0/mig-1", pid=None)
        assert (mem.value, mem.attrs["used_mib"], mem.attrs["total_mib"], mem.attrs["uuid"]) == (
            "25.0",
            10240,
            40960,
            "MIG-abc",
        )
        proc = one(events, MEM, entity="gpu-0/mig-1", pid=700)
        assert proc.value == "12.5"
        assert not of(events, UTIL)
        assert reading.pids() == {700}
        assert "uuid" not in one(t.update(reading, T0 + 1), MEM, entity="gpu-0/mig-1", pid=None).attrs

    def test_lost_once_then_recovered(self) -> None:
        t = tracker()
        ev = one(t.mark_lost(T0, "nvmlDeviceGetMemoryInfo"), ERR, "GPU_LOST", "gpu-0")
        assert (ev.attrs["fn"], ev.attrs["uuid"], ev.attrs["pci_bus_id"]) == (
            "nvmlDeviceGetMemoryInfo",
            H100_UUID,
            H100_BUS,
        )
        assert t.mark_lost(T0 + 1, "x") == []
        assert one(t.mark_recovered(T0 + 2), ERR, "OK").attrs["code"] == "GPU_LOST"
        assert t.mark_recovered(T0 + 3) == []

    def test_xid_and_hung_events(self) -> None:
        ev = xid_event(T0, 0, 31)
        assert (ev.type, ev.entity, ev.value, ev.pid, ev.attrs["source"], ev.attrs["xid"]) == (
            ERR,
            "gpu-0",
            "XID_31",
            None,
            "nvml",
            31,
        )
        assert xid_event(T0, 2, 79, gpu_instance=3).attrs["gpu_instance"] == 3
        hung = hung_event(T0, "nvmlDeviceGetTemperature", 5.0)
        assert (hung.entity, hung.value, hung.attrs["fn"]) == ("probe:nvml", "PROBE_HUNG", "nvmlDeviceGetTemperature")


# --- wrapper ----------------------------------------------------------------------------------


class TestWrapper:
    def test_not_supported_is_none_and_logged_once(self, fake: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
        fake.not_supported("nvmlDeviceGetPowerUsage")
        nv = Nvml(fake, timeout_s=2)
        h = fake.nvmlDeviceGetHandleByIndex(0)
        with caplog.at_level(logging.INFO, logger="xctl.probes.nvml_wrap"):
            assert nv.call("nvmlDeviceGetPowerUsage", h, gpu=0) is None
            assert nv.call("nvmlDeviceGetPowerUsage", h, gpu=0) is None
        nv.close()
        notes = [r for r in caplog.records if "nvmlDeviceGetPowerUsage" in r.getMessage()]
        assert len(notes) == 1
        assert notes[0].levelno == logging.INFO
        assert fake.calls["nvmlDeviceGetPowerUsage"] == 1  # remembered: not asked again
        assert nv.unsupported() == {"nvmlDeviceGetPowerUsage"}

    def test_function_not_found_or_absent_is_none(self, fake: FakeNvml) -> None:
        nv = Nvml(fake)
        h = fake.nvmlDeviceGetHandleByIndex(0)
        fake.remove("nvmlDeviceGetCurrentClocksEventReasons")
        assert nv.call("nvmlDeviceGetCurrentClocksEventReasons", h, gpu=0) is None
        fake.fail("nvmlDeviceGetPcieReplayCounter", 13)
        assert nv.call("nvmlDeviceGetPcieReplayCounter", h, gpu=0) is None
        assert nv.is_unsupported("nvmlDeviceGetPcieReplayCounter", 0)
        nv.close()

    def test_not_found_is_none_and_asked_again(self, fake: FakeNvml) -> None:
        nv = Nvml(fake)
        h = fake.nvmlDeviceGetHandleByIndex(0)
        for _ in range(2):
            assert nv.call("nvmlDeviceGetProcessUtilization", h, 0, gpu=0) is None
        assert fake.calls["nvmlDeviceGetProcessUtilization"] == 2
        nv.close()

    def test_gpu_is_lost_raises_gpu_lost(self, fake: FakeNvml) -> None:
        nv = Nvml(fake)
        h = fake.nvmlDeviceGetHandleByIndex(0)
        fake.lose(0)
        with pytest.raises(GpuLost) as info:
            nv.call("nvmlDeviceGetTemperature", h, 0, gpu=0)
        assert (info.value.index, info.value.fn) == (0, "nvmlDeviceGetTemperature")
        nv.close()

    def test_other_errors_carry_their_code(self, fake: FakeNvml) -> None:
        nv = Nvml(fake)
        fake.fail("nvmlDeviceGetCount", 4)
        with pytest.raises(NvmlCallError) as info:
            nv.call("nvmlDeviceGetCount")
        assert info.value.code == 4
        assert "Insufficient Permissions" in str(info.value)
        nv.close()

    def test_hung_call_times_out_and_later_calls_fail_fast(self, fake: FakeNvml) -> None:
        release = fake.hang("nvmlDeviceGetCount")
        nv = Nvml(fake, timeout_s=HUNG_TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(NvmlHung) as info:
            nv.call("nvmlDeviceGetCount")
        assert time.monotonic() - started < HUNG_TIMEOUT_S + MARGIN_S
        assert info.value.fn == "nvmlDeviceGetCount"
        assert nv.hung == "nvmlDeviceGetCount"
        started = time.monotonic()
        with pytest.raises(NvmlHung):
            nv.call("nvmlDeviceGetName", None)
        assert time.monotonic() - started < 0.1
        release.set()
        nv.close()

    def test_batch_runs_calls_directly_on_the_worker_and_names_the_hung_one(self, fake: FakeNvml) -> None:
        nv = Nvml(fake, timeout_s=HUNG_TIMEOUT_S)
        h = fake.nvmlDeviceGetHandleByIndex(0)
        threads: set[int] = set()

        def work() -> int:
            threads.add(threading.get_ident())
            temp = nv.call("nvmlDeviceGetTemperature", h, 0, gpu=0)
            threads.add(threading.get_ident())
            assert isinstance(temp, int)
            return temp

        assert nv.batch("gpu-0", work) == 35
        assert len(threads) == 1
        assert threading.get_ident() not in threads
        release = fake.hang("nvmlDeviceGetPowerUsage")

        def stuck() -> object:
            nv.call("nvmlDeviceGetTemperature", h, 0, gpu=0)
            return nv.call("nvmlDeviceGetPowerUsage", h, gpu=0)

        with pytest.raises(NvmlHung) as info:
            nv.batch("gpu-0 sample", stuck)
        assert info.value.fn == "nvmlDeviceGetPowerUsage"
        release.set()
        nv.close()

    def test_the_deadline_is_per_call_not_per_batch(self, fake: FakeNvml) -> None:
        fake.slow("nvmlDeviceGetTemperature", 0.1)
        nv = Nvml(fake, timeout_s=HUNG_TIMEOUT_S)
        h = fake.nvmlDeviceGetHandleByIndex(0)
        temps = nv.batch("gpu-0", lambda: [nv.call("nvmlDeviceGetTemperature", h, 0, gpu=0) for _ in range(5)])
        assert temps == [35] * 5  # 0.5 s in all, no single call near the 0.3 s limit
        assert nv.hung is None
        nv.close()

    def test_nvml_success_raised_by_a_two_call_query_is_none(self, fake: FakeNvml) -> None:
        fake.fail("nvmlDeviceGetProcessUtilization", 0)
        nv = Nvml(fake)
        assert nv.call("nvmlDeviceGetProcessUtilization", fake.nvmlDeviceGetHandleByIndex(0), 0, gpu=0) is None
        nv.close()

    def test_too_many_stuck_workers_refuse_a_new_wrapper(self, fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
        wait_for(lambda: nvml_wrap.abandoned_workers() == 0, timeout=3.0,
                 what="earlier tests' released hangs to end")
        monkeypatch.setattr(nvml_wrap, "MAX_ABANDONED", 1)
        release = fake.hang("nvmlDeviceGetCount")
        nv = Nvml(fake, timeout_s=0.1)
        with pytest.raises(NvmlHung):
            nv.call("nvmlDeviceGetCount")
        with pytest.raises(ProbeError, match="still hung"):
            Nvml(fake)
        release.set()
        wait_for(lambda: nvml_wrap.abandoned_workers() == 0, timeout=3.0, what="the released worker to end")
        Nvml(fake).close()


# --- the probe against the fake -------------------------------------------------------------------


def test_importing_the_probe_does_not_import_pynvml() -> None:
    code = "import sys, xctl.probes.nvml, xctl.probes.registry; assert 'pynvml' not in sys.modules, 'imported'"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_without_pynvml_the_probe_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    with pytest.raises(ProbeError, match=r"NVML not available: install xctl\[gpu\]"):
        NvmlProbe()
    with pytest.raises(ProbeError, match=r"install xctl\[gpu\]"):
        make_probe("nvml")


def test_spec() -> None:
    probe = make_probe("nvml:interval=2s,timeout=3s,xid=off,nvlink_counters=no")
    assert isinstance(probe, NvmlProbe)
    assert (probe.interval_s, probe.timeout_s, probe.xid, probe.nvlink_counters) == (2.0, 3.0, False, False)
    assert probe.heartbeat_s is not None
    assert probe.heartbeat_s > 2.0 + 3.0
    assert "not initialised" in probe.describe()
    default = NvmlProbe.from_spec(None)
    assert (default.interval_s, default.timeout_s, default.xid) == (1.0, 5.0, True)
    with pytest.raises(ProbeError, match="unknown key"):
        NvmlProbe.from_spec("every=2s")
    with pytest.raises(ProbeError, match="xid=on or xid=off"):
        NvmlProbe.from_spec("xid=maybe")
    with pytest.raises(ProbeError, match="interval"):
        NvmlProbe.from_spec("interval=0s")


def test_idle_h100(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    probe = new_probe(probes, fake)
    events = probe.sample(T0)
    util = one(events, UTIL, "0", "gpu-0", pid=None)
    assert dict(util.attrs) == {
        "mem_util": 0,
        "temp_c": 35,
        "power_w": 111.8,
        "sm_clock_mhz": 1980,
        "uuid": H100_UUID,
        "pci_bus_id": H100_BUS,
        "name": H100_NAME,
    }
    mem = one(events, MEM, entity="gpu-0", pid=None)
    assert (mem.value, mem.attrs["used_mib"], mem.attrs["total_mib"]) == ("0.6", 480, 81559)
    assert len(events) == 2  # idle bit, no ECC/remap/PCIe/NVLink trouble, no processes
    assert probe.pci_to_index() == {H100_BUS: 0}
    assert probe.gpu_index("0000:00:06") == 0
    assert probe.gpu_index("0000:00:07.0") is None
    assert probe.gpu_pids() == set()
    text = probe.describe()
    assert "1 GPU(s) (NVIDIA H100 80GB HBM3)" in text
    assert "NVLink: not supported" in text
    assert fake.calls["nvmlDeviceGetNvLinkState"] == 1  # found at start, never asked again
    assert fake.calls["nvmlDeviceGetProcessUtilization"] == 0  # no processes: not asked
    second = probe.sample(T0 + 1000)
    assert "uuid" not in one(second, UTIL).attrs


def test_workload_builds_consumes_edges(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    probe = new_probe(probes, fake)
    probe.sample(T0)
    fake.run_workload(0, pid=H100_PID)
    events = probe.sample(T0 + 1000)
    assert one(events, UTIL, "100", "gpu-0", pid=None).attrs["power_w"] == 696.1
    assert one(events, UTIL, "100", "gpu-0", pid=H100_PID)
    proc_mem = one(events, MEM, entity="gpu-0", pid=H100_PID)
    assert (proc_mem.value, proc_mem.attrs["used_mib"]) == ("1.7", 1386)
    assert probe.gpu_pids() == {H100_PID}
    assert fake.last_putil_ts[0] == (T0 + 1000) * 1000 - 2_000_000  # first ask: the last 2 s
    probe.sample(T0 + 2000)
    assert fake.last_putil_ts[0] == (T0 + 1000) * 1000  # then: since the previous ask
    fake.gpus[0].processes = []
    assert not of(probe.sample(T0 + 3000), UTIL, pid=H100_PID)
    assert probe.gpu_pids() == set()


def test_process_before_its_first_utilisation_sample(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    fake.gpus[0].processes = [(4812, 512 * 1024**2)]  # listed, but NotFound from process utilisation
    events = new_probe(probes, fake).sample(T0)
    assert one(events, UTIL, "0", "gpu-0", pid=4812)
    assert one(events, MEM, entity="gpu-0", pid=4812).attrs["used_mib"] == 512


def test_not_supported_metric_is_left_out_quietly(
    fake: FakeNvml, probes: list[NvmlProbe], caplog: pytest.LogCaptureFixture
) -> None:
    fake.not_supported("nvmlDeviceGetPowerUsage")
    probe = new_probe(probes, fake)
    with caplog.at_level(logging.INFO):
        first, second = probe.sample(T0), probe.sample(T0 + 1000)
    for events in (first, second):
        assert "power_w" not in one(events, UTIL, pid=None).attrs
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 1
    assert len([r for r in caplog.records if "nvmlDeviceGetPowerUsage" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "PowerUsage" in probe.describe()


def test_clock_reasons_through_the_older_throttle_name(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    fake.remove("nvmlDeviceGetCurrentClocksEventReasons")
    fake.gpus[0].clock_reasons = 0x40
    probe = new_probe(probes, fake)
    assert one(probe.sample(T0), ERR, "CLOCK_EVENT_HW_THERMAL", "gpu-0")
    fake.gpus[0].clock_reasons = 0x0
    assert one(probe.sample(T0 + 1000), ERR, "OK", "gpu-0").attrs["code"] == "CLOCK_EVENT_HW_THERMAL"
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 2


def test_faults_through_the_fake(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    g = fake.gpus[0]
    g.nvlink = [1, 1, 1, 1]
    probe = new_probe(probes, fake)
    assert not of(probe.sample(T0), ERR)
    fake.run_workload(0)
    g.clock_reasons = 0x4 | 0x80
    g.ecc_dbe = 1
    g.remap = (0, 1, 1, 0)
    g.pcie_gen, g.pcie_width = 4, 8
    g.nvlink[2] = 0
    g.nvlink_errors[(1, 2)] = 3  # crc_flit on link 1
    events = probe.sample(T0 + 1000)
    assert {e.value for e in of(events, ERR)} == {
        "CLOCK_EVENT_SW_POWER_CAP",
        "CLOCK_EVENT_HW_POWER_BRAKE",
        "ECC_DBE",
        "ROW_REMAP_PENDING",
    }
    assert one(events, ERR, "ECC_DBE").attrs["count"] == 1
    pcie = one(events, LINK, "PCIE_DEGRADED", "gpu-0/pcie")
    assert dict(pcie.attrs) == {"width": 8, "max_width": 16, "gen": 4, "max_gen": 5}
    assert one(events, LINK, "NVLINK_DOWN", "gpu-0/nvlink-2")
    assert one(events, DROP, "3", "gpu-0/nvlink-1").attrs["counter"] == "crc_flit"
    assert "NVLink: not supported" not in probe.describe()


def test_pcie_downtrain_at_idle_is_not_reported(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    fake.gpus[0].pcie_gen = 1  # an idle H100 lowers its link speed
    probe = new_probe(probes, fake)
    assert not of(probe.sample(T0), LINK)
    fake.run_workload(0)
    fake.gpus[0].pcie_gen = 5
    assert not of(probe.sample(T0 + 1000), LINK)


def test_lost_gpu_is_reported_once_and_the_others_go_on(probes: list[NvmlProbe]) -> None:
    fake = FakeNvml(gpus=2)
    probe = new_probe(probes, fake)
    assert len(of(probe.sample(T0), UTIL)) == 2
    fake.lose(1)
    events = probe.sample(T0 + 1000)
    lost = one(events, ERR, "GPU_LOST", "gpu-1")
    assert lost.attrs["uuid"] == fake.gpus[1].uuid
    assert lost.attrs["pci_bus_id"] == "00000000:28:00.0"
    assert one(events, UTIL, entity="gpu-0")
    before = sum(fake.calls.values())
    events = probe.sample(T0 + 2000)
    assert not of(events, ERR)
    assert not of(events, UTIL, entity="gpu-1")
    assert sum(fake.calls.values()) - before < 20  # gpu-1 is not asked any more
    assert "lost: gpu-1" in probe.describe()
    fake.gpus[1].lost = False  # e.g. after a reset: noticed at the next retry
    found = [e for i in range(LOST_RETRY_SAMPLES) for e in probe.sample(T0 + 3000 + i * 1000)]
    assert one(found, ERR, "OK", "gpu-1").attrs["code"] == "GPU_LOST"
    assert of(probe.sample(T0 + 99_000), UTIL, entity="gpu-1")


def test_gpu_lost_before_start(probes: list[NvmlProbe]) -> None:
    fake = FakeNvml(gpus=2)
    fake.lose(0)
    probe = new_probe(probes, fake)
    events = probe.sample(T0)
    assert one(events, ERR, "GPU_LOST", "gpu-0").attrs["fn"] == "nvmlDeviceGetHandleByIndex"
    assert one(events, UTIL, entity="gpu-1")
    assert probe.pci_to_index() == {"00000000:28:00.0": 1}


def test_hung_call_gives_probe_hung_within_the_timeout(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    probe = new_probe(probes, fake, timeout_s=HUNG_TIMEOUT_S)
    probe.sample(T0)
    fake.hang("nvmlDeviceGetTemperature")
    started = time.monotonic()
    events = probe.sample(T0 + 1000)
    assert time.monotonic() - started < HUNG_TIMEOUT_S + MARGIN_S
    hung = one(events, ERR, "PROBE_HUNG", "probe:nvml")
    assert hung.attrs["fn"] == "nvmlDeviceGetTemperature"
    assert hung.attrs["timeout_s"] == HUNG_TIMEOUT_S
    started = time.monotonic()
    assert probe.sample(T0 + 2000) == []
    assert time.monotonic() - started < 0.1
    assert "hung in nvmlDeviceGetTemperature" in probe.describe()
    probe.close()  # must not wait for the stuck call


def test_hung_init(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    fake.hang("nvmlInit")
    events = new_probe(probes, fake, timeout_s=HUNG_TIMEOUT_S).sample(T0)
    assert one(events, ERR, "PROBE_HUNG", "probe:nvml").attrs["fn"] == "nvmlInit"


def test_init_failure_is_a_probe_error(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    fake.fail("nvmlInit", 9)  # Driver Not Loaded
    with pytest.raises(ProbeError, match="driver"):
        new_probe(probes, fake).sample(T0)


def test_mig_enabled_gpu(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    gib = 1024**3
    g = fake.gpus[0]
    g.mig_mode = (1, 1)
    g.mig_devices = [(1, 40 * gib, 10 * gib, [(700, 5 * gib)]), (2, 20 * gib, 1 * gib, [])]
    probe = new_probe(probes, fake)
    events = probe.sample(T0)
    assert not of(events, UTIL)  # NVML has no utilisation on a MIG-enabled GPU
    gpu_mem = one(events, MEM, entity="gpu-0", pid=None)
    assert gpu_mem.attrs["temp_c"] == 35
    assert gpu_mem.attrs["uuid"] == H100_UUID
    assert str(one(events, MEM, "25.0", "gpu-0/mig-1", pid=None).attrs["uuid"]).startswith("MIG-")
    assert one(events, MEM, "5.0", "gpu-0/mig-2", pid=None)
    assert one(events, MEM, "12.5", "gpu-0/mig-1", pid=700)
    assert probe.gpu_pids() == {700}
    assert "MIG enabled" in probe.describe()
    assert "not available from NVML" in probe.describe()


def test_xid_thread_reports_xids_and_stops_quickly(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    probe = new_probe(probes, fake, xid=True, xid_wait_ms=100)
    probe.open()
    assert "XID events: NVML event set" in probe.describe()
    got: list[Event] = []
    clock = ManualClock(T0)
    assert probe.start_xid(got.append, clock)
    assert probe.xid_running()
    fake.xid(0, 31)
    wait_for(lambda: len(got) == 1, timeout=3.0, what="one XID event")
    ev = got[0]
    assert (ev.type, ev.entity, ev.value, ev.pid, ev.ts) == (ERR, "gpu-0", "XID_31", None, T0)
    assert ev.attrs["source"] == "nvml"
    assert "gpu_instance" not in ev.attrs
    started = time.monotonic()
    assert probe.stop_xid()
    assert time.monotonic() - started < 1.0
    assert not probe.xid_running()
    probe.close()
    assert fake.event_sets[0].freed
    assert fake.initialised == 0


def test_xid_registration_not_supported(fake: FakeNvml, probes: list[NvmlProbe]) -> None:
    fake.register_events_supported = False
    probe = new_probe(probes, fake, xid=True)
    probe.open()
    assert "XID events: from the kernel log only" in probe.describe()
    assert not probe.start_xid(lambda e: None, ManualClock(T0))


class _Ctx:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.beats = 0
        self.ctx = ProbeContext("node-1", ManualClock(T0), self.events.append, self._beat, lambda r: None)

    def _beat(self) -> None:
        self.beats += 1


def test_run_loop_samples_relays_xids_and_stops(fake: FakeNvml) -> None:
    probe = NvmlProbe(fake, interval_s=0.05, xid_wait_ms=100)
    c = _Ctx()
    thread = threading.Thread(target=probe.run, args=(c.ctx,), daemon=True)
    thread.start()
    wait_for(lambda: c.beats >= 2, timeout=3.0, what="two heartbeats")
    assert probe.xid_running()
    fake.xid(0, 79)
    wait_for(lambda: of(list(c.events), ERR, "XID_79", "gpu-0"), timeout=3.0, what="the XID 79 event")
    c.ctx.stop.set()
    thread.join(2.0)
    assert not thread.is_alive()
    assert not probe.xid_running()
    assert fake.initialised == 0
    assert fake.event_sets[0].freed


def test_run_loop_stops_beating_when_hung(fake: FakeNvml) -> None:
    probe = NvmlProbe(fake, interval_s=0.05, timeout_s=HUNG_TIMEOUT_S, xid_wait_ms=100)
    c = _Ctx()
    thread = threading.Thread(target=probe.run, args=(c.ctx,), daemon=True)
    thread.start()
    wait_for(lambda: c.beats >= 1, timeout=3.0, what="a heartbeat")
    fake.hang("nvmlDeviceGetMemoryInfo")
    wait_for(lambda: of(list(c.events), ERR, "PROBE_HUNG"), timeout=HUNG_TIMEOUT_S + 2, what="PROBE_HUNG")
    beats = c.beats
    wait_for(lambda: not probe.xid_running(), timeout=3.0, what="the XID thread to stop")
    assert c.beats == beats  # no beat after the hang: the supervisor reports it and restarts
    c.ctx.stop.set()
    thread.join(2.0)
    assert not thread.is_alive()


def test_supervisor_reports_the_hung_probe_and_restarts_it(fake: FakeNvml) -> None:
    from xctl.agent.supervisor import Supervisor

    instances: list[NvmlProbe] = []

    def factory() -> NvmlProbe:
        p = NvmlProbe(fake, interval_s=0.05, timeout_s=HUNG_TIMEOUT_S, xid=False)
        p.heartbeat_s = 0.5  # the default (≥ 10 s + timeout) is too slow for a unit test
        instances.append(p)
        return p

    sup = Supervisor("node-1", ManualClock(T0))
    slot = sup.add("nvml", factory)
    sup.start()
    try:
        wait_for(lambda: any(e.type is UTIL for e in sup.drain()), timeout=3.0, what="a utilisation sample")
        release = fake.hang("nvmlDeviceGetMemoryInfo")
        events: list[Event] = []

        def hung_twice() -> bool:
            sup.check()
            events.extend(sup.drain())
            return len(of(events, ERR, "PROBE_HUNG", "probe:nvml")) >= 2

        wait_for(hung_twice, timeout=5.0, what="two PROBE_HUNG")  # the probe's own (with fn) and the supervisor's
        assert of(events, ERR, "PROBE_HUNG", "probe:nvml")[0].attrs["fn"] == "nvmlDeviceGetMemoryInfo"
        release.set()  # the driver recovers: the restarted instance samples again

        def sampling_again() -> bool:
            sup.check()
            return len(instances) >= 2 and any(e.type is UTIL for e in sup.drain())

        wait_for(sampling_again, timeout=5.0, what="the restarted probe to sample again")
        assert slot.hangs >= 1
    finally:
        fake.release_all()
        sup.stop()
