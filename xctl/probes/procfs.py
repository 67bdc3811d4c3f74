"""The procfs probe: lifecycle, CPU and memory of the processes that matter on a GPU node.

Which processes: the GPU consumers (``gpu_pids()``, usually from NVML), their process trees
(ancestors up to but excluding pid 1, and all descendants), and every process whose name or
``argv[0]`` basename fully matches one of the watch patterns (default: python*, torchrun,
mpirun, srun, deepspeed). Not every process.

Events (entity = the process name, i.e. its ``comm``, the name the kernel log also uses):

- ``process.state`` ``start`` when first seen (attrs name, cmdline ≤ 256 chars, create_time,
  ppid, uid, rank/local_rank/world_size/step/scheduler/pod_uid/container_id/unit when known,
  ``initial`` when it was already running at the probe's first sample); ``zombie`` on state Z
  (with ``exit_code`` from /proc/PID/stat, Linux ≥ 3.5); ``d_state`` after
  :data:`D_STATE_SAMPLES` consecutive samples with any of its threads in D (attrs samples,
  wchan; when the thread in D is not the main one also tid and ``thread``, that thread's
  comm, with the wchan read from /proc/PID/task/TID); ``running`` when no thread is in D any
  more or it leaves zombie, or (with the full start attrs and ``exec``) when it exec'd a new
  program;
  ``exit`` when it is gone (``exit_code`` only if it was seen as a zombie).
- ``compute.util`` entity ``cpu`` with pid: percent of one core, 1 decimal.
- ``compute.mem`` entity ``sysmem`` with pid: percent of host memory, attrs used_mib, total_mib.

Worker threads (a dataloader thread stuck on NFS while the main thread waits on a futex) are
looked at only for a tracked process whose main thread is not in D and that has more than one
thread, and at most :data:`MAX_THREADS_PER_CYCLE` of its threads are read per sample: the
thread last seen in D first, then the next window of thread ids in turn (a quarter of them,
:data:`THREAD_SPREAD`), so a process with 10,000 threads is covered over several samples
rather than all at once. A worker in D is therefore seen up to ``THREAD_SPREAD - 1`` samples
later than a main thread would be; from then on it is read every sample, and the same
:data:`D_STATE_SAMPLES` apply to it.

Metrics are emitted only when they moved by ≥ 1 percentage point or every
:data:`METRIC_EVERY` samples. The first half of this module is pure parsers; the reader
(:class:`ProcfsProbe`) takes its ``/proc`` root as an argument so tests use fixture trees.

This module also holds the small spec-argument helpers the node probes share
(:func:`spec_args`, :func:`spec_interval`, :func:`spec_bool`).
"""

from __future__ import annotations

import bisect
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from xctl.core.errors import ProbeError
from xctl.core.events import AttrValue, Event, EventType
from xctl.probes._spec import parse_duration, split_pairs
from xctl.probes.base import ProbeContext, run_every
from xctl.probes.jobid import NO_IDENTITY, JobIdentity, identify

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S: Final = 2.0
#: Unselected processes are re-read every this many samples (exec, reparenting).
RECHECK_EVERY: Final = 20
DEFAULT_WATCH: Final = ("python[0-9.]*", "torchrun", "mpirun", "srun", "deepspeed")
#: Consecutive samples in D before ``d_state`` is reported (a short D is normal I/O).
D_STATE_SAMPLES: Final = 3
#: At most this many /proc/PID/task/TID/stat files are read per process per sample.
MAX_THREADS_PER_CYCLE: Final = 256
#: Each worker thread is read every this many samples (a window of 1/N of them per sample,
#: within the bound above); a thread found in D is then read every sample. A stat read costs
#: ~20 µs of kernel time, and training processes have dozens to hundreds of threads.
THREAD_SPREAD: Final = 4
#: A metric is re-sent at least every this many samples even if unchanged.
METRIC_EVERY: Final = 10
#: Minimum change (percentage points) that makes a metric worth sending.
METRIC_MIN_DELTA: Final = 1.0
CMDLINE_MAX: Final = 256
#: Bound on tracked processes (events for more are dropped and counted).
MAX_TRACKED: Final = 1024
_ENVIRON_MAX_BYTES: Final = 256 * 1024


