"""The actuator: end one process tree on this node — completely, safely, once, with a record.

What a ``zap`` command does (issue 7, DESIGN §6):

1. **Check** the command: a repeated command id is answered from a bounded result cache
   (never executed twice); a command whose deadline has passed is refused (``EXPIRED``).
2. **Resolve** the tree: the target and all its descendants (psutil), nothing outside it.
   Refused, with the reason, and nothing signalled: pid 0 and 1, kernel threads, this agent
   and its ancestors, a pid whose create time differs from the one sent (a reused pid, compared
   with a tolerance of :data:`CTIME_TOLERANCE_S`). A target that no longer exists is reported
   as ``ALREADY_GONE`` (the tree is gone: nothing to do).
3. **Signal**: the tree is frozen (SIGSTOP) and re-scanned until no new child appears, so a
   launcher cannot fork a worker that escapes; then the requested signal (default SIGTERM)
   goes to every member, followed by SIGCONT, so a stopped tree receives it too.
4. **Wait** up to the grace period for the tree to end; **SIGKILL** the survivors (frozen and
   re-scanned again first) and **verify** that they are gone.
5. **Report**, per process, what happened — ``terminated``, ``killed``, ``already_gone``,
   ``zombie`` (dead but not reaped: its parent is named, it must reap it), ``d_state``
   (uninterruptible sleep, with its wchan: SIGKILL takes effect only when the I/O completes),
   ``survived`` or ``refused`` — instead of pretending success.
6. **GPU**: when the tree used a GPU (per NVML, or per the agent's graph), check with NVML that
   no member still holds GPU memory; report the ones that do.
7. **Record**: one JSON line per command and outcome in the agent's audit log (when a path
   is configured); :meth:`Actuator.events` gives the ``action.exec`` ZAP event and the
   ``process.state killed`` events the agent applies to its graph and publishes.

:meth:`Actuator.execute` blocks for up to the grace period: the agent runs it on a worker
thread and hands the result back to its socket thread (see :mod:`xctl.agent.daemon`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import psutil

from xctl.audit import AuditLog
from xctl.core.clock import Clock
from xctl.core.errors import UsageError
from xctl.core.events import AttrValue, Event, EventType
from xctl.core.why import iso
from xctl.sysclock import wall_ms
from xctl.wire.messages import Command, Result

log = logging.getLogger(__name__)

#: Signals a zap may start with (SIGKILL follows for survivors after the grace period).
SIGNALS: Final[dict[str, signal.Signals]] = {
    s.name.removeprefix("SIG"): s
    for s in (
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGABRT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGKILL,
    )
}
DEFAULT_GRACE_S: Final = 10.0
MAX_GRACE_S: Final = 3600.0
#: psutil's create_time is a float; the graph's is rounded to ms. Both come from the same jiffies.
CTIME_TOLERANCE_S: Final = 0.05
#: After SIGKILL: how long to wait for the kernel to end the survivors.
KILL_VERIFY_S: Final = 2.0
#: How long a zombie may wait for its parent to reap it before it is reported.
ZOMBIE_SETTLE_S: Final = 1.0
#: How long NVML may take to release the memory of processes that ended.
GPU_RELEASE_WAIT_S: Final = 2.0
#: The agent keeps this much of the deadline for SIGKILL, verification and the reply.
RESERVE_S: Final = 1.5
#: Results kept for repeated command ids.
RESULT_CACHE: Final = 256
POLL_S: Final = 0.01
#: Most members of one tree (a fork bomb is not followed further).
MAX_TREE: Final = 4096
#: Re-scans of a frozen tree for children forked before the freeze reached their parent.
MAX_RESCANS: Final = 8
PF_KTHREAD: Final = 0x00200000

#: Per-process outcomes.
TERMINATED, KILLED, ALREADY_GONE, ZOMBIE, D_STATE, SURVIVED, REFUSED = (
    "terminated",
    "killed",
    "already_gone",
    "zombie",
    "d_state",
    "survived",
    "refused",
)
GONE_OUTCOMES: Final = frozenset({TERMINATED, KILLED, ALREADY_GONE})

GpuPids = Callable[[], set[int]]
#: pid → [(gpu entity, MiB used)] as the agent's graph knows it (passed in by the daemon).
GpuHeld = Mapping[int, list[tuple[str, float | None]]]
#: Told (pid, create_time) of the processes about to be signalled, before the signal is sent
#: (the agent marks them, so a probe's later "exit" for them is recorded as "killed").
OnSignal = Callable[[list[tuple[int, float]]], None]


class GpuCheckUnavailable(Exception):  # noqa: N818 - the name says what happened
    """NVML cannot be asked (no library, no driver, no GPU)."""


def parse_signal(value: object) -> signal.Signals:
    """``TERM``, ``SIGTERM``, ``term`` or ``15`` → the signal; UsageError for anything else."""
    text = str(value).strip().upper()
    if text.isdigit():
        for sig in SIGNALS.values():
            if int(sig) == int(text):
                return sig
    found = SIGNALS.get(text.removeprefix("SIG"))
    if found is None:
        raise UsageError(f"signal {value!r} is not one zap sends (use one of {', '.join(SIGNALS)})")
    return found


# ------------------------------------------------------------------------------ /proc reading


class ProcView:
    """The few /proc facts the actuator polls: cheaper than psutil, and replaceable in tests."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    def stat(self, pid: int) -> tuple[str, int, int, int] | None:
        """(state letter, ppid, flags, starttime in ticks) of ``pid``, or None when it is gone."""
        try:
            with open(f"{self.root}/{pid}/stat", "rb") as fh:
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return None
        _, _, rest = text.rpartition(")")
        fields = rest.split()
        try:
            return fields[0], int(fields[1]), int(fields[6]), int(fields[19])
        except (IndexError, ValueError):
            return None

    def ppids(self) -> dict[int, int]:
        """pid → ppid of every process (one read of each /proc/PID/stat)."""
        out: dict[int, int] = {}
        try:
            names = os.listdir(self.root)
        except OSError:
            return out
        for name in names:
            if name.isdigit():
                st = self.stat(int(name))
                if st is not None:
                    out[int(name)] = st[1]
        return out

    def wchan(self, pid: int) -> str | None:
        try:
            with open(f"{self.root}/{pid}/wchan", encoding="utf-8", errors="replace") as fh:
                text = fh.read().strip()
        except OSError:
            return None
        return text if text and text != "0" else None

    def is_kernel_thread(self, pid: int) -> bool:
        st = self.stat(pid)
        return st is not None and bool(st[2] & PF_KTHREAD)


