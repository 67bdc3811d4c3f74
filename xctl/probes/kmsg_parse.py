"""Pure parsers for the kernel log: ``/dev/kmsg`` records, dmesg text lines, and the messages
that matter on a GPU node (NVIDIA Xid/SXid, NVMe, PCIe AER, OOM killer, hung tasks, NIC links).

Nothing here does I/O and nothing raises on bad input: a record that cannot be parsed gives
``None`` (the reader counts it), a message that is not interesting gives no finding.

:class:`KernelLogInterpreter` turns records into :class:`~xctl.core.events.Event` objects. It
is stateful (OOM de-duplication, link flap detection, AER pair suppression) but does no I/O;
time comes from the record's kernel timestamp when it has one, else from ``now_ms``.

Event forms (see DESIGN §3):

- ``error.hw`` ``XID_<n>`` on ``gpu-N`` (``gpu-pci-<bus id>`` if the index is unknown), pid when
  the line has ``pid=<n>``; attrs xid, pci_bus_id, raw, name (when known).
- ``error.hw`` ``SXID_<n>`` on ``nvswitch-N``; attrs sxid, pci_bus_id, severity, link, raw.
- ``error.hw`` ``NVME_TIMEOUT`` / ``NVME_RESET`` on the controller (``nvme0``); attrs raw, qid.
- ``error.hw`` ``PCIE_AER_CORRECTED`` / ``PCIE_AER_UNCORRECTED`` (attrs severity, raw, type,
  reporter, pci): on ``gpu-N`` when the device in error is a GPU (``pci`` = its address); when
  it is a bridge or root port with GPUs below it, one event on each of those GPUs (``pci`` =
  the GPU's address, ``via`` = the port's): an error upstream affects every GPU behind the
  port, so `why` on any of their processes must see it; otherwise on the PCI address itself.
- ``process.state`` ``oom_killed`` (entity = the killed task's name, pid) — one per kill;
  ``hung`` for ``INFO: task NAME:PID blocked for more than N seconds`` (attrs blocked_s).
- ``error.net`` ``LINK_DOWN`` on a netdev; on link up ``OK`` (attrs code=LINK_DOWN: it clears
  only the down condition) and, if it went down less than :data:`FLAP_WINDOW_S` ago,
  ``LINK_FLAP`` (emitted after the ``OK``).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from xctl.core.events import NO_ATTRS, AttrValue, Event, EventType

log = logging.getLogger(__name__)

#: A link that comes back within this many seconds of going down is reported as a flap.
FLAP_WINDOW_S: Final = 60.0
#: The same task's OOM kill reported by several lines within this window is one kill.
OOM_DEDUPE_S: Final = 60.0
#: An AER "error received" line and the device's "PCIe Bus Error" line within this window are one error.
AER_PAIR_S: Final = 2.0
RAW_MAX: Final = 1024
_STATE_BOUND: Final = 1024

GpuIndex = Callable[[str], "int | None"]
#: PCI address of a bridge or port → the PCI addresses of the GPUs below it.
GpusBelow = Callable[[str], "Sequence[str]"]


@dataclass(frozen=True, slots=True)
class KmsgRecord:
    """One kernel log record. ``usec`` is the kernel timestamp (µs since boot) when known."""

    message: str
    level: int | None = None
    facility: int | None = None
    seq: int | None = None
    usec: int | None = None


# --- records ---------------------------------------------------------------------------------

_KMSG_HEAD_RE: Final = re.compile(r"^\d{1,4},\d{1,20},\d{1,20},[^;,]*[,;]")
_DMESG_TS_RE: Final = re.compile(r"^\[\s*(\d{1,12})\.(\d{1,9})\]\s?")
_DMESG_OTHER_TS_RE: Final = re.compile(r"^\[[^\]]{1,64}\]\s?")


def parse_kmsg_record(data: bytes | str) -> KmsgRecord | None:
    """``prio,seq,usec,flags[,...];message\\n[ KEY=value\\n...]`` → record; None if malformed."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes | bytearray) else data
    header, sep, rest = text.partition(";")
    if not sep:
        return None
    fields = header.split(",")
    if len(fields) < 4 or not all(f.isascii() and f.isdigit() for f in fields[:3]):
        return None
    try:
        prio, seq, usec = int(fields[0]), int(fields[1]), int(fields[2])
    except ValueError:
        return None
    message = rest.split("\n", 1)[0]  # continuation lines (" KEY=value") are dictionary data
    return KmsgRecord(message=message, level=prio & 7, facility=prio >> 3, seq=seq, usec=usec)