def _noop_bad(reason: str) -> None:
    del reason


def _no_gpu_pids() -> set[int]:
    return set()


# --- spec arguments (shared by the node probes) -----------------------------------------------


def spec_args(arg: str | None, allowed: Iterable[str], probe: str) -> dict[str, str]:
    """``key=value,...`` → dict; an unknown key raises :class:`ProbeError` naming the allowed ones."""
    allowed_set = set(allowed)
    out: dict[str, str] = {}
    for key, value in split_pairs(arg or "", what=probe):
        if key not in allowed_set:
            raise ProbeError(f"{probe}: unknown setting {key!r}: use {', '.join(sorted(allowed_set))}")
        out[key] = value
    return out


def spec_interval(args: Mapping[str, str], default: float, probe: str) -> float:
    """The ``interval`` setting (e.g. ``500ms``, ``2s``) or ``default``; must be > 0."""
    if "interval" not in args:
        return default
    seconds = parse_duration(args["interval"], what=f"{probe}: interval")
    if seconds <= 0:
        raise ProbeError(f"{probe}: interval must be greater than zero: write e.g. 2s")
    return seconds


def spec_bool(args: Mapping[str, str], key: str, default: bool, probe: str) -> bool:
    if key not in args:
        return default
    low = args[key].lower()
    if low in ("1", "true", "yes", "on", ""):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ProbeError(f"{probe}: {key}={args[key]!r} is not a boolean: write {key}=true or {key}=false")


# --- pure parsers ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` this probe uses (clock ticks / pages as the kernel gives)."""

    pid: int
    comm: str
    state: str
    ppid: int
    utime: int
    stime: int
    num_threads: int
    starttime: int
    rss_pages: int
    #: waitpid-style status (field 52, Linux ≥ 3.5); meaningful for a zombie only.
    exit_status: int | None = None


def parse_stat(text: str) -> ProcStat | None:
    """Parse ``/proc/PID/stat``; None if malformed or truncated. Never raises.

    ``comm`` may hold spaces and parentheses, so the line is split at the first ``(`` and
    the *last* ``)``.
    """
    try:
        open_at = text.index("(")
        close_at = text.rindex(")")
    except ValueError:
        return None
    if close_at < open_at:
        return None
    pid_text = text[:open_at].strip()
    rest = text[close_at + 1 :].split()
    if not pid_text.isdigit() or len(rest) < 22:
        return None
    try:
        state = rest[0]
        nums = [int(x) for x in rest[1:22]]
    except ValueError:
        return None
    if len(state) != 1:
        return None
    exit_status: int | None = None
    if len(rest) >= 50:
        try:
            exit_status = int(rest[49])
        except ValueError:
            exit_status = None
    # rest[i] is field i+3 of proc(5): ppid=4, utime=14, stime=15, num_threads=20, starttime=22, rss=24.
    return ProcStat(
        pid=int(pid_text),
        comm=text[open_at + 1 : close_at],
        state=state,
        ppid=nums[0],
        utime=nums[10],
        stime=nums[11],
        num_threads=nums[16],
        starttime=nums[18],
        rss_pages=nums[20],
        exit_status=exit_status,
    )


def parse_task_state(text: str) -> tuple[str, str] | None:
    """(comm, state) from a ``/proc/PID/task/TID/stat`` line; None if malformed. Cheaper than
    :func:`parse_stat`: a thread scan needs only these two fields."""
    open_at = text.find("(")
    close_at = text.rfind(")")
    if open_at < 0 or close_at < open_at:
        return None
    state = text[close_at + 1 : close_at + 4]
    if len(state) != 3 or state[0] != " " or state[2] != " ":
        return None
    return text[open_at + 1 : close_at], state[1]


def task_window(tids: Sequence[int], after: int, budget: int) -> tuple[list[int], int]:
    """The next ``budget`` thread ids after ``after`` in the sorted ``tids``, wrapping round to
    the start (each at most once), and the cursor for the next call (the last one taken)."""
    if budget <= 0 or not tids:
        return [], after
    start = bisect.bisect_right(tids, after)
    window = [*tids[start : start + budget], *tids[: max(0, min(start, budget - (len(tids) - start)))]]
    return window, window[-1]


