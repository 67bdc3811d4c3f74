"""Probe SPEC strings (DESIGN §7) → probe instances.

``procfs``, ``nvml``, ``kmsg``, ``network``, ``storage``, ``exec:COMMAND``, ``replay:FILE``,
``sim[:key=value,...]``. Probe modules are imported only when asked for, so an agent that
does not use NVML never imports pynvml.
"""

from __future__ import annotations

import importlib
from typing import Final

from xctl.core.errors import ProbeError
from xctl.probes.base import Probe

#: name → (module, class). Each class has ``from_spec(arg: str | None) -> Probe``.
_PROBES: Final[dict[str, tuple[str, str]]] = {
    "procfs": ("xctl.probes.procfs", "ProcfsProbe"),
    "nvml": ("xctl.probes.nvml", "NvmlProbe"),
    "kmsg": ("xctl.probes.kmsg", "KmsgProbe"),
    "network": ("xctl.probes.network", "NetworkProbe"),
    "storage": ("xctl.probes.storage", "StorageProbe"),
    "exec": ("xctl.probes.exec_probe", "ExecProbe"),
    "replay": ("xctl.probes.replay", "ReplayProbe"),
    "sim": ("xctl.probes.sim", "SimProbe"),
}

#: Probes that take an argument after the colon and may be given several times.
_NEEDS_ARG: Final = frozenset({"exec", "replay"})


def known_probes() -> list[str]:
    return sorted(_PROBES)


def make_probe(spec: str) -> Probe:
    """Build a probe from its SPEC; raises :class:`ProbeError` with what to do instead."""
    name, sep, arg = spec.partition(":")
    name = name.strip()
    if name not in _PROBES:
        raise ProbeError(f"unknown probe {spec!r}: use one of {', '.join(known_probes())}")
    if name in _NEEDS_ARG and not arg:
        raise ProbeError(f"probe {name!r} needs an argument: {name}:{'COMMAND' if name == 'exec' else 'FILE'}")
    module_name, class_name = _PROBES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProbeError(f"probe {name!r} is not available: {exc}") from exc
    cls = getattr(module, class_name)
    probe: Probe = cls.from_spec(arg if sep else None)
    return probe
