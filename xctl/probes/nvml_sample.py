"""Pure NVML sampling: plain readings (dataclasses) → events. No NVML, no threads, no I/O.

:class:`GpuTracker` keeps the little state one GPU needs between samples (previous counters,
active clocks-event reasons, links seen up) and turns one :class:`GpuReading` into events.
``None`` in a reading always means "not available" (NotSupported, not yet known), never 0,
and produces no event and no state change.

Events, per GPU ``gpu-N`` (DESIGN §3)::

    compute.util  gpu-N          value util %    attrs mem_util, temp_c, power_w, sm_clock_mhz
                                                 (+ uuid, pci_bus_id, name on the first sample
                                                 and every ``identity_every`` samples)
    compute.mem   gpu-N          value used %    attrs used_mib, total_mib
    compute.util  gpu-N  pid=P   value SM %      (per-process; "0" when the process had no
                                                 utilisation samples this interval)
    compute.mem   gpu-N  pid=P   value used %    attrs used_mib, total_mib
    error.hw      gpu-N          CLOCK_EVENT_*   every sample while active; attrs reasons
                                                 (hex bit mask), temp_c, power_w
    error.hw      gpu-N          OK              attrs code=CLOCK_EVENT_* when it clears
    error.hw      gpu-N          ECC_DBE         volatile uncorrected count went up; attrs
                                                 count (the delta), total. OK code=ECC_DBE
                                                 when the counter resets (driver reload/reset)
    error.hw      gpu-N          ROW_REMAP_PENDING / ROW_REMAP_FAILURE on onset; attrs
                                                 correctable, uncorrectable; OK code=… on clear
    error.hw      gpu-N          GPU_LOST        once; attrs fn (the call that saw it), uuid,
                                                 pci_bus_id; OK code=GPU_LOST on recovery
    topo.link_down gpu-N/pcie    PCIE_DEGRADED   only while busy (util > 10 %); attrs gen,
                                                 max_gen, width, max_width; OK on recovery
    topo.link_down gpu-N/nvlink-L NVLINK_DOWN    a link seen up went down; OK when back up
    transport.drop gpu-N/nvlink-L counter delta  attrs counter (replay/recovery/crc_flit),
                                                 interval_s; only when the delta is > 0
    transport.drop gpu-N/pcie    counter delta   attrs counter=pcie_replay, interval_s

MIG-enabled GPUs add, per GPU instance, ``compute.mem gpu-N/mig-G`` (attrs used_mib,
total_mib, uuid) and per-process ``compute.mem gpu-N/mig-G pid=P``; NVML has no utilisation
per MIG instance or per process on MIG, so none is reported. Temperature, power and SM clock
are attrs of the ``compute.util`` event (DESIGN has no temperature type); when the GPU has no
utilisation reading (MIG) they move to the ``compute.mem`` event.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from xctl.core.events import AttrValue, Event, EventType

#: clocks-event reason bit → error.hw value. GPU idle (0x1), application clocks (0x2), sync
#: boost (0x10) and display clock (0x100) are not faults and are ignored.
CLOCK_EVENT_BITS: Final[Mapping[int, str]] = MappingProxyType(
    {
        0x4: "CLOCK_EVENT_SW_POWER_CAP",
        0x8: "CLOCK_EVENT_HW_SLOWDOWN",
        0x20: "CLOCK_EVENT_SW_THERMAL",
        0x40: "CLOCK_EVENT_HW_THERMAL",
        0x80: "CLOCK_EVENT_HW_POWER_BRAKE",
    }
)
#: A GPU above this utilisation (%) is busy: only then is a slow PCIe link a fault.
BUSY_UTIL_PCT: Final = 10
#: Identity attrs (uuid, pci_bus_id, name) go on the first sample and then every N samples.
IDENTITY_EVERY: Final = 60
MIB: Final = 1024 * 1024
OK: Final = "OK"

_BUS_RE: Final = re.compile(r"^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})(?:\.([0-7]))?$")


def normalize_bus_id(text: str | bytes) -> str | None:
    """Any PCI address form → NVML's, lower-case: ``0000:00:06`` → ``00000000:00:06.0``.

    Accepts NVML's ``00000000:3B:00.0``, sysfs ``0000:3b:00.0``, the kernel log's
    ``0000:00:06`` and a bare ``3b:00.0``. ``None`` if it is not a PCI address.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    m = _BUS_RE.match(text.strip().rstrip("\x00"))
    if m is None:
        return None
    domain, bus, dev = int(m.group(1) or "0", 16), int(m.group(2), 16), int(m.group(3), 16)
    if dev > 0x1F:
        return None
    return f"{domain:08x}:{bus:02x}:{dev:02x}.{int(m.group(4) or '0')}"


