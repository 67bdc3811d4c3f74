"""What each error code means to `why`: its class, severity, and whether it is ever a cause.

This is the minimal, built-in knowledge the deterministic walk needs (DESIGN §5). The
operator-facing knowledge base (actions, steps, site overrides) lives in ``xctl.rules``.
Sources: NVIDIA's XID catalogue (docs.nvidia.com/deploy/xid-errors) and DCGM's health
watches; severities are ordinal (0–100) and only break ties between equally early faults.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class Kind(StrEnum):
    HARDWARE = "hardware"
    APPLICATION = "application"
    INTERCONNECT = "interconnect"
    NETWORK = "network"
    STORAGE = "storage"
    THERMAL = "thermal"
    POWER = "power"
    FIRMWARE = "firmware"
    SCHEDULER = "scheduler"
    OPERATOR = "operator"
    NODE_DOWN = "node-down"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class CodeInfo:
    kind: Kind
    severity: int
    summary: str
    #: Never a root cause by itself (a consequence of something else).
    sympathetic: bool = False
    #: A condition, not a blip: active until the resource reports healthy or is cleared.
    condition: bool = False
    #: Only degrades performance (verdict "degraded" rather than "blocked").
    degrading: bool = False
    #: Only informs (corrected errors, a remap recorded): explains nothing while any other
    #: anomaly does — it is blamed only when it is all there is. Implies ``degrading``.
    informational: bool = False
    #: Reached in normal operation (a busy GPU sitting at its power cap): blamed after every
    #: other degradation however early it began, before informational signals.
    routine: bool = False
    #: Codes on the same GPU whose presence makes this one a consequence of them.
    follows: frozenset[str] = frozenset()


_ECC_FATAL: Final = frozenset({"XID_48", "ECC_DBE", "XID_94", "XID_95"})

#: NVIDIA's XID catalogue for Ampere and newer, as `why` needs it: class (kind), severity, and
#: whether the XID stops work, only slows it (``degrading``) or only informs (``informational``:
#: the catalogue's IGNORE, blamed only when nothing else explains the target). Immediate and
#: investigatory actions are in xctl/rules/builtin/*.yaml. Source: "Analyzing Xid Errors with
#: the Xid Catalog", https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html
_XIDS: Final[dict[int, CodeInfo]] = {
    # catalogue: RESTART_APP / CONTACT_SUPPORT; channel idle timeout — driver-side, class unconfirmed
    8: CodeInfo(Kind.FIRMWARE, 60, "GPU stopped processing (XID 8): a channel timed out"),
    13: CodeInfo(Kind.APPLICATION, 50, "graphics engine exception (XID 13): usually an application bug"),
    31: CodeInfo(Kind.APPLICATION, 50, "GPU memory page fault (XID 31): usually an illegal address in the app"),
    32: CodeInfo(Kind.HARDWARE, 60, "invalid or corrupted push buffer stream (XID 32): often PCIe quality"),
    38: CodeInfo(Kind.FIRMWARE, 60, "driver firmware error (XID 38)"),
    43: CodeInfo(Kind.APPLICATION, 50, "GPU stopped processing (XID 43): the app hit a fault"),
    45: CodeInfo(Kind.APPLICATION, 5, "preemptive cleanup (XID 45): follows another error", sympathetic=True),
    48: CodeInfo(Kind.HARDWARE, 90, "double-bit ECC error (XID 48)", condition=True),
    61: CodeInfo(Kind.FIRMWARE, 80, "internal micro-controller breakpoint/warning (XID 61)"),
    62: CodeInfo(Kind.FIRMWARE, 85, "internal micro-controller halt (XID 62)", condition=True),
    # catalogue: IGNORE / IGNORE — a remap recorded, applied at the next reset; blocks nothing
    63: CodeInfo(
        Kind.HARDWARE,
        30,
        "ECC page retirement or row remapping recorded (XID 63)",
        degrading=True,
        informational=True,
        follows=_ECC_FATAL,
    ),
    64: CodeInfo(Kind.HARDWARE, 90, "row remapping failure (XID 64)", condition=True),
    68: CodeInfo(Kind.HARDWARE, 60, "video processor exception (XID 68)"),
    69: CodeInfo(Kind.HARDWARE, 60, "graphics engine class error (XID 69)"),
    74: CodeInfo(Kind.INTERCONNECT, 70, "NVLink error (XID 74)"),
    79: CodeInfo(Kind.HARDWARE, 100, "GPU has fallen off the bus (XID 79)", condition=True),
    # catalogue: IGNORE / CONTACT_SUPPORT — corrected errors: informational
    92: CodeInfo(Kind.HARDWARE, 10, "high single-bit ECC error rate (XID 92)", degrading=True, informational=True),
    94: CodeInfo(Kind.HARDWARE, 70, "contained ECC error (XID 94)"),
    95: CodeInfo(Kind.HARDWARE, 90, "uncontained ECC error (XID 95)", condition=True),
    109: CodeInfo(Kind.APPLICATION, 50, "context switch timeout (XID 109)"),
    # catalogue: RESET_GPU / INVESTIGATE_SW; "uncommon unless there is a hardware failure"
    110: CodeInfo(Kind.HARDWARE, 85, "security fault (XID 110): needs a cold reset", condition=True),
    119: CodeInfo(Kind.FIRMWARE, 85, "GSP RPC timeout (XID 119)", condition=True),
    120: CodeInfo(Kind.FIRMWARE, 85, "GSP error (XID 120)", condition=True),
    140: CodeInfo(Kind.HARDWARE, 85, "unrecovered ECC error (XID 140)", condition=True),
    # catalogue: RESET_GPU / CONTACT_SUPPORT; the GPU is unusable until it initialises
    143: CodeInfo(Kind.HARDWARE, 85, "GPU initialization error (XID 143)", condition=True),
    154: CodeInfo(Kind.HARDWARE, 80, "GPU recovery action required (XID 154)", condition=True),
}

_CODES: Final[dict[str, CodeInfo]] = {
    "GPU_LOST": CodeInfo(Kind.HARDWARE, 100, "GPU lost (NVML reports GPU_IS_LOST)", condition=True),
    "ECC_DBE": CodeInfo(Kind.HARDWARE, 90, "uncorrectable (double-bit) ECC error", condition=True),
    "ROW_REMAP_PENDING": CodeInfo(
        Kind.HARDWARE, 70, "row remap pending: GPU reset needed", condition=True, follows=_ECC_FATAL
    ),
    "ROW_REMAP_FAILURE": CodeInfo(Kind.HARDWARE, 90, "row remapping failed: replace the GPU", condition=True),
    "CLOCK_EVENT_HW_SLOWDOWN": CodeInfo(Kind.HARDWARE, 40, "hardware slowdown of GPU clocks", degrading=True),
    "CLOCK_EVENT_HW_THERMAL": CodeInfo(Kind.THERMAL, 45, "GPU throttled: hardware thermal limit", degrading=True),
    "CLOCK_EVENT_HW_POWER_BRAKE": CodeInfo(Kind.POWER, 45, "GPU throttled: external power brake", degrading=True),
    "CLOCK_EVENT_SW_POWER_CAP": CodeInfo(
        Kind.POWER, 20, "GPU clocks held by the power cap", degrading=True, routine=True
    ),
    "CLOCK_EVENT_SW_THERMAL": CodeInfo(Kind.THERMAL, 30, "GPU throttled: software thermal limit", degrading=True),
    "TEMP_HIGH": CodeInfo(Kind.THERMAL, 30, "GPU temperature high", degrading=True),
    "NVME_MEDIA_ERRORS": CodeInfo(Kind.STORAGE, 70, "NVMe media errors"),
    "NVME_TIMEOUT": CodeInfo(Kind.STORAGE, 60, "NVMe I/O timeout"),
    "NVME_RESET": CodeInfo(Kind.STORAGE, 70, "NVMe controller reset"),
    "PCIE_AER_CORRECTED": CodeInfo(Kind.HARDWARE, 10, "PCIe corrected error (AER)", degrading=True, informational=True),
    "PCIE_AER_UNCORRECTED": CodeInfo(Kind.HARDWARE, 75, "PCIe uncorrected error (AER)"),
    "LINK_DOWN": CodeInfo(Kind.NETWORK, 80, "network link down", condition=True),
    "LINK_FLAP": CodeInfo(Kind.NETWORK, 65, "network link flapped"),
    "PFC_STORM": CodeInfo(Kind.NETWORK, 60, "PFC pause storm on the fabric", degrading=True),
    "IBV_WC_RETRY_EXC_ERR": CodeInfo(Kind.NETWORK, 60, "RDMA transport retries exceeded"),
    "TCP_RETRANS_HIGH": CodeInfo(Kind.NETWORK, 30, "high TCP retransmission rate", degrading=True),
    "NCCL_TIMEOUT": CodeInfo(Kind.APPLICATION, 10, "NCCL collective timed out (a victim)", sympathetic=True),
    "NVLINK_DOWN": CodeInfo(Kind.INTERCONNECT, 80, "NVLink link down", condition=True),
    "PCIE_DEGRADED": CodeInfo(
        Kind.INTERCONNECT, 45, "PCIe link trained below its maximum", condition=True, degrading=True
    ),
    "IB_PORT_DOWN": CodeInfo(Kind.NETWORK, 80, "InfiniBand port down", condition=True),
    "PROBE_CRASHED": CodeInfo(Kind.UNKNOWN, 5, "an xctl probe crashed (blind spot)"),
    "PROBE_HUNG": CodeInfo(Kind.UNKNOWN, 5, "an xctl probe hung (blind spot)"),
    # Derived by `why` from the graph, never sent by probes.
    "NODE_DOWN": CodeInfo(Kind.NODE_DOWN, 95, "node went silent"),
    "NODE_SUSPECT": CodeInfo(Kind.NODE_DOWN, 40, "node missed its heartbeats", degrading=True),
    "HOST_OOM": CodeInfo(Kind.APPLICATION, 60, "host ran out of memory"),
    "STORAGE_SLOW": CodeInfo(Kind.STORAGE, 50, "storage I/O is slow", degrading=True),
    "ZOMBIE_GPU_MEMORY": CodeInfo(Kind.APPLICATION, 50, "a zombie process still holds GPU memory"),
    "PROCESS_EXITED": CodeInfo(Kind.APPLICATION, 55, "a process of the job exited"),
    "PROCESS_KILLED": CodeInfo(Kind.OPERATOR, 55, "a process of the job was killed"),
    "PROCESS_HUNG": CodeInfo(Kind.APPLICATION, 35, "a process stopped making progress"),
}

#: Values that mean "this entity is healthy again" on error.* / topo.link_down events.
HEALTHY_VALUES: Final = frozenset({"OK", "HEALTHY", "UP", "CLEARED"})

_UNKNOWN_XID: Final = CodeInfo(Kind.HARDWARE, 50, "GPU error")
_UNKNOWN: Final = CodeInfo(Kind.UNKNOWN, 30, "error")


def xid_number(code: str) -> int | None:
    if code.startswith("XID_") and code[4:].isdigit():
        return int(code[4:])
    return None


def code_info(code: str) -> CodeInfo:
    known = _CODES.get(code)
    if known is not None:
        return known
    xid = xid_number(code)
    if xid is not None:
        return _XIDS.get(xid, CodeInfo(Kind.HARDWARE, 50, f"GPU error (XID {xid})"))
    if code.startswith("SXID_"):
        return CodeInfo(Kind.INTERCONNECT, 70, f"NVSwitch error (SXID {code[5:]})")
    if code.startswith("CLOCK_EVENT_"):
        return CodeInfo(Kind.HARDWARE, 20, "GPU clocks reduced", degrading=True)
    return _UNKNOWN


#: XIDs that blame the application unless the GPU repeats them across different jobs.
APPLICATION_XIDS: Final = frozenset({"XID_13", "XID_31", "XID_43"})
