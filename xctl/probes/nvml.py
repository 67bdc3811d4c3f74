"""``nvml[:interval=1s,timeout=5s,xid=on,nvlink_counters=on]`` — the NVIDIA GPU probe.

Every NVML call goes through :class:`xctl.probes.nvml_wrap.Nvml` (error mapping and a
watchdog); readings become events in the pure :mod:`xctl.probes.nvml_sample`, whose module
doc lists every event this probe emits. Importing this module does not import ``pynvml``:
the constructor does, and raises :class:`ProbeError` ("install xctl[gpu]") without it.

Each interval, one sampling pass per GPU (one hand-off to the watchdog worker per GPU) reads
utilisation, memory, temperature, power, SM clock, clocks-event reasons, volatile DBE count,
remapped rows, PCIe generation/width and replay counter, NVLink state and error counters
(links found at start; a GPU without NVLink is skipped quietly), the compute processes with
their memory and, when there are any, their SM share since the previous pass.

XID events: an NVML event set registered for XID critical errors on every GPU is waited on
by its own thread (``nvmlEventSetWait`` with a 500 ms timeout, outside the watchdog because
it blocks by design; it stops within a second). Each XID becomes ``error.hw XID_<n>`` on
``gpu-N`` with ``attrs.source = "nvml"`` and no pid — the kernel log line carries the pid.
Where registration is not supported, :meth:`NvmlProbe.describe` says XIDs come only from the
kernel log.

A GPU answering GPU_IS_LOST gets one ``error.hw GPU_LOST`` and is not read again, except for
a cheap retry every ``LOST_RETRY_SAMPLES`` passes (``OK code=GPU_LOST`` if it answers). An
NVML call that does not return within the timeout yields ``error.hw PROBE_HUNG`` on
``probe:nvml`` (attrs fn, timeout_s, detail); the probe then stops sampling and stops
beating, so the supervisor reports it hung and starts a fresh instance (the stuck worker
thread is abandoned; :mod:`~xctl.probes.nvml_wrap` refuses a new one when several are stuck).

For other probes: :meth:`NvmlProbe.gpu_pids` (compute pids of the last pass, for procfs) and
:meth:`NvmlProbe.pci_to_index` / :meth:`NvmlProbe.gpu_index` (PCI bus id → NVML index, for
the kernel log probe), all safe to call from any thread.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

from xctl.core.clock import Clock
from xctl.core.errors import ProbeError
from xctl.core.events import Event
from xctl.probes._spec import format_duration, parse_duration, split_pairs
from xctl.probes.base import ProbeContext
from xctl.probes.nvml_sample import (
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
from xctl.probes.nvml_wrap import (
    DEFAULT_TIMEOUT_S,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_TIMEOUT,
    GpuLost,
    Nvml,
    NvmlCallError,
    NvmlHung,
    error_code,
    error_text,
    load_pynvml,
)

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S: Final = 1.0
DEFAULT_XID_WAIT_MS: Final = 500
#: A lost GPU is asked again every this many passes.
LOST_RETRY_SAMPLES: Final = 30
#: Per-process utilisation is asked for samples newer than this on the first pass.
FIRST_PUTIL_WINDOW_US: Final = 2_000_000

# NVML constants (nvml.h), so the probe does not depend on the module defining them.
NVML_TEMPERATURE_GPU: Final = 0
NVML_CLOCK_SM: Final = 1
NVML_MEMORY_ERROR_TYPE_UNCORRECTED: Final = 1
NVML_VOLATILE_ECC: Final = 0
NVML_EVENT_TYPE_XID: Final = 0x8
NVML_DEVICE_MIG_ENABLE: Final = 1
NVML_NVLINK_MAX_LINKS: Final = 18  # H100; newer nvidia-ml-py says more, and the loop stops early
NVML_NO_INSTANCE: Final = 0xFFFFFFFF
#: NVLink error counters read per link: NVML counter id → name in attrs.counter.
NVLINK_COUNTERS: Final[dict[int, str]] = {0: "replay", 1: "recovery", 2: "crc_flit"}

_EVENTS_FN: Final = "nvmlDeviceGetCurrentClocksEventReasons"
_THROTTLE_FN: Final = "nvmlDeviceGetCurrentClocksThrottleReasons"
_SPEC_KEYS: Final = ("interval", "timeout", "xid", "nvlink_counters")
_BOOL: Final = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False, "0": False}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip("\x00")
    return str(value)


def _handle_key(handle: Any) -> int:
    """A stable key for an NVML device handle (a ctypes pointer, or a fake's object)."""
    try:
        address = ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return id(handle)
    return address if address is not None else id(handle)


@dataclass
class _Gpu:
    index: int
    handle: Any
    tracker: GpuTracker
    max_gen: int | None = None
    max_width: int | None = None
    links: tuple[int, ...] = ()
    mig: bool = False
    mig_max: int = 0
    mig_uuids: dict[int, str] = field(default_factory=dict)
    xid: bool = False
    putil_since_us: int | None = None
    lost_passes: int = 0

    @property
    def entity(self) -> str:
        return self.tracker.entity


class NvmlProbe:
    """The NVIDIA GPU probe; see the module doc. ``lib`` is ``pynvml`` or a fake of it."""

    name = "nvml"

    def __init__(
        self,
        lib: Any | None = None,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        xid: bool = True,
        xid_wait_ms: int = DEFAULT_XID_WAIT_MS,
        nvlink_counters: bool = True,
    ) -> None:
        if not 0 < interval_s <= 3600:
            raise ProbeError(f"nvml: interval must be between 0 and 1h, not {format_duration(interval_s)}")
        if not 0 < timeout_s <= 60:
            raise ProbeError(f"nvml: timeout must be between 0 and 60s, not {format_duration(timeout_s)}")
        if not 10 <= xid_wait_ms <= 900:
            raise ProbeError(
                f"nvml: xid_wait_ms must be 10..900 (the XID thread must stop within 1 s), not {xid_wait_ms}"
            )
        self.lib = load_pynvml() if lib is None else lib
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.xid = xid
        self.xid_wait_ms = xid_wait_ms
        self.nvlink_counters = nvlink_counters
        self.heartbeat_s: float | None = max(10.0, 3 * interval_s) + timeout_s
        self._nvml: Nvml | None = None
        self._opened = False
        self._inited = False
        self._gpus: list[_Gpu] = []
        self._driver = ""
        self._hung: NvmlHung | None = None
        self._pids: frozenset[int] = frozenset()
        self._pci_index: dict[str, int] = {}
        self._handle_index: dict[int, int] = {}
        self._event_set: Any = None
        self._xid_note = "XID events: not set up yet"
        self._xid_thread: threading.Thread | None = None
        self._xid_stop = threading.Event()
        self._call_errors: set[tuple[str, int | None]] = set()
        #: GPUs found lost while opening: their GPU_LOST events go out with the next sample.
        self._early_lost: list[tuple[GpuTracker, str]] = []
        self._skipped: list[str] = []

    @classmethod
    def from_spec(cls, arg: str | None) -> NvmlProbe:
        kwargs: dict[str, Any] = {}
        for key, value in split_pairs(arg or "", what="nvml"):
            if key not in _SPEC_KEYS:
                raise ProbeError(f"nvml: unknown key {key!r}: use {', '.join(_SPEC_KEYS)} (e.g. nvml:interval=2s)")
            if key in ("interval", "timeout"):
                kwargs[f"{key}_s"] = parse_duration(value, what=f"nvml: {key}")
            else:
                flag = _BOOL.get(value.lower())
                if flag is None:
                    raise ProbeError(f"nvml: {key}={value!r}: write {key}=on or {key}=off")
                kwargs[key] = flag
        return cls(**kwargs)

    # -- for other probes -------------------------------------------------------------------

    def gpu_pids(self) -> set[int]:
        """Pids of the compute processes seen on any GPU (or MIG instance) in the last pass."""
        return set(self._pids)

    def pci_to_index(self) -> dict[str, int]:
        """Normalised PCI bus id (``00000000:00:06.0``, lower-case hex) → NVML GPU index."""
        return dict(self._pci_index)

    def gpu_index(self, bus_id: str) -> int | None:
        """NVML index of the GPU at ``bus_id`` in any common form (``0000:00:06``, …), or None."""
        norm = normalize_bus_id(bus_id)
        return None if norm is None else self._pci_index.get(norm)

    # -- description ---------------------------------------------------------------------

    def describe(self) -> str:
        every = format_duration(self.interval_s)
        if self._hung is not None:
            return f"nvml: hung in {self._hung.fn} (no answer within {self._hung.timeout_s:g} s); waiting for restart"
        if not self._opened:
            return f"nvml: every {every}, watchdog {self.timeout_s:g}s (NVML not initialised yet)"
        names = sorted({g.tracker.identity.name for g in self._gpus if g.tracker.identity.name})
        parts = [
            f"nvml: {len(self._gpus)} GPU(s)"
            + (f" ({', '.join(names)})" if names else "")
            + (f", driver {self._driver}" if self._driver else "")
            + f", every {every}",
            self._xid_note,
        ]
        for g in self._gpus:
            if g.mig:
                parts.append(
                    f"{g.entity}: MIG enabled: memory and processes per GPU instance as {g.entity}/mig-G; "
                    "utilisation per MIG instance and per process on MIG is not available from NVML (use DCGM)"
                )
        if self._skipped:
            parts.append("left out: " + ", ".join(self._skipped))
        lost = [g.entity for g in self._gpus if g.tracker.lost]
        if lost:
            parts.append("lost: " + ", ".join(lost))
        if not any(g.links for g in self._gpus):
            parts.append("NVLink: not supported on these GPUs")
        nv = self._nvml
        unsupported = sorted(nv.unsupported()) if nv is not None else []
        if unsupported:
            shown = [fn.removeprefix("nvmlDevice").removeprefix("nvml") for fn in unsupported]
            parts.append("not supported: " + ", ".join(shown))
        return "; ".join(parts)

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """``nvmlInit``, find the GPUs, register for XID events. Raises ProbeError / NvmlHung."""
        if self._opened:
            return
        nv = self._nvml = self._nvml or Nvml(self.lib, timeout_s=self.timeout_s)
        if not self._inited:
            try:
                nv.call("nvmlInit")
            except NvmlCallError as exc:
                raise ProbeError(
                    f"nvml: NVML did not initialise ({exc}): is the NVIDIA driver loaded (nvidia-smi works)?"
                ) from exc
            self._inited = True
        self._driver = _text(self._get("nvmlSystemGetDriverVersion"))
        count = self._get("nvmlDeviceGetCount") or 0
        self._skipped = []
        gpus: list[_Gpu] = []
        for index in range(int(count)):
            try:
                gpus.append(nv.batch(f"gpu-{index} discovery", partial(self._discover, index)))
            except GpuLost as exc:
                tracker = GpuTracker(GpuIdentity(index))
                gpus.append(_Gpu(index, None, tracker))
                self._early_lost.append((tracker, exc.fn))
            except NvmlCallError as exc:
                log.warning("nvml: gpu-%d left out: %s", index, exc)
                self._skipped.append(f"gpu-{index} ({exc})")
        self._gpus = gpus
        self._pci_index = {g.tracker.identity.pci_bus_id: g.index for g in gpus if g.tracker.identity.pci_bus_id}
        self._handle_index = {_handle_key(g.handle): g.index for g in gpus if g.handle is not None}
        if self.xid:
            self._register_xid()
        else:
            self._xid_note = "XID events: from the kernel log only (xid=off)"
        self._opened = True
        log.info("%s", self.describe())

    def _discover(self, index: int) -> _Gpu:
        nv = self._nvml
        assert nv is not None
        handle = nv.call("nvmlDeviceGetHandleByIndex", index, gpu=index)
        if handle is None:
            raise NvmlCallError("nvmlDeviceGetHandleByIndex", None, f"no handle for GPU {index}")
        pci = self._get("nvmlDeviceGetPciInfo", handle, gpu=index)
        identity = GpuIdentity(
            index=index,
            uuid=_text(self._get("nvmlDeviceGetUUID", handle, gpu=index)),
            pci_bus_id=normalize_bus_id(_text(getattr(pci, "busId", ""))) or "",
            name=_text(self._get("nvmlDeviceGetName", handle, gpu=index)),
        )
        gpu = _Gpu(index, handle, GpuTracker(identity))
        gpu.max_gen = _int(self._get("nvmlDeviceGetMaxPcieLinkGeneration", handle, gpu=index))
        gpu.max_width = _int(self._get("nvmlDeviceGetMaxPcieLinkWidth", handle, gpu=index))
        mode = self._get("nvmlDeviceGetMigMode", handle, gpu=index)
        if mode is not None and int(mode[0]) == NVML_DEVICE_MIG_ENABLE:
            gpu.mig = True
            gpu.mig_max = int(self._get("nvmlDeviceGetMaxMigDeviceCount", handle, gpu=index) or 0)
        gpu.links = self._discover_links(handle, index)
        return gpu

    def _discover_links(self, handle: Any, index: int) -> tuple[int, ...]:
        nv = self._nvml
        assert nv is not None
        max_links = int(getattr(self.lib, "NVML_NVLINK_MAX_LINKS", NVML_NVLINK_MAX_LINKS))
        links: list[int] = []
        for link in range(max_links):
            try:
                state = nv.call("nvmlDeviceGetNvLinkState", handle, link, gpu=index, sub=f"nvlink-{link}")
            except NvmlCallError as exc:
                if exc.code == NVML_ERROR_INVALID_ARGUMENT:
                    break  # past this GPU's last link
                continue
            if state is None:
                if link == 0:
                    break  # no NVLink on this GPU (a PCIe card): skip quietly
                continue
            links.append(link)
        return tuple(links)

    def _register_xid(self) -> None:
        nv = self._nvml
        assert nv is not None
        try:
            event_set = nv.call("nvmlEventSetCreate")
        except NvmlCallError as exc:
            event_set = None
            log.info("NVML event set not available: %s", exc)
        if event_set is None:
            self._xid_note = "XID events: from the kernel log only (NVML event sets not supported)"
            return
        failed: list[str] = []
        for g in self._gpus:
            if g.handle is None:
                failed.append(g.entity)
                continue
            try:
                nv.call("nvmlDeviceRegisterEvents", g.handle, NVML_EVENT_TYPE_XID, event_set, gpu=g.index)
            except (NvmlCallError, GpuLost) as exc:
                log.info("NVML XID event registration failed on %s: %s", g.entity, exc)
                failed.append(g.entity)
                continue
            if nv.is_unsupported("nvmlDeviceRegisterEvents", g.index):
                failed.append(g.entity)
            else:
                g.xid = True
        if not any(g.xid for g in self._gpus):
            self._get("nvmlEventSetFree", event_set)
            self._xid_note = "XID events: from the kernel log only (NVML XID event registration not supported)"
            return
        self._event_set = event_set
        if failed:
            self._xid_note = (
                "XID events: NVML event set, except " + ", ".join(failed) + " (kernel log only: registration failed)"
            )
        else:
            self._xid_note = "XID events: NVML event set"

    def close(self) -> None:
        """Stop the XID thread, free the event set, ``nvmlShutdown`` (skipped when hung)."""
        stopped = self.stop_xid()
        nv = self._nvml
        if nv is None:
            return
        if nv.hung is None:
            try:
                if self._event_set is not None and stopped:
                    self._get("nvmlEventSetFree", self._event_set)
                    self._event_set = None
                if self._inited:
                    self._inited = False
                    self._get("nvmlShutdown")
            except (NvmlHung, GpuLost) as exc:
                log.info("nvml: during shutdown: %s", exc)
        nv.close()
        self._nvml = None
        self._opened = False
        self._inited = False
        self._event_set = None

    # -- sampling ----------------------------------------------------------------------------

    def sample(self, now_ms: int) -> list[Event]:
        """One sampling pass over every GPU (opens NVML first if needed)."""
        if self._hung is not None:
            return []
        out: list[Event] = []
        try:
            self.open()
        except NvmlHung as exc:
            return [self._hang(exc, now_ms)]
        for tracker, fn in self._early_lost:
            out.extend(tracker.mark_lost(now_ms, fn))
        self._early_lost = []
        nv = self._nvml
        assert nv is not None
        pids: set[int] = set()
        for gpu in self._gpus:
            try:
                if gpu.tracker.lost:
                    out.extend(self._retry_lost(gpu, now_ms))
                    if gpu.tracker.lost:
                        continue
                reading = nv.batch(f"{gpu.entity} sample", partial(self._read, gpu, now_ms))
            except GpuLost as exc:
                out.extend(gpu.tracker.mark_lost(now_ms, exc.fn))
                continue
            except NvmlHung as exc:
                out.append(self._hang(exc, now_ms))
                return out
            out.extend(gpu.tracker.update(reading, now_ms))
            pids |= reading.pids()
        self._pids = frozenset(pids)
        return out

    def _hang(self, exc: NvmlHung, now_ms: int) -> Event:
        self._hung = exc
        log.warning("nvml: %s; the probe stops sampling until it is restarted", exc)
        return hung_event(now_ms, exc.fn, exc.timeout_s)

    def _retry_lost(self, gpu: _Gpu, now_ms: int) -> list[Event]:
        gpu.lost_passes += 1
        if gpu.handle is None or gpu.lost_passes % LOST_RETRY_SAMPLES:
            return []
        nv = self._nvml
        assert nv is not None
        try:
            nv.call("nvmlDeviceGetTemperature", gpu.handle, NVML_TEMPERATURE_GPU, gpu=gpu.index)
        except GpuLost:
            return []
        except NvmlCallError:
            return []
        gpu.lost_passes = 0
        return gpu.tracker.mark_recovered(now_ms)

    def _get(self, fn_name: str, *args: Any, gpu: int | None = None, sub: str | None = None) -> Any | None:
        """``Nvml.call`` with other NVML errors logged (once per function and GPU) as None."""
        nv = self._nvml
        assert nv is not None
        try:
            return nv.call(fn_name, *args, gpu=gpu, sub=sub)
        except NvmlCallError as exc:
            key = (fn_name, gpu)
            if key not in self._call_errors:
                self._call_errors.add(key)
                log.warning("nvml: %s%s (not reported)", exc, f" on gpu-{gpu}" if gpu is not None else "")
            return None

    def _read(self, g: _Gpu, now_ms: int) -> GpuReading:
        """Everything about one GPU in one pass; runs on the watchdog worker."""
        nv = self._nvml
        assert nv is not None
        h, i = g.handle, g.index
        util = self._get("nvmlDeviceGetUtilizationRates", h, gpu=i)
        mem = self._get("nvmlDeviceGetMemoryInfo", h, gpu=i)
        reasons = self._get(_EVENTS_FN, h, gpu=i)
        if reasons is None and nv.is_unsupported(_EVENTS_FN, i):
            reasons = self._get(_THROTTLE_FN, h, gpu=i)  # older driver / nvidia-ml-py
        remap = self._get("nvmlDeviceGetRemappedRows", h, gpu=i)
        gen = _int(self._get("nvmlDeviceGetCurrPcieLinkGeneration", h, gpu=i))
        width = _int(self._get("nvmlDeviceGetCurrPcieLinkWidth", h, gpu=i))
        pcie = None
        if gen is not None and width is not None and g.max_gen is not None and g.max_width is not None:
            pcie = PcieReading(gen, g.max_gen, width, g.max_width)
        nvlink: dict[int, bool] = {}
        nvlink_errors: dict[tuple[int, str], int] = {}
        for link in g.links:
            state = self._get("nvmlDeviceGetNvLinkState", h, link, gpu=i, sub=f"nvlink-{link}")
            if state is not None:
                nvlink[link] = int(state) == 1
            if self.nvlink_counters:
                for counter, cname in NVLINK_COUNTERS.items():
                    sub = f"nvlink-{link}:{cname}"
                    value = self._get("nvmlDeviceGetNvLinkErrorCounter", h, link, counter, gpu=i, sub=sub)
                    if value is not None:
                        nvlink_errors[(link, cname)] = int(value)
        procs: tuple[ProcessReading, ...] | None = None
        proc_util: dict[int, int] | None = None
        mig: tuple[MigReading, ...] = ()
        if g.mig:
            mig = self._read_mig(g)
        else:
            procs = self._processes(h, i)
            if procs:
                proc_util = self._proc_util(g, now_ms)
        return GpuReading(
            util_gpu=_int_attr(util, "gpu"),
            util_mem=_int_attr(util, "memory"),
            mem_used=_int_attr(mem, "used"),
            mem_total=_int_attr(mem, "total"),
            temp_c=_int(self._get("nvmlDeviceGetTemperature", h, NVML_TEMPERATURE_GPU, gpu=i)),
            power_mw=_int(self._get("nvmlDeviceGetPowerUsage", h, gpu=i)),
            sm_clock_mhz=_int(self._get("nvmlDeviceGetClockInfo", h, NVML_CLOCK_SM, gpu=i)),
            clock_reasons=_int(reasons),
            ecc_dbe=_int(
                self._get(
                    "nvmlDeviceGetTotalEccErrors", h, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC, gpu=i
                )
            ),
            remap=RemapReading(int(remap[0]), int(remap[1]), bool(remap[2]), bool(remap[3])) if remap else None,
            pcie=pcie,
            pcie_replay=_int(self._get("nvmlDeviceGetPcieReplayCounter", h, gpu=i)),
            nvlink=nvlink,
            nvlink_errors=nvlink_errors,
            processes=procs,
            proc_util=proc_util,
            mig_enabled=g.mig,
            mig=mig,
        )

    def _processes(self, handle: Any, index: int, sub: str | None = None) -> tuple[ProcessReading, ...] | None:
        raw = self._get("nvmlDeviceGetComputeRunningProcesses", handle, gpu=index, sub=sub)
        if raw is None:
            return None
        out: list[ProcessReading] = []
        for proc in raw:
            pid = _int(getattr(proc, "pid", None))
            if pid is None or pid <= 0:
                continue
            out.append(ProcessReading(pid, _int(getattr(proc, "usedGpuMemory", None))))
        return tuple(out)

    def _proc_util(self, g: _Gpu, now_ms: int) -> dict[int, int] | None:
        nv = self._nvml
        assert nv is not None
        since = g.putil_since_us if g.putil_since_us is not None else now_ms * 1000 - FIRST_PUTIL_WINDOW_US
        g.putil_since_us = now_ms * 1000
        samples = self._get("nvmlDeviceGetProcessUtilization", g.handle, since, gpu=g.index)
        if samples is None:
            # NotFound: no samples since `since` (idle, or no context yet); NotSupported: unknown.
            return None if nv.is_unsupported("nvmlDeviceGetProcessUtilization", g.index) else {}
        latest: dict[int, tuple[int, int]] = {}
        for s in samples:
            pid, ts, sm = _int(getattr(s, "pid", None)), _int(getattr(s, "timeStamp", 0)) or 0, _int(s.smUtil)
            if pid is None or sm is None:
                continue
            if pid not in latest or ts >= latest[pid][0]:
                latest[pid] = (ts, sm)
        return {pid: min(100, max(0, sm)) for pid, (_, sm) in latest.items()}

    def _read_mig(self, g: _Gpu) -> tuple[MigReading, ...]:
        out: list[MigReading] = []
        for k in range(g.mig_max):
            mh = self._get("nvmlDeviceGetMigDeviceHandleByIndex", g.handle, k, gpu=g.index, sub="mig")
            if mh is None:
                continue  # NotFound: no MIG device at this index
            gi = _int(self._get("nvmlDeviceGetGpuInstanceId", mh, gpu=g.index, sub="mig"))
            if gi is None:
                continue
            uuid = g.mig_uuids.get(gi)
            if uuid is None:
                uuid = g.mig_uuids[gi] = _text(self._get("nvmlDeviceGetUUID", mh, gpu=g.index, sub="mig"))
            mem = self._get("nvmlDeviceGetMemoryInfo", mh, gpu=g.index, sub="mig")
            out.append(
                MigReading(
                    gi_id=gi,
                    uuid=uuid,
                    mem_used=_int_attr(mem, "used"),
                    mem_total=_int_attr(mem, "total"),
                    processes=self._processes(mh, g.index, sub="mig"),
                )
            )
        return tuple(out)

    # -- XID events --------------------------------------------------------------------------

    def start_xid(self, emit: Callable[[Event], None], clock: Clock) -> bool:
        """Start the XID thread (after :meth:`open`); False when there is nothing to wait on."""
        if self._event_set is None or self._nvml is None or self._xid_thread is not None:
            return False
        self._xid_stop = threading.Event()
        self._xid_thread = threading.Thread(
            target=self._xid_loop,
            args=(self._nvml, self._event_set, emit, clock, self._xid_stop),
            name="nvml-xid",
            daemon=True,
        )
        self._xid_thread.start()
        return True

    def stop_xid(self, timeout_s: float = 1.5) -> bool:
        """Stop the XID thread; True when it has ended (it notices within ``xid_wait_ms``)."""
        thread = self._xid_thread
        if thread is None:
            return True
        self._xid_stop.set()
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("nvml: the XID thread did not stop within %.1f s; leaving it", timeout_s)
            return False
        self._xid_thread = None
        return True

    def xid_running(self) -> bool:
        return self._xid_thread is not None and self._xid_thread.is_alive()

    def _xid_loop(
        self, nv: Nvml, event_set: Any, emit: Callable[[Event], None], clock: Clock, stop: threading.Event
    ) -> None:
        failures = 0
        while not stop.is_set():
            try:
                data = nv.raw("nvmlEventSetWait", event_set, self.xid_wait_ms)
            except Exception as exc:  # noqa: BLE001 - any failure: wait and try again
                code = error_code(self.lib, exc)
                if code == NVML_ERROR_TIMEOUT:
                    continue
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("nvml: waiting for XID events failed (%d times): %s", failures, error_text(exc))
                stop.wait(1.0)
                continue
            failures = 0
            if not int(getattr(data, "eventType", 0) or 0) & NVML_EVENT_TYPE_XID:
                continue
            index = self._index_of(nv, getattr(data, "device", None))
            gi = _int(getattr(data, "gpuInstanceId", None))
            gpu = self._gpus[index] if index is not None and index < len(self._gpus) else None
            instance = gi if gpu is not None and gpu.mig and gi is not None and gi != NVML_NO_INSTANCE else None
            emit(xid_event(clock(), index, int(data.eventData), gpu_instance=instance))

    def _index_of(self, nv: Nvml, device: Any) -> int | None:
        if device is None:
            return None
        for g in self._gpus:
            if g.handle is device:
                return g.index
        index = self._handle_index.get(_handle_key(device))
        if index is not None:
            return index
        try:
            return int(nv.raw("nvmlDeviceGetIndex", device))
        except Exception:  # noqa: BLE001 - unknown device: report without an index
            return None

    # -- the probe loop ----------------------------------------------------------------------

    def run(self, ctx: ProbeContext) -> None:
        try:
            while not ctx.stop.is_set():
                started = time.monotonic()
                for event in self.sample(ctx.clock()):
                    ctx.emit(event)
                ctx.cycle(time.monotonic() - started)
                if self._hung is not None:
                    # Stop beating: the supervisor reports the probe hung and restarts it.
                    self.stop_xid()
                    ctx.stop.wait()
                    return
                if self._xid_thread is None and self._event_set is not None:
                    self.start_xid(ctx.emit, ctx.clock)
                ctx.beat()
                ctx.stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
        finally:
            self.close()


def _int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _int_attr(obj: Any, name: str) -> int | None:
    return None if obj is None else _int(getattr(obj, name, None))