def pct(used: float, total: float) -> str:
    """``used`` as a percentage of ``total``, one decimal (the value of compute.mem)."""
    if total <= 0:
        return "0.0"
    return f"{min(100.0, max(0.0, 100.0 * used / total)):.1f}"


def gpu_entity(index: int) -> str:
    return f"gpu-{index}"


# -- readings -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuIdentity:
    """What does not change: index, UUID, normalised PCI bus id, product name."""

    index: int
    uuid: str = ""
    pci_bus_id: str = ""
    name: str = ""

    @property
    def entity(self) -> str:
        return gpu_entity(self.index)

    def attrs(self) -> dict[str, AttrValue]:
        out: dict[str, AttrValue] = {}
        if self.uuid:
            out["uuid"] = self.uuid
        if self.pci_bus_id:
            out["pci_bus_id"] = self.pci_bus_id
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True, slots=True)
class ProcessReading:
    """One compute process of ``nvmlDeviceGetComputeRunningProcesses``; bytes may be unknown."""

    pid: int
    used_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class RemapReading:
    """``nvmlDeviceGetRemappedRows``: (correctable, uncorrectable, pending, failure)."""

    correctable: int = 0
    uncorrectable: int = 0
    pending: bool = False
    failure: bool = False


@dataclass(frozen=True, slots=True)
class PcieReading:
    gen: int
    max_gen: int
    width: int
    max_width: int

    @property
    def degraded(self) -> bool:
        return self.gen < self.max_gen or self.width < self.max_width


@dataclass(frozen=True, slots=True)
class MigReading:
    """One MIG GPU instance (``gi_id`` = NVML's GPU instance id) of a MIG-enabled GPU."""

    gi_id: int
    uuid: str = ""
    mem_used: int | None = None
    mem_total: int | None = None
    processes: tuple[ProcessReading, ...] | None = None


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One sampling pass over one GPU. ``None`` = not available this time."""

    util_gpu: int | None = None
    util_mem: int | None = None
    mem_used: int | None = None
    mem_total: int | None = None
    temp_c: int | None = None
    power_mw: int | None = None
    sm_clock_mhz: int | None = None
    clock_reasons: int | None = None
    ecc_dbe: int | None = None
    remap: RemapReading | None = None
    pcie: PcieReading | None = None
    pcie_replay: int | None = None
    #: link → active, only for links whose state NVML reports.
    nvlink: Mapping[int, bool] = field(default_factory=dict)
    #: (link, counter name) → cumulative count.
    nvlink_errors: Mapping[tuple[int, str], int] = field(default_factory=dict)
    #: None = process list unavailable.
    processes: tuple[ProcessReading, ...] | None = None
    #: pid → SM %; None = per-process utilisation unavailable; {} = no samples (all idle).
    proc_util: Mapping[int, int] | None = None
    mig_enabled: bool = False
    mig: tuple[MigReading, ...] = ()

    def pids(self) -> set[int]:
        out = {p.pid for p in self.processes or ()}
        for inst in self.mig:
            out.update(p.pid for p in inst.processes or ())
        return out


# -- events ---------------------------------------------------------------------------------------


def hung_event(now_ms: int, fn: str, timeout_s: float, entity: str = "probe:nvml") -> Event:
    """``error.hw PROBE_HUNG`` on ``probe:nvml``: an NVML call did not return in time."""
    attrs: dict[str, AttrValue] = {
        "fn": fn,
        "timeout_s": timeout_s,
        "detail": f"NVML call {fn} did not return within {timeout_s:g} s",
    }
    return Event(now_ms, EventType.ERROR_HW, entity, "PROBE_HUNG", attrs=attrs)


def xid_event(now_ms: int, index: int | None, xid: int, *, gpu_instance: int | None = None) -> Event:
    """``error.hw XID_<n>`` from NVML's event set (no pid: the kernel log line has it)."""
    attrs: dict[str, AttrValue] = {"source": "nvml", "xid": xid}
    if gpu_instance is not None:
        attrs["gpu_instance"] = gpu_instance
    entity = gpu_entity(index) if index is not None else "gpu-unknown"
    return Event(now_ms, EventType.ERROR_HW, entity, f"XID_{xid}", attrs=attrs)