# ------------------------------------------------------------------------------ NVML


class NvmlGpuPids:
    """The pids that hold GPU memory, per NVML (compute and graphics contexts of every GPU).

    NVML is initialised on first use (on the actuator's worker thread, never at start-up);
    :class:`GpuCheckUnavailable` when there is no NVML here. Process ids are as the driver
    reports them (host pids; recent drivers translate to the caller's pid namespace).
    """

    def __init__(self) -> None:
        self._lib: Any = None
        self._failed: str | None = None
        self._lock = threading.Lock()

    def _nvml(self) -> Any:
        if self._failed:
            raise GpuCheckUnavailable(self._failed)
        if self._lib is None:
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception as exc:  # no library, no driver, no GPU: all mean "cannot check"
                self._failed = f"NVML not available ({type(exc).__name__}: {exc})"
                raise GpuCheckUnavailable(self._failed) from exc
            self._lib = pynvml
        return self._lib

    def __call__(self) -> set[int]:
        with self._lock:
            nv = self._nvml()
            pids: set[int] = set()
            try:
                for index in range(nv.nvmlDeviceGetCount()):
                    handle = nv.nvmlDeviceGetHandleByIndex(index)
                    for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                        if hasattr(nv, fn):
                            pids.update(int(p.pid) for p in getattr(nv, fn)(handle))
            except Exception as exc:  # an NVML error means "cannot check", reported as such
                raise GpuCheckUnavailable(f"NVML query failed ({type(exc).__name__}: {exc})") from exc
            return pids


