"""The kmsg probe: follows the kernel log (``/dev/kmsg``) and turns the lines that matter on a
GPU node into events (parsing and event forms: :mod:`xctl.probes.kmsg_parse`).

``/dev/kmsg`` semantics: each ``read(2)`` returns exactly one record (and fails with EINVAL if
the buffer is too small, so the buffer is 16 KiB); EPIPE means the ring buffer wrapped past our
position and records were lost (counted as ``kmsg_overrun``, then reading goes on). The file is
opened non-blocking and polled with a short timeout, so a stop request is noticed within
``poll_s`` and shutdown never blocks. By default reading starts at the end (only new
messages); ``replay=True`` starts at the oldest record still in the ring buffer.

PCIe AER errors are put on the GPU they hit: a GPU's own address is mapped to ``gpu-N`` like an
Xid's, and a bridge or root port is looked up in sysfs (:class:`SysfsGpusBelow`): the GPUs
whose ``/sys/bus/pci/devices/ADDR`` path passes through it each get the event.

A regular file (a saved kmsg dump or dmesg output) works too: records are split at newlines,
so tests and replays can point ``path`` at a fixture.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import time
from collections.abc import Callable, Iterable
from typing import Final

from xctl.core.events import Event
from xctl.probes.base import ProbeContext
from xctl.probes.kmsg_parse import (
    GpuIndex,
    KernelLogInterpreter,
    KmsgRecord,
    gpus_below,
    normalize_pci,
    parse_any,
)
from xctl.probes.procfs import spec_args, spec_bool

log = logging.getLogger(__name__)

READ_BUFFER: Final = 16384
DEFAULT_POLL_S: Final = 0.5
#: How long to wait before trying again to open a log that could not be opened.
RETRY_S: Final = 30.0
#: At most this many records per drain before the stop flag is looked at again.
MAX_RECORDS_PER_DRAIN: Final = 1000


def _noop_bad(reason: str) -> None:
    del reason


class SysfsGpuIndex:
    """PCI bus id → GPU index from ``<sys_root>/bus/pci/drivers/nvidia/`` (sorted addresses).

    NVML numbers GPUs in PCI bus order too, so this agrees with ``nvidia-smi`` when NVML is not
    loaded. The directory is re-read at most every ``refresh_s`` seconds when an address is
    not found (a GPU that fell off the bus keeps its last index until then).
    """

    def __init__(
        self, sys_root: str = "/sys", *, refresh_s: float = 30.0, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = os.path.join(sys_root, "bus", "pci", "drivers", "nvidia")
        self.refresh_s = refresh_s
        self.monotonic = monotonic
        self._index: dict[str, int] = {}
        self._loaded_at: float | None = None

    def addresses(self) -> list[str]:
        try:
            names = os.listdir(self.path)
        except OSError:
            return []
        found = {normalize_pci(n) for n in names}
        return sorted(a for a in found if a is not None)

    def _load(self) -> None:
        self._index = {addr: i for i, addr in enumerate(self.addresses())}
        self._loaded_at = self.monotonic()

    def __call__(self, bus_id: str) -> int | None:
        norm = normalize_pci(bus_id)
        if norm is None:
            return None
        if self._loaded_at is None:
            self._load()
        index = self._index.get(norm)
        if index is None and self._loaded_at is not None and self.monotonic() - self._loaded_at >= self.refresh_s:
            self._load()
            index = self._index.get(norm)
        return index

    def __len__(self) -> int:
        if self._loaded_at is None:
            self._load()
        return len(self._index)


def _no_addresses() -> list[str]:
    return []


class SysfsGpusBelow:
    """PCI address of a bridge or port → the GPUs downstream of it, from the device paths
    (``realpath <sys_root>/bus/pci/devices/ADDR``) of the GPUs the sysfs index lists plus those
    ``extra()`` (NVML) knows. The paths are re-read at most every ``refresh_s`` seconds."""

    def __init__(
        self,
        sys_root: str,
        index: SysfsGpuIndex,
        *,
        refresh_s: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.devices = os.path.join(sys_root, "bus", "pci", "devices")
        self.index = index
        #: More GPU addresses (settable: the agent wires it to NVML's).
        self.extra: Callable[[], Iterable[str]] = _no_addresses
        self.refresh_s = refresh_s
        self.monotonic = monotonic
        self._paths: dict[str, str] = {}
        self._loaded_at: float | None = None

    def _load(self) -> None:
        found = {normalize_pci(a) for a in (*self.index.addresses(), *self.extra())}
        paths: dict[str, str] = {}
        for addr in sorted(a for a in found if a is not None):
            link = os.path.join(self.devices, addr)
            if os.path.exists(link):
                paths[addr] = os.path.realpath(link)
        self._paths = paths
        self._loaded_at = self.monotonic()

    def __call__(self, port: str) -> list[str]:
        norm = normalize_pci(port)
        if norm is None:
            return []
        if self._loaded_at is None or self.monotonic() - self._loaded_at >= self.refresh_s:
            self._load()
        return gpus_below(norm, self._paths)


def chain_gpu_index(first: GpuIndex | None, fallback: GpuIndex) -> GpuIndex:
    """Ask ``first`` (e.g. NVML); if it does not know the address, ask ``fallback``."""
    if first is None:
        return fallback

    def lookup(bus_id: str) -> int | None:
        index = first(bus_id)
        return index if index is not None else fallback(bus_id)

    return lookup


class KmsgProbe:
    """Follows ``path`` (default ``/dev/kmsg``); see the module doc."""

    name = "kmsg"
    heartbeat_s: float | None = 15.0

    def __init__(
        self,
        path: str = "/dev/kmsg",
        *,
        sys_root: str = "/sys",
        gpu_index: GpuIndex | None = None,
        replay: bool = False,
        kernel_only: bool = True,
        poll_s: float = DEFAULT_POLL_S,
        retry_s: float = RETRY_S,
    ) -> None:
        self.path = path
        self.sys_root = sys_root
        self.replay = replay
        self.poll_s = min(poll_s, DEFAULT_POLL_S)
        self.retry_s = retry_s
        self.sysfs_index = SysfsGpuIndex(sys_root)
        self.gpus_below = SysfsGpusBelow(sys_root, self.sysfs_index)
        self.interpreter = KernelLogInterpreter(
            chain_gpu_index(gpu_index, self.sysfs_index), gpus_below=self.gpus_below, kernel_only=kernel_only
        )
        self._fd: int | None = None
        self._regular = False
        self._partial = b""
        self._problem: str | None = None
        self._poller: select.poll | None = None

    def use_gpu_index(self, lookup: GpuIndex, addresses: Callable[[], Iterable[str]] | None = None) -> None:
        """Map PCI addresses to gpu-N with ``lookup`` (NVML) first, then the sysfs fallback;
        ``addresses`` (NVML's GPUs) are looked for below a port in error too."""
        self.interpreter.gpu_index = chain_gpu_index(lookup, self.sysfs_index)
        if addresses is not None:
            self.gpus_below.extra = addresses

    @classmethod
    def from_spec(cls, arg: str | None) -> KmsgProbe:
        args = spec_args(arg, ("path", "sys", "replay"), "kmsg")
        return cls(
            args.get("path", "/dev/kmsg"),
            sys_root=args.get("sys", "/sys"),
            replay=spec_bool(args, "replay", False, "kmsg"),
        )

    def describe(self) -> str:
        if self._problem:
            return f"kmsg: {self._problem}"
        start = "from the oldest record" if self.replay else "new records only"
        return f"kmsg: {self.path} ({start}; Xid/SXid, NVMe, AER, OOM, hung tasks, NIC links)"

    # -- file handling --

    def open(self) -> bool:
        """Open the log (at its end unless replaying). False, with :meth:`describe` saying why, if not."""
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            if self._problem != f"{self.path} not readable ({reason})":
                log.info("kmsg: cannot open %s: %s", self.path, reason)
            self._problem = f"{self.path} not readable ({reason})"
            return False
        try:
            self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
            if not self.replay:
                os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(fd)
            self._problem = f"{self.path} not seekable ({(exc.strerror or str(exc)).lower()})"
            return False
        self._fd = fd
        self._partial = b""
        self._problem = None
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLERR)
        self._poller = poller
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._poller = None

    def wait_readable(self, timeout_s: float) -> bool:
        if self._poller is None:
            return False
        return bool(self._poller.poll(max(0, int(timeout_s * 1000))))

    def read_records(self, bad: Callable[[str], None] = _noop_bad) -> tuple[list[KmsgRecord], bool]:
        """Read what is there now (bounded). Returns (records, at_end)."""
        records: list[KmsgRecord] = []
        if self._fd is None:
            return records, True
        for _ in range(MAX_RECORDS_PER_DRAIN):
            try:
                data = os.read(self._fd, READ_BUFFER)
            except BlockingIOError:
                return records, True
            except BrokenPipeError:
                bad("kmsg_overrun")  # ring buffer wrapped: records lost; the next read goes on
                continue
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    bad("kmsg_record_too_large")
                    continue
                raise
            if not data:
                return records, True
            for line in self._split(data):
                record = parse_any(line)
                if record is None:
                    bad("kmsg_malformed")
                else:
                    records.append(record)
        return records, False

    def _split(self, data: bytes) -> list[bytes]:
        """One /dev/kmsg read is one record; a regular file gives many lines per read."""
        if not self._regular:
            first = data.split(b"\n", 1)[0]
            return [first] if first else []
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > READ_BUFFER:
            self._partial = b""
        return [ln for ln in lines if ln and not ln.startswith(b" ")]

    def sample(self, now_ms: int, bad: Callable[[str], None] = _noop_bad) -> tuple[list[Event], bool]:
        """Read what is available and interpret it. Returns (events, at_end)."""
        records, at_end = self.read_records(bad)
        events: list[Event] = []
        for record in records:
            events.extend(self.interpreter.feed(record, now_ms))
        return events, at_end

    def run(self, ctx: ProbeContext) -> None:
        last_beat = 0.0
        try:
            while not ctx.stop.is_set():
                if not self.open():
                    ctx.beat()
                    ctx.stop.wait(self.retry_s)
                    continue
                ready = self.wait_readable(self.poll_s)
                if ready:
                    try:
                        events, at_end = self.sample(ctx.clock(), ctx.bad)
                    except OSError as exc:
                        log.warning("kmsg: reading %s failed (%s); reopening", self.path, exc)
                        self._problem = f"{self.path} read failed ({(exc.strerror or str(exc)).lower()})"
                        self.close()
                        ctx.stop.wait(self.poll_s)
                        continue
                    for event in events:
                        ctx.emit(event)
                    if at_end and self._regular:
                        ctx.stop.wait(self.poll_s)  # a plain file is always "readable": do not spin
                now = time.monotonic()
                if now - last_beat >= 1.0:
                    ctx.beat()
                    last_beat = now
        finally:
            self.close()