def decode_exit_status(status: int) -> int:
    """waitpid status → Python-style return code: exit status, or ``-signal`` if killed."""
    signal_no = status & 0x7F
    if signal_no == 0:
        return (status >> 8) & 0xFF
    return -signal_no


def parse_status(text: str) -> dict[str, str]:
    """``/proc/PID/status`` → {key: value} (values stripped; malformed lines skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key and " " not in key:
            out[key] = value.strip()
    return out


def parse_cmdline(data: bytes) -> list[str]:
    """``/proc/PID/cmdline`` (NUL-separated) → argv. Undecodable bytes become U+FFFD."""
    if not data:
        return []
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "replace") for p in parts]


_ENV_KEY_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def parse_environ(data: bytes) -> dict[str, str]:
    """``/proc/PID/environ`` → dict. Entries without ``=`` or with an odd key are skipped."""
    out: dict[str, str] = {}
    for entry in data.split(b"\0"):
        key_b, sep, value_b = entry.partition(b"=")
        if not sep or not key_b:
            continue
        key = key_b.decode("ascii", "replace")
        if not _ENV_KEY_RE.match(key):
            continue
        out[key] = value_b.decode("utf-8", "replace")
    return out


def parse_btime(text: str) -> int | None:
    """Boot time (seconds since the epoch) from ``/proc/stat``."""
    for line in text.splitlines():
        if line.startswith("btime "):
            value = line[6:].strip()
            return int(value) if value.isdigit() else None
    return None


def parse_meminfo_total(text: str) -> int | None:
    """``MemTotal`` from ``/proc/meminfo``, in bytes."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
            return None
    return None


def argv0_basename(argv: Sequence[str]) -> str:
    """Basename of argv[0] (a process may rewrite argv[0] with spaces: take the first word)."""
    if not argv or not argv[0]:
        return ""
    first = argv[0].split(" ", 1)[0] if len(argv) == 1 else argv[0]
    return posixpath.basename(first)


def compile_watch(patterns: Iterable[str]) -> list[re.Pattern[str]]:
    out: list[re.Pattern[str]] = []
    for pattern in patterns:
        try:
            out.append(re.compile(pattern))
        except re.error as exc:
            raise ProbeError(f"procfs: watch pattern {pattern!r} is not a regular expression: {exc}") from exc
    return out