# ------------------------------------------------------------------------------ the actuator


@dataclass
class _Member:
    proc: psutil.Process
    pid: int
    ppid: int
    name: str
    create_time: float
    starttime: int | None
    zombie_at_start: bool = False
    refused: str | None = None
    signalled: bool = False
    killed: bool = False
    vanished: bool = False
    outcome: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "pid": self.pid,
            "ppid": self.ppid,
            "name": self.name,
            "create_time": round(self.create_time, 3),
            "outcome": self.outcome,
        }
        row.update(self.extra)
        return row


class _Refused(Exception):  # noqa: N818 - control flow inside execute
    def __init__(self, outcome: str, reason: str, row: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason
        self.row = row


class Actuator:
    """Executes ``zap`` commands on this node. Thread-safe: the agent calls it from workers."""

    def __init__(
        self,
        node: str,
        *,
        clock: Clock = wall_ms,
        audit_log: str | os.PathLike[str] | None = None,
        gpu_pids: GpuPids | None = None,
        proc: ProcView | None = None,
        protected: Callable[[], set[int]] | None = None,
        cache_size: int = RESULT_CACHE,
        kill_verify_s: float = KILL_VERIFY_S,
        zombie_settle_s: float = ZOMBIE_SETTLE_S,
        gpu_release_wait_s: float = GPU_RELEASE_WAIT_S,
    ) -> None:
        self.node = node
        self.clock = clock
        self.audit = AuditLog(audit_log) if audit_log else None
        self.gpu_pids = gpu_pids
        self.proc = proc or ProcView()
        self.protected = protected or self_and_ancestors
        self.cache_size = cache_size
        self.kill_verify_s = kill_verify_s
        self.zombie_settle_s = zombie_settle_s
        self.gpu_release_wait_s = gpu_release_wait_s
        self.executed = 0
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Result] = OrderedDict()
        self._running: dict[str, threading.Event] = {}

    # ---------------------------------------------------------------- entry points
    def __call__(self, command: Command) -> Result:
        return self.execute(command)

    def precheck(self, command: Command) -> Result | None:
        """The answer that needs no execution: a cached result (repeat) or an expiry refusal.

        Cheap and non-blocking, so the agent's socket thread calls it before acking.
        """
        with self._lock:
            cached = self._cache.get(command.id)
        if cached is not None:
            self._audit(command, cached, repeat=True)
            return cached
        if command.deadline and command.deadline <= self.clock():
            late_ms = self.clock() - command.deadline
            result = self._refusal(
                command, "EXPIRED", f"command expired {late_ms / 1000:.1f}s before it could run: nothing was done"
            )
            return self._finish(command, result)
        return None

    def execute(
        self, command: Command, *, gpu_held: GpuHeld | None = None, on_signal: OnSignal | None = None
    ) -> Result:
        """Run ``command`` (blocking up to its grace period) and return its result."""
        early = self.precheck(command)
        if early is not None:
            return early
        with self._lock:
            running = self._running.get(command.id)
            if running is None:
                self._running[command.id] = threading.Event()
        if running is not None:  # the same id is executing on another thread: wait for its result
            running.wait()
            with self._lock:
                cached = self._cache.get(command.id)
            if cached is not None:
                self._audit(command, cached, repeat=True)
                return cached
            return self._refusal(command, "FAILED", "the first execution of this command id left no result")
        try:
            try:
                result = self._execute(command, gpu_held or {}, on_signal)
            except Exception as exc:  # a bug must become a result, not a silent worker death
                log.exception("zap %s failed", command.id)
                result = self._refusal(command, "FAILED", f"internal error: {type(exc).__name__}: {exc}")
            return self._finish(command, result)
        finally:
            with self._lock:
                done = self._running.pop(command.id, None)
            if done is not None:
                done.set()

    def _finish(self, command: Command, result: Result) -> Result:
        with self._lock:
            self._cache[command.id] = result
            self._cache.move_to_end(command.id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._audit(command, result, repeat=False)
        return result

    # ---------------------------------------------------------------- execution
    def _execute(self, command: Command, gpu_held: GpuHeld, on_signal: OnSignal | None) -> Result:
        started_mono = time.monotonic()
        started_ms = self.clock()
        if command.op != "zap":
            return self._refusal(command, "REFUSED", f"unsupported command {command.op!r} (this agent knows zap)")
        try:
            pid, ctime, sig, grace = _zap_args(command)
        except UsageError as exc:
            return self._refusal(command, "REFUSED", str(exc))
        # Keep part of the deadline for SIGKILL, verification and the reply.
        end_mono = started_mono + max(0.0, (command.deadline - started_ms) / 1000) if command.deadline else None
        if end_mono is not None:
            grace = max(0.0, min(grace, end_mono - started_mono - RESERVE_S))
        base: dict[str, Any] = {"signal": sig.name, "grace_s": round(grace, 3)}
        protected = self.protected()
        try:
            members = self._resolve(pid, ctime, protected)
        except _Refused as refused:
            tree = [refused.row] if refused.row else []
            ok = refused.outcome == "ALREADY_GONE"
            data = {
                **base,
                "outcome": refused.outcome,
                "reason": refused.reason,
                "target": {"node": self.node, "pid": pid, "create_time": ctime},
                "tree": tree,
                "signals": [],
                "gpu": {"checked": False, "released": None, "held_by": [], "gpus": [], "detail": ""},
                "duration_ms": int((time.monotonic() - started_mono) * 1000),
            }
            return Result(command.id, self.node, ok, data, None if ok else refused.reason)

        self.executed += 1
        target = members[0]
        signals: list[dict[str, Any]] = []
        gpu_before, gpu_detail = self._gpu_snapshot({m.pid for m in members})
        held_rows = [
            {"pid": m.pid, "gpu": gpu, "mem_used_mib": mib} for m in members for gpu, mib in gpu_held.get(m.pid, [])
        ]

        def elapsed_ms() -> int:
            return int((time.monotonic() - started_mono) * 1000)

        # Freeze, re-scan, signal, thaw.
        live = [m for m in members if not m.refused and not m.zombie_at_start]
        self._freeze(live, members, protected)
        live = [m for m in members if not m.refused and not m.zombie_at_start and not m.vanished]
        if on_signal is not None:
            on_signal([(m.pid, m.create_time) for m in live])
        sent = self._signal(live, sig)
        for m in sent:
            m.signalled = True
        signals.append({"signal": sig.name, "pids": [m.pid for m in sent], "at_ms": elapsed_ms()})
        if sig != signal.SIGKILL:
            for m in live:
                _quiet(m.proc.resume)
        else:
            for m in sent:
                m.killed = True

        # Grace period: wait for every member to end (a zombie has ended).
        deadline = time.monotonic() + grace
        while self._alive(members) and time.monotonic() < deadline:
            time.sleep(POLL_S)

        survivors = self._alive(members)
        if survivors:
            self._freeze(survivors, members, protected)
            survivors = self._alive(members)
            if on_signal is not None:
                on_signal([(m.pid, m.create_time) for m in survivors])
            sent = self._signal(survivors, signal.SIGKILL)
            for m in sent:
                m.killed = True
            signals.append({"signal": "SIGKILL", "pids": [m.pid for m in sent], "at_ms": elapsed_ms()})
            verify_end = time.monotonic() + self._budget(self.kill_verify_s, end_mono)
            while self._alive(members) and time.monotonic() < verify_end:
                time.sleep(POLL_S)

        # Zombies: give their parents a moment to reap them.
        settle_end = time.monotonic() + self._budget(self.zombie_settle_s, end_mono)
        while self._zombies(members) and time.monotonic() < settle_end:
            time.sleep(POLL_S)

        for m in members:
            self._outcome(m)

        gpu = self._gpu_verify(members, gpu_before, gpu_detail, held_rows, end_mono)
        left = [m for m in members if m.outcome not in GONE_OUTCOMES and m.outcome != REFUSED]
        refused_members = [m for m in members if m.outcome == REFUSED]
        ok = not left and gpu["released"] is not False
        reason = _summary(left, refused_members, gpu)
        data = {
            **base,
            "outcome": "DONE" if ok else "PARTIAL",
            "reason": reason,
            "target": {
                "node": self.node,
                "pid": target.pid,
                "create_time": round(target.create_time, 3),
                "name": target.name,
            },
            "tree": [m.row() for m in members],
            "signals": signals,
            "gpu": gpu,
            "duration_ms": elapsed_ms(),
        }
        return Result(command.id, self.node, ok, data, None if ok else reason)

    @staticmethod
    def _budget(cap: float, end_mono: float | None) -> float:
        if end_mono is None:
            return cap
        return max(0.05, min(cap, end_mono - time.monotonic() - 0.3))

    def _resolve(self, pid: int, ctime: float, protected: set[int]) -> list[_Member]:
        """The target first, then its descendants; raises _Refused for a target not to touch."""
        if pid <= 1:
            what = "pid 1 is init" if pid == 1 else "pid 0 is the kernel"
            raise _Refused("REFUSED", f"{what}: never zapped", {"pid": pid, "name": "", "outcome": REFUSED})
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            started = proc.create_time()
            ppid = proc.ppid()
        except psutil.NoSuchProcess:
            raise _Refused(
                "ALREADY_GONE",
                f"pid {pid} no longer exists: already gone, nothing to do",
                {"pid": pid, "name": "", "outcome": ALREADY_GONE},
            ) from None
        except psutil.AccessDenied as exc:
            raise _Refused("REFUSED", f"pid {pid}: permission denied ({exc})") from exc
        row = {"pid": pid, "ppid": ppid, "name": name, "create_time": round(started, 3), "outcome": REFUSED}
        if abs(started - ctime) > CTIME_TOLERANCE_S:
            raise _Refused(
                "REFUSED",
                f"pid {pid} is now another process ({name}, started {iso(int(started * 1000))}; the target "
                f"started {iso(int(ctime * 1000))}): the pid was reused, nothing was done",
                row,
            )
        why_not = self._protected_reason(proc, pid, name, protected)
        if why_not:
            raise _Refused("REFUSED", why_not, row)
        members = [self._member(proc, pid, ppid, name, started)]
        for child in self._descendants([pid], {pid}):
            member = self._new_member(child, protected)
            if member is not None:
                members.append(member)
        return members

    def _descendants(self, roots: Iterable[int], known: set[int]) -> list[int]:
        """Descendants of ``roots`` not in ``known``, parents first, from one scan of /proc."""
        children: dict[int, list[int]] = {}
        for pid, ppid in self.proc.ppids().items():
            children.setdefault(ppid, []).append(pid)
        out: list[int] = []
        queue = list(roots)
        seen = set(known)
        while queue and len(out) + len(known) < MAX_TREE:
            for child in sorted(children.get(queue.pop(0), ())):
                if child not in seen:
                    seen.add(child)
                    out.append(child)
                    queue.append(child)
        return out

    def _protected_reason(
        self, proc: psutil.Process | None, pid: int, name: str, protected: set[int]
    ) -> str | None:
        """Why ``pid`` must not be touched, or None. ``proc`` (the target only) adds the
        kernel-thread heuristic for a /proc without flags: parent kthreadd and no command line."""
        if pid == 2 or self.proc.is_kernel_thread(pid):
            return f"pid {pid} ({name}) is a kernel thread: never zapped"
        if proc is not None:
            try:
                if proc.ppid() == 2 and not proc.cmdline():
                    return f"pid {pid} ({name}) is a kernel thread: never zapped"
            except psutil.Error:
                pass
        if pid in protected:
            if pid == os.getpid():
                return f"pid {pid} ({name}) is this agent itself: never zapped"
            return f"pid {pid} ({name}) is an ancestor of this agent: zapping it would end the agent too"
        return None

    def _member(self, proc: psutil.Process, pid: int, ppid: int, name: str, started: float) -> _Member:
        st = self.proc.stat(pid)
        member = _Member(proc, pid, ppid, name, started, st[3] if st else None)
        member.zombie_at_start = st is not None and st[0] == "Z"
        return member

    def _new_member(self, pid: int, protected: set[int]) -> _Member | None:
        try:
            child = psutil.Process(pid)
            name, started, ppid = child.name(), child.create_time(), child.ppid()
        except psutil.NoSuchProcess:
            return None  # ended between the listing and now: it is not part of what we do
        except psutil.AccessDenied:
            return None
        member = self._member(child, pid, ppid, name, started)
        why_not = self._protected_reason(None, pid, name, protected)
        if why_not:
            member.refused = why_not
            member.extra["reason"] = why_not
        return member

    def _freeze(self, targets: list[_Member], members: list[_Member], protected: set[int]) -> None:
        """SIGSTOP ``targets``; add (and stop) children they forked before they stopped."""
        for m in targets:
            try:
                m.proc.suspend()
            except psutil.NoSuchProcess:
                if not m.signalled:
                    m.vanished = True
            except psutil.AccessDenied:
                pass
        roots = [m.pid for m in targets if not m.vanished]
        for _ in range(MAX_RESCANS):
            fresh: list[_Member] = []
            for pid in self._descendants(roots, {m.pid for m in members}):
                member = self._new_member(pid, protected)
                if member is None:
                    continue
                members.append(member)
                if member.refused or member.zombie_at_start:
                    continue
                _quiet(member.proc.suspend)
                fresh.append(member)
            if not fresh:
                return
            roots = [m.pid for m in fresh]

    def _signal(self, targets: Iterable[_Member], sig: signal.Signals) -> list[_Member]:
        sent = []
        for m in targets:
            if m.refused:
                continue
            try:
                m.proc.send_signal(sig)
            except psutil.NoSuchProcess:
                if not m.signalled:
                    m.vanished = True
                continue
            except psutil.AccessDenied as exc:
                m.extra["detail"] = f"{sig.name}: permission denied ({exc})"
                continue
            sent.append(m)
        return sent

    def _state(self, m: _Member) -> str | None:
        """The member's state letter, or None when it is gone (or its pid is another process)."""
        st = self.proc.stat(m.pid)
        if st is None or (m.starttime is not None and st[3] != m.starttime):
            return None
        return st[0]

    def _alive(self, members: Iterable[_Member]) -> list[_Member]:
        """Members still running (not gone, not a zombie), refused ones aside."""
        out = []
        for m in members:
            if m.refused:
                continue
            state = self._state(m)
            if state is not None and state not in "ZX":
                out.append(m)
        return out

    def _zombies(self, members: Iterable[_Member]) -> list[_Member]:
        return [m for m in members if not m.refused and self._state(m) == "Z"]

    def _outcome(self, m: _Member) -> None:
        if m.refused:
            m.outcome = REFUSED
            return
        state = self._state(m)
        if state is None or state == "X":
            if m.killed:
                m.outcome = KILLED
            elif m.signalled:
                m.outcome = TERMINATED
            else:
                m.outcome = ALREADY_GONE
            return
        if state == "Z":
            m.outcome = ZOMBIE
            st = self.proc.stat(m.pid)
            parent = st[1] if st else m.ppid
            m.extra["parent"] = {"pid": parent, "name": _name(parent)}
            m.extra["detail"] = f"exited, not yet reaped: its parent {parent} ({_name(parent)}) must reap it"
            return
        if state == "D":
            m.outcome = D_STATE
            wchan = self.proc.wchan(m.pid)
            m.extra["wchan"] = wchan
            m.extra["detail"] = (
                f"in uninterruptible sleep (D state{', wchan ' + wchan if wchan else ''}): "
                "SIGKILL is pending and takes effect when its I/O completes"
            )
            return
        m.outcome = SURVIVED
        m.extra.setdefault("detail", f"still alive after SIGKILL (state {state})")

    # ---------------------------------------------------------------- GPU
    def _gpu_snapshot(self, pids: set[int]) -> tuple[set[int] | None, str]:
        if self.gpu_pids is None:
            return None, "GPU memory release not verified: no NVML on this agent"
        try:
            return self.gpu_pids() & pids, ""
        except GpuCheckUnavailable as exc:
            return None, f"GPU memory release not verified: {exc}"
        except Exception as exc:  # noqa: BLE001 - a broken hook must not break the zap
            return None, f"GPU memory release not verified: {type(exc).__name__}: {exc}"

    def _gpu_verify(
        self,
        members: list[_Member],
        before: set[int] | None,
        detail: str,
        held_rows: list[dict[str, Any]],
        end_mono: float | None,
    ) -> dict[str, Any]:
        used = bool(before) or bool(held_rows)
        gpu: dict[str, Any] = {"checked": False, "released": None, "held_by": [], "gpus": held_rows, "detail": ""}
        if not used:
            gpu["detail"] = "the tree held no GPU memory"
            return gpu
        if before is None or self.gpu_pids is None:
            gpu["detail"] = detail
            return gpu
        pids = {m.pid for m in members if m.outcome != REFUSED}
        end = time.monotonic() + self._budget(self.gpu_release_wait_s, end_mono)
        still: set[int] = set()
        while True:
            try:
                still = self.gpu_pids() & pids
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                gpu["detail"] = f"GPU memory release not verified: {exc}"
                return gpu
            if not still or time.monotonic() >= end:
                break
            time.sleep(0.05)
        gpu["checked"] = True
        gpu["released"] = not still
        gpu["held_by"] = sorted(still)
        for m in members:
            if m.pid in still:
                m.extra["gpu_mem_held"] = True
        held = ", ".join(map(str, sorted(still)))
        gpu["detail"] = f"GPU memory still held by pid(s) {held}" if still else "GPU memory released"
        return gpu

    # ---------------------------------------------------------------- results, audit, events
    def _refusal(self, command: Command, outcome: str, reason: str) -> Result:
        target = dict(command.target)
        data = {
            "outcome": outcome,
            "reason": reason,
            "target": {"node": self.node, "pid": target.get("pid"), "create_time": target.get("create_time")},
            "tree": [],
            "signals": [],
            "gpu": {"checked": False, "released": None, "held_by": [], "gpus": [], "detail": ""},
            "duration_ms": 0,
        }
        return Result(command.id, self.node, False, data, reason)

    def _audit(self, command: Command, result: Result, *, repeat: bool) -> None:
        if self.audit is None:
            return
        now = self.clock()
        data = result.data
        self.audit.write(
            {
                "ts": now,
                "time": iso(now),
                "source": "agent",
                "node": self.node,
                "command_id": command.id,
                "op": command.op,
                # The aggregator's authenticated requester (CURVE), and the CLI's unverified claim.
                "user": command.args.get("user"),
                "user_role": command.args.get("user_role"),
                "requested_by": command.requested_by,
                "target": command.target,
                "args": command.args,
                "deadline": command.deadline,
                "repeat": repeat,
                "ok": result.ok,
                "outcome": data.get("outcome"),
                "reason": data.get("reason"),
                "tree": data.get("tree", []),
                "signals": data.get("signals", []),
                "gpu": data.get("gpu"),
                "duration_ms": data.get("duration_ms"),
            }
        )

    def events(self, command: Command, result: Result, *, now_ms: int | None = None) -> list[Event]:
        """The ``action.exec`` ZAP event, and ``process.state killed`` for every member that ended."""
        ts = self.clock() if now_ms is None else now_ms
        data = result.data
        target = data.get("target") or {}
        pid = target.get("pid")
        name = str(target.get("name") or "proc")
        out: list[Event] = []
        for row in data.get("tree", []):
            if row.get("outcome") not in (TERMINATED, KILLED):
                continue
            attrs: dict[str, AttrValue] = {"name": str(row.get("name") or "proc"), "by": requester(command)}
            for key in ("create_time", "ppid"):
                if isinstance(row.get(key), int | float):
                    attrs[key] = row[key]
            attrs["signal"] = "SIGKILL" if row["outcome"] == KILLED else str(data.get("signal", ""))
            entity = str(row.get("name") or "proc")
            out.append(Event(ts, EventType.PROCESS_STATE, entity, "killed", row["pid"], None, attrs))
        action: dict[str, AttrValue] = {
            "by": requester(command),
            "result": str(data.get("outcome", "OK" if result.ok else "FAILED")),
            "command_id": command.id,
            "ok": result.ok,
            "processes": len(data.get("tree", [])),
        }
        if isinstance(target.get("create_time"), int | float):
            action["create_time"] = target["create_time"]
        if data.get("signal"):
            action["signal"] = str(data["signal"])
        out.append(Event(ts, EventType.ACTION_EXEC, name, "ZAP", pid if isinstance(pid, int) else None, None, action))
        return out


def requester(command: Command) -> str:
    """Who asked: the authenticated user the aggregator vouches for (CURVE), else the CLI's claim."""
    user = command.args.get("user")
    return user if isinstance(user, str) and user else command.requested_by


def _zap_args(command: Command) -> tuple[int, float, signal.Signals, float]:
    target, args = command.target, command.args
    pid = target.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        raise UsageError("target.pid: expected a pid (integer >= 0)")
    ctime = target.get("create_time")
    if not isinstance(ctime, int | float) or isinstance(ctime, bool):
        raise UsageError(
            "target.create_time: missing: a zap names the process by pid and create time, so a reused pid "
            "is never killed"
        )
    sig = parse_signal(args.get("signal", "TERM"))
    grace = args.get("grace_s", DEFAULT_GRACE_S)
    if not isinstance(grace, int | float) or isinstance(grace, bool) or not 0 <= grace <= MAX_GRACE_S:
        raise UsageError(f"grace_s: expected seconds between 0 and {MAX_GRACE_S:g}")
    return pid, float(ctime), sig, float(grace)


def _summary(left: list[_Member], refused: list[_Member], gpu: Mapping[str, Any]) -> str | None:
    parts = []
    counts: dict[str, list[int]] = {}
    for m in left:
        counts.setdefault(m.outcome, []).append(m.pid)
    labels = {ZOMBIE: "zombie", D_STATE: "in D state", SURVIVED: "survived SIGKILL"}
    for outcome, pids in counts.items():
        parts.append(f"{len(pids)} {labels.get(outcome, outcome)} ({', '.join(map(str, pids[:10]))})")
    if refused:
        parts.append(f"{len(refused)} refused ({', '.join(str(m.pid) for m in refused[:10])})")
    if gpu.get("released") is False:
        parts.append(str(gpu.get("detail")))
    return "; ".join(parts) or None


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def _quiet(fn: Callable[[], object]) -> None:
    with contextlib.suppress(psutil.Error):
        fn()


def self_and_ancestors() -> set[int]:
    """This process and every ancestor of it (zapping one of them would end the agent)."""
    out = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        out.update(p.pid for p in psutil.Process().parents())
    return out