def _err(now_ms: int, entity: str, code: str, attrs: Mapping[str, AttrValue] | None = None) -> Event:
    return Event(now_ms, EventType.ERROR_HW, entity, code, attrs=dict(attrs) if attrs else {})


def _ok(now_ms: int, etype: EventType, entity: str, code: str, extra: Mapping[str, AttrValue] | None = None) -> Event:
    attrs: dict[str, AttrValue] = {"code": code}
    if extra:
        attrs.update(extra)
    return Event(now_ms, etype, entity, OK, attrs=attrs)


def _mem_attrs(used: int, total: int) -> dict[str, AttrValue]:
    return {"used_mib": used // MIB, "total_mib": total // MIB}


class GpuTracker:
    """The between-samples state of one GPU; :meth:`update` turns a reading into events."""

    def __init__(self, identity: GpuIdentity, *, identity_every: int = IDENTITY_EVERY) -> None:
        self.identity = identity
        self.identity_every = max(1, identity_every)
        self.samples = 0
        self.lost = False
        self._clock_active: set[str] = set()
        self._ecc_dbe: int | None = None
        self._ecc_reported = False
        self._remap_pending = False
        self._remap_failure = False
        self._pcie_reported: PcieReading | None = None
        self._link_up: dict[int, bool] = {}
        self._link_down_reported: set[int] = set()
        self._counters: dict[tuple[str, str], int] = {}
        self._mig_seen: set[int] = set()
        self._last_ms: int | None = None

    @property
    def entity(self) -> str:
        return self.identity.entity

    # -- lost / recovered --

    def mark_lost(self, now_ms: int, fn: str) -> list[Event]:
        """The GPU answered GPU_IS_LOST: one GPU_LOST event (only the first time)."""
        if self.lost:
            return []
        self.lost = True
        attrs = {"fn": fn, **self.identity.attrs()}
        return [_err(now_ms, self.entity, "GPU_LOST", attrs)]

    def mark_recovered(self, now_ms: int) -> list[Event]:
        if not self.lost:
            return []
        self.lost = False
        self._ecc_dbe = None  # counters restart after a reset
        self._counters.clear()
        return [_ok(now_ms, EventType.ERROR_HW, self.entity, "GPU_LOST")]

    # -- one sample --

    def update(self, r: GpuReading, now_ms: int) -> list[Event]:
        interval_s = (now_ms - self._last_ms) / 1000.0 if self._last_ms is not None else 0.0
        self._last_ms = now_ms
        show_identity = self.samples % self.identity_every == 0
        self.samples += 1
        out: list[Event] = []
        out.extend(self._usage(r, now_ms, show_identity))
        out.extend(self._processes(self.entity, r.processes, r.proc_util, r.mem_total, now_ms))
        out.extend(self._clock_events(r, now_ms))
        out.extend(self._ecc(r, now_ms))
        out.extend(self._remap(r, now_ms))
        out.extend(self._pcie(r, now_ms))
        out.extend(self._nvlink(r, now_ms))
        out.extend(self._drops(r, now_ms, interval_s))
        out.extend(self._mig(r, now_ms, show_identity))
        return out

    def _usage(self, r: GpuReading, now_ms: int, show_identity: bool) -> list[Event]:
        extra: dict[str, AttrValue] = {}
        if r.temp_c is not None:
            extra["temp_c"] = r.temp_c
        if r.power_mw is not None:
            extra["power_w"] = round(r.power_mw / 1000.0, 1)
        if r.sm_clock_mhz is not None:
            extra["sm_clock_mhz"] = r.sm_clock_mhz
        if show_identity:
            extra.update(self.identity.attrs())
        out: list[Event] = []
        if r.util_gpu is not None:
            attrs: dict[str, AttrValue] = {}
            if r.util_mem is not None:
                attrs["mem_util"] = r.util_mem
            attrs.update(extra)
            out.append(Event(now_ms, EventType.COMPUTE_UTIL, self.entity, str(r.util_gpu), attrs=attrs))
            extra = {}
        if r.mem_used is not None and r.mem_total:
            attrs = _mem_attrs(r.mem_used, r.mem_total)
            attrs.update(extra)
            out.append(Event(now_ms, EventType.COMPUTE_MEM, self.entity, pct(r.mem_used, r.mem_total), attrs=attrs))
        return out

    @staticmethod
    def _processes(
        entity: str,
        procs: tuple[ProcessReading, ...] | None,
        util: Mapping[int, int] | None,
        total: int | None,
        now_ms: int,
    ) -> list[Event]:
        out: list[Event] = []
        for proc in procs or ():
            if util is not None:
                sm = util.get(proc.pid, 0)
                out.append(Event(now_ms, EventType.COMPUTE_UTIL, entity, str(sm), pid=proc.pid))
            if proc.used_bytes is not None and total:
                attrs = _mem_attrs(proc.used_bytes, total)
                value = pct(proc.used_bytes, total)
            else:
                # Memory unknown (WDDM, some containers): still a Consumes edge.
                attrs = {"mem_unknown": True}
                value = "0.0"
            out.append(Event(now_ms, EventType.COMPUTE_MEM, entity, value, pid=proc.pid, attrs=attrs))
        return out

    def _clock_events(self, r: GpuReading, now_ms: int) -> list[Event]:
        if r.clock_reasons is None:
            return []
        active = {name for bit, name in CLOCK_EVENT_BITS.items() if r.clock_reasons & bit}
        out: list[Event] = []
        if active:
            attrs: dict[str, AttrValue] = {"reasons": f"0x{r.clock_reasons:x}"}
            if r.temp_c is not None:
                attrs["temp_c"] = r.temp_c
            if r.power_mw is not None:
                attrs["power_w"] = round(r.power_mw / 1000.0, 1)
            out.extend(_err(now_ms, self.entity, name, attrs) for name in sorted(active))
        out.extend(_ok(now_ms, EventType.ERROR_HW, self.entity, name) for name in sorted(self._clock_active - active))
        self._clock_active = active
        return out

    def _ecc(self, r: GpuReading, now_ms: int) -> list[Event]:
        if r.ecc_dbe is None:
            return []
        # Volatile counters start at 0 when the driver loads: a first reading above 0 means
        # double-bit errors happened since then, which is still worth reporting.
        previous = 0 if self._ecc_dbe is None else self._ecc_dbe
        self._ecc_dbe = r.ecc_dbe
        if r.ecc_dbe > previous:
            self._ecc_reported = True
            attrs: dict[str, AttrValue] = {"count": r.ecc_dbe - previous, "total": r.ecc_dbe}
            return [_err(now_ms, self.entity, "ECC_DBE", attrs)]
        if r.ecc_dbe < previous and self._ecc_reported:
            self._ecc_reported = False  # the counter was reset: the GPU was reset or reloaded
            return [_ok(now_ms, EventType.ERROR_HW, self.entity, "ECC_DBE")]
        return []

    def _remap(self, r: GpuReading, now_ms: int) -> list[Event]:
        rm = r.remap
        if rm is None:
            return []
        out: list[Event] = []
        attrs: dict[str, AttrValue] = {"correctable": rm.correctable, "uncorrectable": rm.uncorrectable}
        for code, now_on, was_on in (
            ("ROW_REMAP_PENDING", rm.pending, self._remap_pending),
            ("ROW_REMAP_FAILURE", rm.failure, self._remap_failure),
        ):
            if now_on and not was_on:
                out.append(_err(now_ms, self.entity, code, attrs))
            elif was_on and not now_on:
                out.append(_ok(now_ms, EventType.ERROR_HW, self.entity, code))
        self._remap_pending, self._remap_failure = rm.pending, rm.failure
        return out

    def _pcie(self, r: GpuReading, now_ms: int) -> list[Event]:
        link = r.pcie
        # GPUs lower their link speed when idle: judge the link only under load.
        if link is None or r.util_gpu is None or r.util_gpu <= BUSY_UTIL_PCT:
            return []
        entity = f"{self.entity}/pcie"
        attrs: dict[str, AttrValue] = {
            "width": link.width,
            "max_width": link.max_width,
            "gen": link.gen,
            "max_gen": link.max_gen,
        }
        if link.degraded:
            if self._pcie_reported != link:  # onset, or trained to another degraded state
                self._pcie_reported = link
                return [Event(now_ms, EventType.TOPO_LINK_DOWN, entity, "PCIE_DEGRADED", attrs=attrs)]
            return []
        if self._pcie_reported is not None:
            self._pcie_reported = None
            return [_ok(now_ms, EventType.TOPO_LINK_DOWN, entity, "PCIE_DEGRADED", attrs)]
        return []

    def _nvlink(self, r: GpuReading, now_ms: int) -> list[Event]:
        out: list[Event] = []
        for link, up in sorted(r.nvlink.items()):
            was_up = self._link_up.get(link)
            entity = f"{self.entity}/nvlink-{link}"
            if was_up and not up:
                self._link_down_reported.add(link)
                out.append(Event(now_ms, EventType.TOPO_LINK_DOWN, entity, "NVLINK_DOWN", attrs={"link": link}))
            elif up and link in self._link_down_reported:
                self._link_down_reported.discard(link)
                out.append(_ok(now_ms, EventType.TOPO_LINK_DOWN, entity, "NVLINK_DOWN"))
            self._link_up[link] = up
        return out

    def _drops(self, r: GpuReading, now_ms: int, interval_s: float) -> list[Event]:
        counters: list[tuple[str, str, int]] = [
            (f"{self.entity}/nvlink-{link}", name, value) for (link, name), value in sorted(r.nvlink_errors.items())
        ]
        if r.pcie_replay is not None:
            counters.append((f"{self.entity}/pcie", "pcie_replay", r.pcie_replay))
        out: list[Event] = []
        for entity, name, value in counters:
            key = (entity, name)
            previous = self._counters.get(key)
            self._counters[key] = value
            if previous is None or value <= previous:
                continue  # first reading is the baseline; a lower one means the counter was reset
            attrs: dict[str, AttrValue] = {"counter": name, "interval_s": round(interval_s, 3)}
            out.append(Event(now_ms, EventType.TRANSPORT_DROP, entity, str(value - previous), attrs=attrs))
        return out

    def _mig(self, r: GpuReading, now_ms: int, show_identity: bool) -> list[Event]:
        out: list[Event] = []
        for inst in r.mig:
            entity = f"{self.entity}/mig-{inst.gi_id}"
            if inst.mem_used is not None and inst.mem_total:
                attrs = _mem_attrs(inst.mem_used, inst.mem_total)
                if inst.uuid and (show_identity or inst.gi_id not in self._mig_seen):
                    attrs["uuid"] = inst.uuid
                value = pct(inst.mem_used, inst.mem_total)
                out.append(Event(now_ms, EventType.COMPUTE_MEM, entity, value, attrs=attrs))
            self._mig_seen.add(inst.gi_id)
            out.extend(self._processes(entity, inst.processes, None, inst.mem_total, now_ms))
        return out