def matches_watch(name: str, argv0: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    return any(p.fullmatch(name) or (argv0 and p.fullmatch(argv0)) for p in patterns)


def process_tree(roots: Iterable[int], ppids: Mapping[int, int]) -> set[int]:
    """``roots`` plus their ancestors (excluding pids 0 and 1) and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    for root in roots:
        if root not in ppids:
            continue
        out.add(root)
        parent = ppids.get(root, 0)
        hops = 0
        while parent > 1 and parent not in out and hops < 4096:
            out.add(parent)
            parent = ppids.get(parent, 0)
            hops += 1
        stack = [root]
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in out:
                    out.add(child)
                    stack.append(child)
    return out


def identity_attrs(ident: JobIdentity) -> dict[str, AttrValue]:
    """The JobIdentity fields that are known, as event attrs."""
    out: dict[str, AttrValue] = {}
    for key in ("rank", "local_rank", "world_size"):
        value = getattr(ident, key)
        if value is not None:
            out[key] = value
    for key in ("step", "scheduler", "pod_uid", "container_id", "unit"):
        value = getattr(ident, key)
        if value is not None:
            out[key] = value
    return out


# --- the reader --------------------------------------------------------------------------------


@dataclass
class _Tracked:
    pid: int
    starttime: int
    name: str
    create_time: float
    ppid: int
    ident: JobIdentity
    base_attrs: Mapping[str, AttrValue]
    status: str = "running"  # last reported: running, zombie, d_state
    d_count: int = 0
    #: The thread d_count counts (the main thread's tid is the pid) and the thread-scan cursor.
    d_tid: int | None = None
    task_cursor: int = 0
    exit_code: int | None = None
    samples: int = 0
    cpu_ticks: int | None = None
    cpu_mono: float = 0.0
    cpu_sent: float | None = None
    mem_sent: float | None = None


class ProcfsProbe:
    """Reads ``<root>/PID/...`` every ``interval_s`` seconds; see the module doc for events."""

    name = "procfs"

    def __init__(
        self,
        root: str = "/proc",
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        gpu_pids: Callable[[], set[int]] | None = None,
        watch: Iterable[str] = DEFAULT_WATCH,
        clk_tck: int | None = None,
        page_size: int | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        exclude_pids: Iterable[int] | None = None,
        max_threads: int = MAX_THREADS_PER_CYCLE,
        thread_spread: int = THREAD_SPREAD,
    ) -> None:
        self.root = root
        self.max_threads = max_threads
        self.thread_spread = max(1, thread_spread)
        #: /proc/PID/task/TID/stat files read so far (the cost of the worker-thread D check).
        self.thread_reads = 0
        self.interval_s = interval_s
        self.heartbeat_s: float | None = 3 * interval_s + 5.0
        #: Settable after construction (the agent wires it to the NVML probe's process list).
        self.gpu_pids: Callable[[], set[int]] = gpu_pids or _no_gpu_pids
        self.watch = compile_watch(watch)
        self.clk_tck = clk_tck or os.sysconf("SC_CLK_TCK")
        self.page_size = page_size or os.sysconf("SC_PAGE_SIZE")
        self.monotonic = monotonic
        if exclude_pids is None:
            exclude_pids = {os.getpid()} if os.path.realpath(root) == "/proc" else set()
        self.exclude = frozenset(exclude_pids)
        self._tracked: dict[tuple[int, int], _Tracked] = {}
        self._argv: dict[tuple[int, int], tuple[str, list[str]]] = {}
        self._boot_time: float | None = None
        self._mem_total: int | None = None
        self._samples = 0
        self._skipped: dict[int, ProcStat] = {}
        self._problem: str | None = None

    @classmethod
    def from_spec(cls, arg: str | None) -> ProcfsProbe:
        args = spec_args(arg, ("interval", "root", "watch"), "procfs")
        watch: Iterable[str] = (args["watch"],) if args.get("watch") else DEFAULT_WATCH
        return cls(
            root=args.get("root", "/proc"),
            interval_s=spec_interval(args, DEFAULT_INTERVAL_S, "procfs"),
            watch=watch,
        )

    def describe(self) -> str:
        if self._problem:
            return f"procfs: {self._problem}"
        pats = "|".join(p.pattern for p in self.watch)
        return (
            f"procfs: {self.root} every {self.interval_s:g}s, GPU process trees + names {pats}"
            f" ({len(self._tracked)} tracked)"
        )

    def run(self, ctx: ProbeContext) -> None:
        run_every(ctx, self.interval_s, self.sample)

    # -- file access --

    def _read_text(self, *parts: str) -> str | None:
        try:
            with open(os.path.join(self.root, *parts), encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return None

    def _read_stat(self, pid: int, tid: int | None = None) -> str | None:
        """/proc/PID/stat (or /proc/PID/task/TID/stat) with one raw read (no text wrapper: this
        runs for every process)."""
        path = f"{self.root}/{pid}/stat" if tid is None else f"{self.root}/{pid}/task/{tid}/stat"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            return os.read(fd, 4096).decode("utf-8", "replace")
        except OSError:
            return None
        finally:
            os.close(fd)

    def _read_bytes(self, *parts: str, limit: int = -1) -> bytes | None:
        try:
            with open(os.path.join(self.root, *parts), "rb") as fh:
                return fh.read(limit)
        except OSError:
            return None

    def _boot(self) -> float:
        if self._boot_time is None:
            text = self._read_text("stat")
            btime = parse_btime(text) if text else None
            if btime is not None:
                self._boot_time = float(btime)
        return self._boot_time or 0.0

    def _memtotal(self) -> int | None:
        if self._mem_total is None:
            text = self._read_text("meminfo")
            self._mem_total = parse_meminfo_total(text) if text else None
        return self._mem_total

    def _list_pids(self) -> list[int] | None:
        try:
            names = os.listdir(self.root)
        except OSError as exc:
            self._problem = f"{self.root} not readable ({exc.strerror or exc})"
            return None
        self._problem = None
        return [int(n) for n in names if n.isdigit()]

    # -- one sample --

    def sample(self, now_ms: int, bad: Callable[[str], None] = _noop_bad) -> list[Event]:
        """Read every process once and return the events this sample produces."""
        pids = self._list_pids()
        if pids is None:
            return []
        mono = self.monotonic()
        first_sample = self._samples == 0
        self._samples += 1
        stats: dict[int, ProcStat] = {}
        # Processes not selected last time are re-read only every RECHECK_EVERY samples (an
        # exec or a reparenting shows up then): reading every stat of a busy host each second
        # was most of the agent's CPU. Tracked processes are read every time.
        recheck = self._samples % RECHECK_EVERY == 1
        skipped = self._skipped
        for pid in pids:
            known = None if recheck else skipped.get(pid)
            if known is not None:
                stats[pid] = known
                continue
            text = self._read_stat(pid)
            if text is None:
                continue  # gone between listdir and open: normal
            st = parse_stat(text)
            if st is None:
                bad("procfs_stat_malformed")
                continue
            stats[pid] = st

        # argv of every (pid, starttime) once: needed to match argv[0] against the watch list.
        # Re-read when comm changed: the process exec'd (same pid and start time, new program).
        argv_cache: dict[tuple[int, int], tuple[str, list[str]]] = {}
        for pid, st in stats.items():
            key = (pid, st.starttime)
            cached = self._argv.get(key)
            if cached is None or cached[0] != st.comm:
                data = self._read_bytes(str(pid), "cmdline", limit=64 * 1024)
                cached = (st.comm, parse_cmdline(data) if data else [])
            argv_cache[key] = cached
        self._argv = argv_cache
        argvs = {key: argv for key, (_, argv) in argv_cache.items()}

        selected = self._select(stats, argvs, unchanged=skipped.keys() if not recheck else ())
        self._skipped = {pid: st for pid, st in stats.items() if pid not in selected}
        events: list[Event] = []
        current: set[tuple[int, int]] = set()
        for pid in sorted(selected):
            st = stats[pid]
            key = (pid, st.starttime)
            tracked = self._tracked.get(key)
            if tracked is None:
                if len(self._tracked) >= MAX_TRACKED:
                    bad("procfs_too_many_processes")
                    continue
                tracked = self._start(st, argvs.get(key, []))
                self._tracked[key] = tracked
                attrs = dict(tracked.base_attrs)
                if first_sample:
                    attrs["initial"] = True
                events.append(self._state_event(now_ms, tracked, "start", attrs))
            elif st.comm != tracked.name and st.state not in "ZX":
                # exec(): same pid and start time, new program. Not a new process (the graph keys
                # processes by pid + create_time), so say "running" with the new name and cmdline.
                fresh = self._start(st, argvs.get(key, []))
                fresh.status, fresh.d_count, fresh.samples = tracked.status, tracked.d_count, tracked.samples
                fresh.d_tid, fresh.task_cursor = tracked.d_tid, tracked.task_cursor
                self._tracked[key] = tracked = fresh
                events.append(self._state_event(now_ms, tracked, "running", {**tracked.base_attrs, "exec": True}))
            current.add(key)
            events.extend(self._transitions(now_ms, tracked, st))
            if st.state not in "ZX":
                events.extend(self._metrics(now_ms, tracked, st, mono))
            tracked.samples += 1

        for key in [k for k in self._tracked if k not in current]:
            tracked = self._tracked.pop(key)
            if key[0] in stats and stats[key[0]].starttime == key[1]:
                continue  # still alive but no longer selected (left a GPU tree): forget quietly
            extra: dict[str, AttrValue] = {}
            if tracked.exit_code is not None:
                extra["exit_code"] = tracked.exit_code
            events.append(self._state_event(now_ms, tracked, "exit", extra))
        return events

    def _select(
        self,
        stats: Mapping[int, ProcStat],
        argv: Mapping[tuple[int, int], list[str]],
        *,
        unchanged: Collection[int] = (),
    ) -> set[int]:
        """GPU process trees + watched names + what is already tracked. ``unchanged`` pids
        did not match last time and were not re-read: they are not matched again."""
        ppids = {pid: st.ppid for pid, st in stats.items()}
        selected = process_tree(self.gpu_pids() & stats.keys(), ppids)
        for pid, st in stats.items():
            if pid in unchanged:
                continue
            args = argv.get((pid, st.starttime), [])
            # Kernel threads (kthreadd is pid 2 and their parent) have no argv; in a PID
            # namespace pid 2 is an ordinary process, so the pid alone does not tell.
            if pid in selected or (not args and (st.ppid == 2 or pid == 2)):
                continue
            if matches_watch(st.comm, argv0_basename(args), self.watch):
                selected.add(pid)
        # Processes we already track stay tracked while they live (e.g. a zombie).
        for pid, starttime in self._tracked:
            known = stats.get(pid)
            if known is not None and known.starttime == starttime:
                selected.add(pid)
        return selected - self.exclude

    def _start(self, st: ProcStat, argv: list[str]) -> _Tracked:
        pid = str(st.pid)
        env: dict[str, str] | None = None
        environ = self._read_bytes(pid, "environ", limit=_ENVIRON_MAX_BYTES)  # None if not permitted
        if environ:
            env = parse_environ(environ)
        cgroup = self._read_text(pid, "cgroup")
        ident = identify(env, cgroup) if (env or cgroup) else NO_IDENTITY
        status_text = self._read_text(pid, "status")
        status = parse_status(status_text) if status_text else {}
        create_time = round(self._boot() + st.starttime / self.clk_tck, 3)
        attrs: dict[str, AttrValue] = {
            "name": st.comm,
            "cmdline": " ".join(argv)[:CMDLINE_MAX],
            "create_time": create_time,
            "ppid": st.ppid,
        }
        uid = status.get("Uid", "").split()
        if uid and uid[0].isdigit():
            attrs["uid"] = int(uid[0])
        nspid = status.get("NSpid", "").split()
        if len(nspid) > 1 and nspid[-1].isdigit():
            attrs["ns_pid"] = int(nspid[-1])
        attrs.update(identity_attrs(ident))
        return _Tracked(
            pid=st.pid,
            starttime=st.starttime,
            name=st.comm,
            create_time=create_time,
            ppid=st.ppid,
            ident=ident,
            base_attrs=MappingProxyType(attrs),
        )

    def _state_event(
        self, now_ms: int, tracked: _Tracked, value: str, attrs: Mapping[str, AttrValue] | None = None
    ) -> Event:
        out: dict[str, AttrValue] = {
            "name": tracked.name,
            "create_time": tracked.create_time,
            "ppid": tracked.ppid,
        }
        if tracked.ident.rank is not None:
            out["rank"] = tracked.ident.rank
        if attrs:
            out.update(attrs)
        return Event(
            ts=now_ms,
            type=EventType.PROCESS_STATE,
            entity=tracked.name or "proc",
            value=value,
            pid=tracked.pid,
            job=tracked.ident.job,
            attrs=MappingProxyType(out),
        )

    def _transitions(self, now_ms: int, tracked: _Tracked, st: ProcStat) -> list[Event]:
        if st.state == "Z":
            tracked.d_count = 0
            if tracked.status == "zombie":
                return []
            tracked.status = "zombie"
            attrs: dict[str, AttrValue] = {}
            if st.exit_status is not None:
                tracked.exit_code = decode_exit_status(st.exit_status)
                attrs["exit_code"] = tracked.exit_code
            return [self._state_event(now_ms, tracked, "zombie", attrs)]
        # The thread in D: the main one, else a worker (looked for only when there are others).
        # The count is per thread: one thread in D for D_STATE_SAMPLES samples in a row, not
        # a different short I/O wait of some thread at each sample.
        worker: tuple[int, str] | None = None
        d_tid: int | None = st.pid if st.state == "D" else None
        if d_tid is None and st.num_threads > 1 and st.state != "X":
            worker = self._worker_in_d(tracked, thorough=tracked.status == "d_state")
            d_tid = worker[0] if worker is not None else None
        if d_tid is not None:
            tracked.d_count = tracked.d_count + 1 if tracked.d_tid == d_tid else 1
            tracked.d_tid = d_tid
            if tracked.d_count >= D_STATE_SAMPLES and tracked.status != "d_state":
                tracked.status = "d_state"
                attrs = {"samples": tracked.d_count}
                where = [str(st.pid)]
                if worker is not None:
                    attrs["tid"], attrs["thread"] = worker
                    where += ["task", str(worker[0])]
                wchan = (self._read_text(*where, "wchan") or "").strip()
                if wchan and wchan != "0":
                    attrs["wchan"] = wchan[:128]
                return [self._state_event(now_ms, tracked, "d_state", attrs)]
            return []
        tracked.d_count, tracked.d_tid = 0, None
        if tracked.status in ("d_state", "zombie"):
            tracked.status = "running"
            return [self._state_event(now_ms, tracked, "running")]
        return []

    def _worker_in_d(self, tracked: _Tracked, *, thorough: bool) -> tuple[int, str] | None:
        """(tid, comm) of a thread other than the main one that is in D now, or None.

        The worker last seen in D is read first; then the next window of the other threads:
        1/``thread_spread`` of them (so each is looked at every ``thread_spread`` samples), or
        as many as the bound allows when ``thorough`` (before saying the process left D). At
        most ``max_threads`` thread stat files are read in all.
        """
        pid = tracked.pid
        budget = self.max_threads
        last = tracked.d_tid if tracked.d_tid != pid else None
        if last is not None:
            budget -= 1
            found = self._thread_state(pid, last)
            if found is not None and found[1] == "D":
                return last, found[0]
        try:
            names = os.listdir(f"{self.root}/{pid}/task")
        except OSError:
            return None  # gone, or not permitted: the main thread's state is all we know
        tids = sorted(int(n) for n in names if n.isdigit() and n != str(pid) and int(n) != last)
        if not thorough:
            budget = min(budget, -(-len(tids) // self.thread_spread))
        window, tracked.task_cursor = task_window(tids, tracked.task_cursor, budget)
        for tid in window:
            found = self._thread_state(pid, tid)
            if found is not None and found[1] == "D":
                return tid, found[0]
        return None

    def _thread_state(self, pid: int, tid: int) -> tuple[str, str] | None:
        self.thread_reads += 1
        text = self._read_stat(pid, tid)
        return parse_task_state(text) if text is not None else None

    def _metrics(self, now_ms: int, tracked: _Tracked, st: ProcStat, mono: float) -> list[Event]:
        events: list[Event] = []
        periodic = tracked.samples % METRIC_EVERY == 0
        ticks = st.utime + st.stime
        if tracked.cpu_ticks is not None and mono > tracked.cpu_mono and ticks >= tracked.cpu_ticks:
            pct = round((ticks - tracked.cpu_ticks) / self.clk_tck / (mono - tracked.cpu_mono) * 100.0, 1)
            if periodic or tracked.cpu_sent is None or abs(pct - tracked.cpu_sent) >= METRIC_MIN_DELTA:
                tracked.cpu_sent = pct
                events.append(Event(now_ms, EventType.COMPUTE_UTIL, "cpu", f"{pct:.1f}", st.pid, tracked.ident.job))
        tracked.cpu_ticks, tracked.cpu_mono = ticks, mono
        total = self._memtotal()
        if total:
            rss = st.rss_pages * self.page_size
            pct = round(rss / total * 100.0, 1)
            if periodic or tracked.mem_sent is None or abs(pct - tracked.mem_sent) >= METRIC_MIN_DELTA:
                tracked.mem_sent = pct
                attrs: dict[str, AttrValue] = {
                    "used_mib": round(rss / 1048576, 1),
                    "total_mib": total // 1048576,
                }
                events.append(
                    Event(
                        now_ms,
                        EventType.COMPUTE_MEM,
                        "sysmem",
                        f"{pct:.1f}",
                        st.pid,
                        tracked.ident.job,
                        MappingProxyType(attrs),
                    )
                )
        return events
