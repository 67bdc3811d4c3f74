"""A fake of the ``pynvml`` module: same function names and signatures, the values observed on
a real H100 80GB HBM3 (shared/fixtures/h100-observed.md), and knobs to inject faults.

Errors are ``pynvml.NVMLError(code)`` — the real class, so the wrapper sees exactly what the
real library raises (importing pynvml does not load libnvidia-ml.so).

Knobs (all on :class:`FakeNvml` or its :class:`FakeGpu` list ``fake.gpus``)::

    fake.not_supported("nvmlDeviceGetNvLinkState")          NotSupported (all GPUs)
    fake.not_supported("nvmlDeviceGetPowerUsage", gpu=1)      … on one GPU
    fake.fail("nvmlInit", 9)                                  any NVML error code
    fake.remove("nvmlDeviceGetCurrentClocksEventReasons")     an older nvidia-ml-py
    fake.lose(1)                                              GPU_IS_LOST on every call for gpu 1
    release = fake.hang("nvmlDeviceGetTemperature")           blocks until release.set()
    fake.slow("nvmlDeviceGetTemperature", 0.1)                slow, not hung
    fake.xid(0, 31)                                           an XID event for the event set
    fake.run_workload(0, pid=515)                             the observed torch matmul loop
    g = fake.gpus[0]; g.clock_reasons = 0x40; g.ecc_dbe += 1; g.remap = (0, 1, 1, 0);
    g.pcie_gen = 1; g.nvlink = [1, 1, 0, 1]; g.processes = [(pid, bytes)]; g.proc_util = [(pid, sm)]
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

NVMLError = pynvml.NVMLError

NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_NVLINK_MAX_LINKS = 18
nvmlEventTypeXidCriticalError = 0x8  # noqa: N816 - pynvml's name

# Observed on the H100 (h100-observed.md).
H100_NAME = "NVIDIA H100 80GB HBM3"
H100_UUID = "GPU-74cdf925-0ac8-a63e-6542-5311bdc049dd"
H100_BUS = "00000000:00:06.0"
H100_MEM_TOTAL = 85520809984
H100_MEM_USED_IDLE = 503316480
H100_TEMP_IDLE = 35
H100_POWER_IDLE_MW = 111828
H100_POWER_LOAD_MW = 696090
H100_SM_CLOCK_LOAD = 1980
H100_PROC_MEM = 1453326336
H100_PID = 515


@dataclass
class FakeGpu:
    index: int
    name: str = H100_NAME
    uuid: str = H100_UUID
    bus_id: str = H100_BUS
    mem_total: int = H100_MEM_TOTAL
    mem_used: int = H100_MEM_USED_IDLE
    util_gpu: int = 0
    util_mem: int = 0
    temp_c: int = H100_TEMP_IDLE
    power_mw: int = H100_POWER_IDLE_MW
    sm_clock: int = H100_SM_CLOCK_LOAD  # only observed under load
    clock_reasons: int = 1  # GPU idle
    ecc_dbe: int = 0
    remap: tuple[int, int, int, int] = (0, 0, 0, 0)
    pcie_gen: int = 5
    pcie_max_gen: int = 5
    pcie_width: int = 16
    pcie_max_width: int = 16
    pcie_replay: int = 0
    #: Per link 1/0; empty = NotSupported (the single PCIe H100).
    nvlink: list[int] = field(default_factory=list)
    nvlink_errors: dict[tuple[int, int], int] = field(default_factory=dict)
    #: (pid, usedGpuMemory bytes or None)
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    #: (pid, smUtil, memUtil); empty → NotFound (no samples), as before a CUDA context.
    proc_util: list[tuple[int, int, int]] = field(default_factory=list)
    mig_mode: tuple[int, int] = (0, 0)
    #: gpu instance id → (memory total, used, processes) of a MIG device.
    mig_devices: list[tuple[int, int, int, list[tuple[int, int | None]]]] = field(default_factory=list)
    lost: bool = False


@dataclass(eq=False)
class FakeHandle:
    gpu: FakeGpu
    mig: int | None = None  # index into gpu.mig_devices for a MIG device handle


class FakeEventSet:
    def __init__(self) -> None:
        self.gpus: set[int] = set()
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.freed = False


class FakeNvml:
    """Module-like: ``lib.nvmlDeviceGetCount()`` etc. Thread-safe enough for the probe."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_NVLINK_MAX_LINKS = NVML_NVLINK_MAX_LINKS
    nvmlEventTypeXidCriticalError = nvmlEventTypeXidCriticalError  # noqa: N815 - pynvml's name

    def __init__(self, gpus: int = 1) -> None:
        self.gpus = [FakeGpu(i) for i in range(gpus)]
        if gpus > 1:
            for g in self.gpus:
                g.uuid = f"GPU-74cdf925-0ac8-a63e-6542-5311bdc049{g.index:02x}"
                g.bus_id = f"00000000:{0x18 + g.index * 0x10:02X}:00.0"
        self.calls: Counter[str] = Counter()
        self.initialised = 0
        self.event_sets: list[FakeEventSet] = []
        self.register_events_supported = True
        self.last_putil_ts: dict[int, int] = {}
        self._errors: dict[tuple[str, int | None], int] = {}
        self._delays: dict[str, float] = {}
        self._hangs: dict[str, threading.Event] = {}
        self._handles = {g.index: FakeHandle(g) for g in self.gpus}
        self._lock = threading.Lock()

    # -- knobs --

    def not_supported(self, fn: str, gpu: int | None = None) -> None:
        self.fail(fn, NVML_ERROR_NOT_SUPPORTED, gpu)

    def fail(self, fn: str, code: int, gpu: int | None = None) -> None:
        """Calls to ``fn`` (on ``gpu``, or on any GPU) raise ``NVMLError(code)``."""
        self._errors[(fn, gpu)] = code

    def remove(self, fn: str) -> None:
        """Make ``fn`` absent, as in an older nvidia-ml-py."""
        setattr(self, fn, None)

    def slow(self, fn: str, seconds: float) -> None:
        """Calls to ``fn`` take ``seconds`` (slow, but not hung)."""
        self._delays[fn] = seconds

    def lose(self, gpu: int) -> None:
        self.gpus[gpu].lost = True

    def hang(self, fn: str) -> threading.Event:
        """Calls to ``fn`` block until the returned event is set (at most 30 s)."""
        release = threading.Event()
        self._hangs[fn] = release
        return release

    def release_all(self) -> None:
        for release in self._hangs.values():
            release.set()

    def xid(self, gpu: int, code: int, *, gpu_instance: int = 0xFFFFFFFF) -> None:
        data = SimpleNamespace(
            device=self._handles[gpu],
            eventType=nvmlEventTypeXidCriticalError,
            eventData=code,
            gpuInstanceId=gpu_instance,
            computeInstanceId=0xFFFFFFFF,
        )
        for es in self.event_sets:
            if gpu in es.gpus and not es.freed:
                es.events.put(data)

    def run_workload(self, gpu: int = 0, pid: int = H100_PID) -> None:
        """The torch 8192×8192 matmul loop observed on the H100."""
        g = self.gpus[gpu]
        g.util_gpu, g.util_mem = 100, 9
        g.clock_reasons = 0
        g.power_mw = H100_POWER_LOAD_MW
        g.sm_clock = H100_SM_CLOCK_LOAD
        g.processes = [(pid, H100_PROC_MEM)]
        g.proc_util = [(pid, 100, 9)]
        g.mem_used = H100_MEM_USED_IDLE + H100_PROC_MEM

    # -- plumbing --

    def _enter(self, fn: str, handle: FakeHandle | None = None) -> FakeGpu | None:
        with self._lock:
            self.calls[fn] += 1
        release = self._hangs.get(fn)
        if release is not None:
            release.wait(30)
        delay = self._delays.get(fn)
        if delay:
            time.sleep(delay)  # a slow call on purpose (the workload under test), not synchronisation
        gpu = handle.gpu if handle is not None else None
        if gpu is not None and gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        index = gpu.index if gpu is not None else None
        code = self._errors.get((fn, index), self._errors.get((fn, None)))
        if code is not None:
            raise NVMLError(code)
        return gpu

    def _gpu(self, fn: str, handle: FakeHandle) -> FakeGpu:
        gpu = self._enter(fn, handle)
        assert gpu is not None
        return gpu

    # -- init --

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return "580.159.04"

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        handle = self._handles[index]
        if handle.gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return handle

    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetIndex", handle).index

    # -- identity --

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        g = self._gpu("nvmlDeviceGetUUID", handle)
        if handle.mig is not None:
            return f"MIG-{g.uuid[4:-4]}{g.mig_devices[handle.mig][0]:04x}"
        return g.uuid

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> SimpleNamespace:
        g = self._gpu("nvmlDeviceGetPciInfo", handle)
        return SimpleNamespace(busId=g.bus_id.encode(), domain=0, bus=int(g.bus_id[9:11], 16), device=0)

    # -- metrics --

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> SimpleNamespace:
        g = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        if g.mig_mode[0] == 1:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=g.util_gpu, memory=g.util_mem)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> SimpleNamespace:
        del version
        g = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        if handle.mig is not None:
            _, total, used, _ = g.mig_devices[handle.mig]
            return SimpleNamespace(total=total, used=used, free=total - used)
        return SimpleNamespace(total=g.mem_total, used=g.mem_used, free=g.mem_total - g.mem_used)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return self._gpu("nvmlDeviceGetTemperature", handle).temp_c

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        assert clock_type == NVML_CLOCK_SM
        return self._gpu("nvmlDeviceGetClockInfo", handle).sm_clock

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle).clock_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksThrottleReasons", handle).clock_reasons

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, error_type: int, counter_type: int) -> int:
        assert (error_type, counter_type) == (NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC)
        return self._gpu("nvmlDeviceGetTotalEccErrors", handle).ecc_dbe

    def nvmlDeviceGetRemappedRows(self, handle: FakeHandle) -> tuple[int, int, int, int]:
        return self._gpu("nvmlDeviceGetRemappedRows", handle).remap

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrPcieLinkGeneration", handle).pcie_gen

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetMaxPcieLinkGeneration", handle).pcie_max_gen

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrPcieLinkWidth", handle).pcie_width

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetMaxPcieLinkWidth", handle).pcie_max_width

    def nvmlDeviceGetPcieReplayCounter(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPcieReplayCounter", handle).pcie_replay

    def nvmlDeviceGetNvLinkState(self, handle: FakeHandle, link: int) -> int:
        g = self._gpu("nvmlDeviceGetNvLinkState", handle)
        if not g.nvlink:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if link >= len(g.nvlink):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return g.nvlink[link]

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: FakeHandle, link: int, counter: int) -> int:
        g = self._gpu("nvmlDeviceGetNvLinkErrorCounter", handle)
        if not g.nvlink:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return g.nvlink_errors.get((link, counter), 0)

    # -- processes --

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[SimpleNamespace]:
        g = self._gpu("nvmlDeviceGetComputeRunningProcesses", handle)
        procs = g.mig_devices[handle.mig][3] if handle.mig is not None else g.processes
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in procs]

    def nvmlDeviceGetProcessUtilization(self, handle: FakeHandle, timestamp: int) -> list[SimpleNamespace]:
        g = self._gpu("nvmlDeviceGetProcessUtilization", handle)
        self.last_putil_ts[g.index] = timestamp
        if not g.proc_util:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return [
            SimpleNamespace(pid=pid, timeStamp=timestamp + 1, smUtil=sm, memUtil=mem, encUtil=0, decUtil=0)
            for pid, sm, mem in g.proc_util
        ]

    # -- MIG --

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        return list(self._gpu("nvmlDeviceGetMigMode", handle).mig_mode)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        self._gpu("nvmlDeviceGetMaxMigDeviceCount", handle)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeHandle:
        g = self._gpu("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if index >= len(g.mig_devices):
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return FakeHandle(g, index)

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeHandle) -> int:
        g = self._gpu("nvmlDeviceGetGpuInstanceId", handle)
        if handle.mig is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return g.mig_devices[handle.mig][0]

    # -- events --

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._enter("nvmlEventSetCreate")
        es = FakeEventSet()
        self.event_sets.append(es)
        return es

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, event_types: int, event_set: FakeEventSet) -> None:
        g = self._gpu("nvmlDeviceRegisterEvents", handle)
        if not self.register_events_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        assert event_types & nvmlEventTypeXidCriticalError
        event_set.gpus.add(g.index)

    def nvmlEventSetWait(self, event_set: FakeEventSet, timeout_ms: int) -> Any:
        self._enter("nvmlEventSetWait")
        try:
            return event_set.events.get(timeout=timeout_ms / 1000.0)
        except queue.Empty:
            raise NVMLError(NVML_ERROR_TIMEOUT) from None

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        self._enter("nvmlEventSetFree")
        event_set.freed = True
