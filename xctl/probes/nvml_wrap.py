"""The one door to NVML: error mapping and a watchdog around every call.

:class:`Nvml` holds the NVML module (the real ``pynvml``, or a fake with the same function
names, passed in as ``lib``) and runs calls on one dedicated worker thread, waiting at most
``timeout_s`` for each. What a call can end in:

- a value;
- ``None`` for NotSupported and FunctionNotFound (also a function missing from an older
  ``pynvml``) — logged once per function name at INFO and remembered per (function, GPU,
  sub-resource), so an unsupported call is not repeated every sample — and for NotFound
  (normal: ``nvmlDeviceGetProcessUtilization`` before any process has a CUDA context), and
  for pynvml's ``NVMLError(NVML_SUCCESS)`` (a two-call query that found nothing to list);
- :class:`GpuLost` for GPU_IS_LOST (the caller marks that GPU lost);
- :class:`NvmlHung` when the call has not returned within ``timeout_s``: the worker thread is
  abandoned (a Python thread cannot be killed), and every later call on this wrapper raises
  :class:`NvmlHung` at once;
- :class:`NvmlCallError` for any other NVML error (NoPermission, Unknown, …).

Errors are recognised by their NVML code (``NVMLError.value``), never by class, so a fake
raising ``pynvml.NVMLError(3)`` behaves exactly as the real library does.

:meth:`Nvml.batch` runs a whole function on the worker; ``call`` made inside it runs
directly (same mapping, no thread hand-off), so a per-GPU sampling pass costs one hand-off,
not one per NVML call. The deadline still applies per call: it runs from the start of the
call in progress. :meth:`Nvml.raw` bypasses both the worker and the
mapping, for ``nvmlEventSetWait``, which legitimately blocks for its timeout.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from xctl.core.errors import ProbeError

log = logging.getLogger(__name__)

T = TypeVar("T")

# NVML return codes (nvml.h; the same numbers as pynvml's NVML_ERROR_*).
NVML_SUCCESS: Final = 0
NVML_ERROR_INVALID_ARGUMENT: Final = 2
NVML_ERROR_NOT_SUPPORTED: Final = 3
NVML_ERROR_NO_PERMISSION: Final = 4
NVML_ERROR_NOT_FOUND: Final = 6
NVML_ERROR_DRIVER_NOT_LOADED: Final = 9
NVML_ERROR_TIMEOUT: Final = 10
NVML_ERROR_LIBRARY_NOT_FOUND: Final = 12
NVML_ERROR_FUNCTION_NOT_FOUND: Final = 13
NVML_ERROR_GPU_IS_LOST: Final = 15

DEFAULT_TIMEOUT_S: Final = 5.0
#: Stuck (abandoned) worker threads tolerated process-wide before a new wrapper is refused.
MAX_ABANDONED: Final = 4

_UNSUPPORTED_CODES: Final = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND})

INSTALL_HINT: Final = "NVML not available: install xctl[gpu] (pip install 'xctl[gpu]', which brings nvidia-ml-py)"


class NvmlHung(Exception):  # noqa: N818 - the name says what happened
    """An NVML call did not return within the watchdog timeout."""

    def __init__(self, fn: str, timeout_s: float) -> None:
        self.fn = fn
        self.timeout_s = timeout_s
        super().__init__(f"NVML call {fn} did not return within {timeout_s:g} s")


class GpuLost(Exception):  # noqa: N818 - the name says what happened
    """NVML answered GPU_IS_LOST. ``index`` is the GPU the call was about, if known."""

    def __init__(self, index: int | None, fn: str) -> None:
        self.index = index
        self.fn = fn
        where = f"gpu-{index}" if index is not None else "a GPU"
        super().__init__(f"{where} is lost (NVML GPU_IS_LOST from {fn})")


class NvmlCallError(Exception):
    """Any other NVML error: ``code`` is the NVML return code."""

    def __init__(self, fn: str, code: int | None, text: str) -> None:
        self.fn = fn
        self.code = code
        super().__init__(f"{fn}: {text} (NVML error {code})")


def load_pynvml() -> Any:
    """Import ``pynvml`` (nvidia-ml-py) or raise :class:`ProbeError` saying how to get it.

    Importing pynvml does not load libnvidia-ml.so: that happens in ``nvmlInit``.
    """
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise ProbeError(f"{INSTALL_HINT} ({exc})") from exc


def error_code(lib: Any, exc: BaseException) -> int | None:
    """The NVML return code of an exception from ``lib``, or ``None`` if it is not an NVMLError."""
    cls = getattr(lib, "NVMLError", None)
    if isinstance(cls, type) and isinstance(exc, cls):
        value = getattr(exc, "value", None)
        return value if isinstance(value, int) else None
    return None


def error_text(exc: BaseException) -> str:
    try:
        return str(exc) or type(exc).__name__
    except Exception:  # noqa: BLE001 - pynvml's __str__ may call into the library
        return type(exc).__name__


@dataclass(eq=False)
class _Job:
    thunk: Callable[[], Any]
    label: str
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    exc: BaseException | None = None


_abandoned: list[threading.Thread] = []
_abandoned_lock = threading.Lock()


def abandoned_workers() -> int:
    """How many watchdog workers are still stuck in an NVML call, process-wide."""
    with _abandoned_lock:
        _abandoned[:] = [t for t in _abandoned if t.is_alive()]
        return len(_abandoned)


class Nvml:
    """Every NVML call goes through here (see the module doc)."""

    def __init__(self, lib: Any, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if timeout_s <= 0:
            raise ProbeError(f"nvml: timeout must be positive seconds, not {timeout_s!r}")
        stuck = abandoned_workers()
        if stuck >= MAX_ABANDONED:
            raise ProbeError(
                f"nvml: {stuck} earlier NVML calls are still hung; not starting another worker "
                "(the NVIDIA driver looks wedged: check dmesg, then reset the GPU or reboot)"
            )
        self.lib = lib
        self.timeout_s = timeout_s
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._worker_id: int | None = None
        self._lock = threading.Lock()
        self._current: str | None = None
        self._call_started = 0.0
        self._hung: str | None = None
        self._closed = False
        self._logged: set[str] = set()
        self._unsupported: set[tuple[str, int | None, str | None]] = set()

    # -- state --

    @property
    def hung(self) -> str | None:
        """The function that hung, once one has."""
        return self._hung

    def unsupported(self) -> set[str]:
        """Names of functions that answered NotSupported / FunctionNotFound at least once."""
        with self._lock:  # describe() may ask from another thread while the worker adds
            return {fn for fn, _, _ in self._unsupported}

    def is_unsupported(self, fn_name: str, gpu: int | None = None, sub: str | None = None) -> bool:
        return (fn_name, gpu, sub) in self._unsupported

    def has(self, fn_name: str) -> bool:
        """Whether the NVML module has this function at all (older pynvml lacks newer ones)."""
        return callable(getattr(self.lib, fn_name, None))

    # -- calls --

    def call(self, fn_name: str, *args: Any, gpu: int | None = None, sub: str | None = None) -> Any | None:
        """Call ``lib.fn_name(*args)`` under the watchdog; see the module doc for outcomes.

        ``gpu`` names the GPU the call is about (for :class:`GpuLost` and the unsupported
        memo); ``sub`` a sub-resource (``nvlink-3``, ``mig``) with its own memo.
        """
        if (fn_name, gpu, sub) in self._unsupported:
            return None
        if self._on_worker():
            return self._invoke(fn_name, args, gpu, sub)
        return self._submit(fn_name, lambda: self._invoke(fn_name, args, gpu, sub))

    def batch(self, label: str, func: Callable[[], T]) -> T:
        """Run ``func`` on the worker; its ``call``s run directly, each under the deadline."""
        if self._on_worker():
            return func()
        result: T = self._submit(label, func)
        return result

    def raw(self, fn_name: str, *args: Any) -> Any:
        """Call directly on this thread, no watchdog, no mapping (for blocking waits)."""
        return getattr(self.lib, fn_name)(*args)

    def close(self) -> None:
        """Stop the worker (a hung one is left behind as an abandoned daemon thread)."""
        with self._lock:
            self._closed = True
            worker = self._worker
        if worker is not None and self._hung is None:
            self._queue.put(None)
            worker.join(self.timeout_s)

    # -- internals --

    def _on_worker(self) -> bool:
        return self._worker_id is not None and threading.get_ident() == self._worker_id

    def _submit(self, label: str, thunk: Callable[[], Any]) -> Any:
        if self._hung is not None:
            raise NvmlHung(self._hung, self.timeout_s)
        self._ensure_worker()
        job = _Job(thunk, label)
        queued = time.monotonic()
        self._queue.put(job)
        while not job.done.is_set():
            # The deadline runs from the start of the call in progress: a batch of many quick
            # calls is not "hung", one call that does not return is.
            remaining = max(queued, self._call_started) + self.timeout_s - time.monotonic()
            if remaining <= 0 or job.done.wait(remaining):
                break
        if not job.done.is_set():
            fn = self._current or label
            self._hung = fn
            if self._worker is not None:
                with _abandoned_lock:
                    _abandoned.append(self._worker)
            self._queue.put(None)  # if the stuck call ever returns, the worker ends there
            log.warning("NVML call %s did not return within %.1f s; abandoning its thread", fn, self.timeout_s)
            raise NvmlHung(fn, self.timeout_s)
        if job.exc is not None:
            raise job.exc
        return job.result

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._closed:
                raise ProbeError("nvml: the NVML wrapper is closed")
            if self._worker is None:
                ready = threading.Event()
                self._worker = threading.Thread(target=self._work, args=(ready,), name="nvml-call", daemon=True)
                self._worker.start()
                ready.wait()

    def _work(self, ready: threading.Event) -> None:
        self._worker_id = threading.get_ident()
        ready.set()
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job.result = job.thunk()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                job.exc = exc
            finally:
                self._current = None
                job.done.set()

    def _invoke(self, fn_name: str, args: tuple[Any, ...], gpu: int | None, sub: str | None) -> Any | None:
        fn = getattr(self.lib, fn_name, None)
        if not callable(fn):
            self._not_supported(fn_name, gpu, sub, "not in this nvidia-ml-py")
            return None
        self._current = fn_name
        self._call_started = time.monotonic()
        try:
            return fn(*args)
        except Exception as exc:
            code = error_code(self.lib, exc)
            if code == NVML_SUCCESS:
                # pynvml's two-call queries raise NVMLError(SUCCESS) when there is nothing to list.
                return None
            if code is None:
                raise NvmlCallError(fn_name, None, f"{type(exc).__name__}: {error_text(exc)}") from exc
            if code in _UNSUPPORTED_CODES:
                self._not_supported(fn_name, gpu, sub, error_text(exc))
                return None
            if code == NVML_ERROR_NOT_FOUND:
                return None
            if code == NVML_ERROR_GPU_IS_LOST:
                raise GpuLost(gpu, fn_name) from exc
            raise NvmlCallError(fn_name, code, error_text(exc)) from exc
        finally:
            self._current = None

    def _not_supported(self, fn_name: str, gpu: int | None, sub: str | None, why: str) -> None:
        with self._lock:
            self._unsupported.add((fn_name, gpu, sub))
        if fn_name not in self._logged:
            self._logged.add(fn_name)
            where = f" on gpu-{gpu}" if gpu is not None else ""
            log.info("NVML %s not supported%s (%s): not reported", fn_name, where, why)
