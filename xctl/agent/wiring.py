"""Probes that see more together: NVML tells procfs which pids use a GPU (so their whole
process trees are watched) and tells kmsg which gpu-N a PCI address in an Xid or AER line is,
and where its GPUs are (to put an AER on a port above them on each of them).

Probes are restarted as fresh instances, so the link goes through a holder that always
points at the NVML probe currently running, never at a dead instance.
"""

from __future__ import annotations

from typing import Any

from xctl.probes.base import Probe


class GpuView:
    """The current NVML probe, if any, as the two lookups the other probes need."""

    def __init__(self) -> None:
        self.nvml: Any = None

    def gpu_pids(self) -> set[int]:
        nvml = self.nvml
        return set(nvml.gpu_pids()) if nvml is not None else set()

    def gpu_index(self, bus_id: str) -> int | None:
        nvml = self.nvml
        index = nvml.gpu_index(bus_id) if nvml is not None else None
        return index if isinstance(index, int) else None

    def gpu_addresses(self) -> list[str]:
        nvml = self.nvml
        return list(nvml.pci_to_index()) if nvml is not None else []


def link(probe: Probe, view: GpuView) -> Probe:
    """Connect a (new) probe instance to the others through ``view``; returns it."""
    kind = type(probe).__name__
    if kind == "NvmlProbe":
        view.nvml = probe
    elif kind == "ProcfsProbe":
        probe.gpu_pids = view.gpu_pids  # type: ignore[attr-defined]
    elif kind == "KmsgProbe":
        probe.use_gpu_index(view.gpu_index, view.gpu_addresses)  # type: ignore[attr-defined]
    return probe