def parse_dmesg_line(line: str) -> KmsgRecord:
    """A ``dmesg`` text line (``[   67.427870] NVRM: ...``), or a bare message, → record."""
    line = line.rstrip("\r\n")
    m = _DMESG_TS_RE.match(line)
    if m:
        frac = m.group(2)[:6].ljust(6, "0")
        return KmsgRecord(message=line[m.end() :], usec=int(m.group(1)) * 1_000_000 + int(frac))
    m = _DMESG_OTHER_TS_RE.match(line)  # dmesg -T: [Fri Nov 22 12:00:00 2024]
    if m:
        return KmsgRecord(message=line[m.end() :])
    return KmsgRecord(message=line)


def parse_any(line: bytes | str) -> KmsgRecord | None:
    """A raw /dev/kmsg record or a dmesg text line, whichever it looks like."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes | bytearray) else line
    if _KMSG_HEAD_RE.match(text):
        return parse_kmsg_record(text)
    return parse_dmesg_line(text)


# --- PCI addresses -----------------------------------------------------------------------------

_PCI_RE: Final = re.compile(r"^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})(?:\.([0-7]))?$")


def normalize_pci(text: str) -> str | None:
    """``0000:00:06``, ``0000:00:06.0``, ``00000000:00:06.0``, ``00:06.0`` → ``0000:00:06.0``."""
    m = _PCI_RE.match(text.strip())
    if not m:
        return None
    domain = int(m.group(1) or "0", 16)
    bus, dev = int(m.group(2), 16), int(m.group(3), 16)
    if dev > 0x1F:
        return None
    return f"{domain:04x}:{bus:02x}:{dev:02x}.{int(m.group(4) or '0')}"


def gpus_below(port: str, gpu_paths: Mapping[str, str]) -> list[str]:
    """The GPUs (address → sysfs device path, e.g. ``/sys/devices/pci0000:17/0000:17:00.0/
    0000:18:00.0/0000:1a:00.0``) whose path passes through ``port``: those downstream of it."""
    return sorted(gpu for gpu, path in gpu_paths.items() if gpu != port and port in path.split("/")[:-1])


# --- findings ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """What one kernel message says, before it is mapped to entities.

    ``kind`` is one of xid, sxid, nvme, aer, oom, hung, link; ``code`` the kind-specific code
    (Xid number, NVME_TIMEOUT, PCIE_AER_CORRECTED, ``up``/``down`` …); ``device`` the PCI
    address, controller or netdev named.
    """

    kind: str
    code: str
    device: str | None = None
    pid: int | None = None
    name: str | None = None
    detail: Mapping[str, AttrValue] = field(default_factory=lambda: NO_ATTRS)


_ADDR: Final = r"[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]"
_XID_RE: Final = re.compile(r"NVRM: Xid \((?:PCI:)?([0-9A-Fa-f:.]{4,24})\): (\d{1,6})(.*)$")
_XID_PID_RE: Final = re.compile(r"^,\s*pid=('?<unknown>'?|\d{1,10})")
_XID_NAME_RE: Final = re.compile(r"^,\s*name=([^,]*)")
_SXID_RE: Final = re.compile(
    r"nvidia-nvswitch(\d*): SXid \((?:PCI:)?([0-9A-Fa-f:.]{4,24})\): (\d{1,6})"
    r"(?:, ((?:Non-)?[Ff]atal|[A-Za-z-]*[Ff]atal))?(.*)$"
)
_LINK_NO_RE: Final = re.compile(r"\bLink (\d{1,4})\b")
_NVME_TIMEOUT_RE: Final = re.compile(r"\bnvme (nvme\d+): I/O .{0,80}?QID (\d+) timeout")
_NVME_RESET_RE: Final = re.compile(
    r"\bnvme (nvme\d+): (?:controller is down; will reset|resetting controller|Device not ready; aborting reset)"
)
_AER_RECEIVED_RE: Final = re.compile(
    rf"\S+ ({_ADDR}): AER: (?:Multiple )?(Corrected|Correctable|Uncorrected|Uncorrectable)"
    r"(?: \((Non-Fatal|Fatal)\))? error (?:message )?received(?::| from) ?(\S+)"
)
_AER_BUS_ERROR_RE: Final = re.compile(
    rf"\S+ ({_ADDR}): (?:AER: )?PCIe Bus Error: severity=([^,]+), type=([^,]+)(?:, \(([^)]*)\))?"
)
_OOM_KILLED_RE: Final = re.compile(
    r"(?:^|(?i:out of memory): )Kill(?:ed)? process (\d{1,10}) \((.{0,64}?)\)(?=\s+(?:total-vm|score)|,|\s*$)"
)
_OOM_KILL_RE: Final = re.compile(r"^oom-kill:(.*?)task=(.{0,64}?),pid=(\d{1,10})(?:,uid=(\d+))?")
_HUNG_RE: Final = re.compile(r"INFO: task (.{1,64}):(\d{1,10}) blocked for more than (\d{1,10}) seconds")
_LINK_RES: Final = (
    # mlx5_core 0000:3b:00.0 enp59s0f0: Link down | ixgbe 0000:3b:00.0 eth0: NIC Link is Up 10 Gbps
    # igb 0000:01:00.0 eno1: igb: eno1 NIC Link is Up 1000 Mbps Full Duplex
    re.compile(rf"^(\S+) ({_ADDR}) ([^\s:]+): (?:[\w-]+: )?(?:[^\s:]+ )?(?:NIC )?Link (?:is )?(Up|Down|up|down)\b"),
    # e1000e: eno1 NIC Link is Down
    re.compile(r"^(\S+): ()([^\s:]+) NIC Link is (Up|Down)\b"),
)
_ADDRCONF_RE: Final = re.compile(r"ADDRCONF\(NETDEV_(?:CHANGE|UP)\): ([^\s:]+): link (becomes ready|is not ready)")
_BOND_RE: Final = re.compile(
    r"^([^\s:]+): \(slave ([^\s)]+)\): link status (?:definitely )?(up|down)"
    r"|^([^\s:]+): link status definitely (up|down) for interface ([^\s,]+)"
)


def _aer_code(severity: str) -> str:
    return "PCIE_AER_UNCORRECTED" if severity.lower().startswith("uncorrect") else "PCIE_AER_CORRECTED"


def classify(message: str) -> Finding | None:
    """The one finding in a kernel message, or None. Never raises."""
    if "NVRM: Xid" in message:
        return _classify_xid(message)
    if "SXid" in message:
        m = _SXID_RE.search(message)
        if not m:
            return None
        detail: dict[str, AttrValue] = {}
        if m.group(4):
            detail["severity"] = m.group(4)
        link = _LINK_NO_RE.search(m.group(5) or "")
        if link:
            detail["link"] = int(link.group(1))
        if m.group(1):
            detail["switch"] = int(m.group(1))
        return Finding("sxid", m.group(3), m.group(2), detail=MappingProxyType(detail))
    if "nvme" in message:
        m = _NVME_TIMEOUT_RE.search(message)
        if m:
            return Finding("nvme", "NVME_TIMEOUT", m.group(1), detail=MappingProxyType({"qid": int(m.group(2))}))
        m = _NVME_RESET_RE.search(message)
        if m:
            return Finding("nvme", "NVME_RESET", m.group(1))
        return None  # e.g. "Abort status: 0x0": the timeout line already said it
    if "AER" in message or "PCIe Bus Error" in message:
        return _classify_aer(message)
    if "ill" in message and "process" in message:
        m = _OOM_KILLED_RE.search(message)
        if m:
            return Finding("oom", "oom_killed", pid=int(m.group(1)), name=m.group(2))
    if message.startswith("oom-kill:"):
        m = _OOM_KILL_RE.match(message)
        if m:
            detail = {}
            for item in m.group(1).split(","):
                key, sep, value = item.partition("=")
                if sep and key in ("constraint", "task_memcg", "oom_memcg"):
                    detail[key] = value
            return Finding("oom", "oom_killed", pid=int(m.group(3)), name=m.group(2), detail=MappingProxyType(detail))
        return None
    if "blocked for more than" in message:
        m = _HUNG_RE.search(message)
        if m:
            return Finding(
                "hung",
                "hung",
                pid=int(m.group(2)),
                name=m.group(1),
                detail=MappingProxyType({"blocked_s": int(m.group(3))}),
            )
        return None
    if "ink" in message:
        return _classify_link(message)
    return None


def _classify_xid(message: str) -> Finding | None:
    m = _XID_RE.search(message)
    if not m:
        return None
    rest = m.group(3)
    pid: int | None = None
    name: str | None = None
    pm = _XID_PID_RE.match(rest)
    if pm:
        rest = rest[pm.end() :]
        if pm.group(1).isdigit():
            pid = int(pm.group(1)) or None
    nm = _XID_NAME_RE.match(rest)
    if nm:
        rest = rest[nm.end() :]
        candidate = nm.group(1).strip()
        if candidate and candidate != "<unknown>":
            name = candidate[:64]
    text = rest.lstrip(", ").strip()
    detail: dict[str, AttrValue] = {"message": text[:256]} if text else {}
    return Finding("xid", m.group(2), m.group(1), pid=pid, name=name, detail=MappingProxyType(detail))


def _classify_aer(message: str) -> Finding | None:
    m = _AER_RECEIVED_RE.search(message)
    if m:
        port, kind, fatal, source = m.groups()
        source = source.rstrip(",.")
        severity = kind if not fatal else f"{kind} ({fatal})"
        device = normalize_pci(source) or normalize_pci(port) or port
        detail: dict[str, AttrValue] = {"severity": severity, "reporter": normalize_pci(port) or port}
        return Finding("aer", _aer_code(kind), device, detail=MappingProxyType(detail))
    m = _AER_BUS_ERROR_RE.search(message)
    if m:
        addr, severity, etype, agent = m.groups()
        detail = {"severity": severity.strip(), "type": etype.strip()}
        if agent:
            detail["agent"] = agent
        return Finding("aer", _aer_code(severity.strip()), normalize_pci(addr) or addr, detail=MappingProxyType(detail))
    return None


def _classify_link(message: str) -> Finding | None:
    for regex in _LINK_RES:
        m = regex.search(message)
        if m:
            driver, addr, dev, state = m.groups()
            detail: dict[str, AttrValue] = {"driver": driver.rstrip(":")}
            if addr:
                detail["pci_bus_id"] = normalize_pci(addr) or addr
            return Finding("link", state.lower(), dev, detail=MappingProxyType(detail))
    m = _ADDRCONF_RE.search(message)
    if m:
        return Finding("link", "up" if m.group(2) == "becomes ready" else "down", m.group(1))
    m = _BOND_RE.search(message)
    if m:
        if m.group(1):
            return Finding("link", m.group(3), m.group(2), detail=MappingProxyType({"bond": m.group(1)}))
        return Finding("link", m.group(5), m.group(6), detail=MappingProxyType({"bond": m.group(4)}))
    return None


# --- records → events ------------------------------------------------------------------------------


def _no_gpu_index(bus_id: str) -> int | None:
    del bus_id
    return None


def _no_gpus_below(port: str) -> Sequence[str]:
    del port
    return ()


class KernelLogInterpreter:
    """Kernel records → events, with the little state that needs (see the module doc)."""

    def __init__(
        self,
        gpu_index: GpuIndex | None = None,
        *,
        gpus_below: GpusBelow | None = None,
        kernel_only: bool = True,
        flap_window_s: float = FLAP_WINDOW_S,
    ) -> None:
        self.gpu_index: GpuIndex = gpu_index or _no_gpu_index
        self.gpus_below: GpusBelow = gpus_below or _no_gpus_below
        #: Ignore records a user-space program wrote to /dev/kmsg (facility ≠ kernel).
        self.kernel_only = kernel_only
        self.flap_window_s = flap_window_s
        self._link_down: OrderedDict[str, int] = OrderedDict()
        self._oom_seen: OrderedDict[int, int] = OrderedDict()
        self._last_aer: tuple[str, str, int] | None = None

    def feed_line(self, line: bytes | str, now_ms: int) -> list[Event] | None:
        """A kmsg record or dmesg line → events; None if it is malformed (count it)."""
        record = parse_any(line)
        if record is None:
            return None
        return self.feed(record, now_ms)

    def feed(self, record: KmsgRecord, now_ms: int) -> list[Event]:
        if self.kernel_only and record.facility not in (None, 0):
            return []
        finding = classify(record.message)
        if finding is None:
            return []
        t_us = record.usec if record.usec is not None else now_ms * 1000
        raw = record.message[:RAW_MAX]
        return self._events(finding, raw, t_us, now_ms)

    def gpu_entity(self, bus_id: str) -> tuple[str, str]:
        """(entity, normalised bus id) for a GPU PCI address."""
        norm = normalize_pci(bus_id) or bus_id
        try:
            index = self.gpu_index(norm)
        except Exception:  # a failing lookup must not lose the error itself
            log.debug("gpu_index(%s) failed", norm, exc_info=True)
            index = None
        return (f"gpu-{index}" if index is not None else f"gpu-pci-{norm}"), norm

    def _events(self, f: Finding, raw: str, t_us: int, now_ms: int) -> list[Event]:
        if f.kind == "xid":
            entity, norm = self.gpu_entity(f.device or "")
            attrs: dict[str, AttrValue] = {"xid": int(f.code), "pci_bus_id": norm, "raw": raw}
            if f.name:
                attrs["name"] = f.name
            return [_event(now_ms, EventType.ERROR_HW, entity, f"XID_{int(f.code)}", attrs, pid=f.pid)]
        if f.kind == "sxid":
            detail = dict(f.detail)
            switch = detail.pop("switch", None)
            norm = normalize_pci(f.device or "") or (f.device or "")
            entity = f"nvswitch-{switch}" if switch is not None else f"nvswitch-pci-{norm}"
            attrs = {"sxid": int(f.code), "pci_bus_id": norm, "raw": raw, **detail}
            return [_event(now_ms, EventType.ERROR_HW, entity, f"SXID_{int(f.code)}", attrs)]
        if f.kind == "nvme":
            attrs = {"raw": raw, "controller": f.device or "", **f.detail}
            return [_event(now_ms, EventType.ERROR_HW, f.device or "nvme", f.code, attrs)]
        if f.kind == "aer":
            device = f.device or "pci"
            last = self._last_aer
            self._last_aer = (device, f.code, t_us)
            if last and last[0] == device and last[1] == f.code and 0 <= t_us - last[2] <= AER_PAIR_S * 1e6:
                return []
            return self._aer(f, device, raw, now_ms)
        if f.kind == "oom":
            pid = f.pid or 0
            seen = self._oom_seen.get(pid)
            self._oom_seen[pid] = t_us
            self._oom_seen.move_to_end(pid)
            _trim(self._oom_seen)
            if seen is not None and abs(t_us - seen) <= OOM_DEDUPE_S * 1e6:
                return []
            attrs = {"name": f.name or "", "raw": raw, **f.detail}
            return [_event(now_ms, EventType.PROCESS_STATE, f.name or "proc", "oom_killed", attrs, pid=pid or None)]
        if f.kind == "hung":
            attrs = {"name": f.name or "", "raw": raw, **f.detail}
            return [_event(now_ms, EventType.PROCESS_STATE, f.name or "proc", "hung", attrs, pid=f.pid)]
        if f.kind == "link":
            return self._link(f, raw, t_us, now_ms)
        return []

    def _aer(self, f: Finding, device: str, raw: str, now_ms: int) -> list[Event]:
        """On the GPU in error, on each GPU below the port in error, or on the PCI address."""
        attrs: dict[str, AttrValue] = {"raw": raw, **f.detail}
        gpu, norm = self.gpu_entity(device)
        if not gpu.startswith("gpu-pci-"):
            return [_event(now_ms, EventType.ERROR_HW, gpu, f.code, {**attrs, "pci": norm})]
        try:
            below = list(self.gpus_below(norm))
        except Exception:  # a failing lookup must not lose the error itself
            log.debug("gpus_below(%s) failed", norm, exc_info=True)
            below = []
        events = []
        for addr in below:
            entity, gpu_norm = self.gpu_entity(addr)
            events.append(_event(now_ms, EventType.ERROR_HW, entity, f.code, {**attrs, "pci": gpu_norm, "via": norm}))
        return events or [_event(now_ms, EventType.ERROR_HW, device, f.code, attrs)]

    def _link(self, f: Finding, raw: str, t_us: int, now_ms: int) -> list[Event]:
        dev = f.device or "net"
        attrs: dict[str, AttrValue] = {"raw": raw, **f.detail}
        if f.code == "down":
            if dev in self._link_down:
                return []  # still down: already reported
            self._link_down[dev] = t_us
            _trim(self._link_down)
            return [_event(now_ms, EventType.ERROR_NET, dev, "LINK_DOWN", attrs)]
        down_at = self._link_down.pop(dev, None)
        # "OK" with code=LINK_DOWN clears only the down condition, not other errors on the link.
        events = [_event(now_ms, EventType.ERROR_NET, dev, "OK", {**attrs, "code": "LINK_DOWN"})]
        if down_at is not None and 0 <= t_us - down_at <= self.flap_window_s * 1e6:
            flap = {**attrs, "down_s": round((t_us - down_at) / 1e6, 3)}
            events.append(_event(now_ms, EventType.ERROR_NET, dev, "LINK_FLAP", flap))
        return events


def _trim(d: OrderedDict[str, int] | OrderedDict[int, int]) -> None:
    while len(d) > _STATE_BOUND:
        d.popitem(last=False)


def _event(
    now_ms: int,
    etype: EventType,
    entity: str,
    value: str,
    attrs: Mapping[str, AttrValue],
    *,
    pid: int | None = None,
) -> Event:
    return Event(
        ts=now_ms,
        type=etype,
        entity=entity[:256] or "unknown",
        value=value,
        pid=pid if pid is not None and 0 < pid < 2**31 else None,
        attrs=MappingProxyType(dict(attrs)),
    )
