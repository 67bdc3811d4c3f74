"""The causal graph of one node (DESIGN §4).

Vertices are processes, resources and errors; edges are Consumes (process → resource),
WaitsOn (process → resource or job) and BlockedBy (resource/process → error). Every edge
is stored on its source with a reverse index where `why` needs one, so ``apply`` is O(1)
amortised: no scan over all edges, ever. Everything is bounded and evicts oldest first,
counting what it evicted.

Time: ``Event.ts`` is the sender's clock and is what users see; windows (error expiry,
tombstones, staleness) run on the receiver's injected clock, so a node with a skewed clock
cannot expire everybody's errors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from xctl.core.catalog import HEALTHY_VALUES, code_info
from xctl.core.clock import Clock
from xctl.core.events import ERROR_TYPES, AttrValue, Event, EventType

#: process.state values that end a process (it becomes a tombstone).
ENDED_STATES: Final = frozenset({"exit", "killed", "oom_killed"})
#: Attributes with a leading underscore carry snapshot bookkeeping, never probe data.
_COUNT, _FIRST, _AGE, _HIST, _JOBS = "_count", "_first", "_age", "_hist", "_jobs"
#: Snapshot bookkeeping of a WaitsOn edge: reason, target, owner's create_time, owner is a
#: tombstone, "forget the waits the replay derived so far", and the type of the event behind
#: the edge (the restore itself travels as a process.state event, off the metrics hot path).
_WAIT, _TARGET, _CTIME, _DEAD, _RESET, _TYPE = "_wait", "_target", "_ctime", "_dead", "_reset", "_type"
_PROCESS_ATTRS: Final = ("name", "cmdline", "create_time", "ppid", "rank", "local_rank", "world_size", "exit_code")
_MAX_JOBS_PER_CODE: Final = 8
#: NVML's XID event and the kernel log line of the same fault arrive this close together.
_SAME_XID_MS: Final = 5_000
#: Clocks of the kernel log and of /proc create times disagree by this much at most.
_CREATE_SLACK_MS: Final = 1_000
_METRIC_TYPES: Final = frozenset(
    {
        EventType.COMPUTE_UTIL,
        EventType.COMPUTE_MEM,
        EventType.TRANSPORT_BW,
        EventType.TRANSPORT_DROP,
        EventType.STORAGE_IOPS,
        EventType.STORAGE_QDEPTH,
    }
)


@dataclass(frozen=True, slots=True)
class GraphLimits:
    """Windows and caps of one node's graph (all times in milliseconds)."""

    error_ttl_ms: int = 5 * 60_000
    tombstone_ttl_ms: int = 10 * 60_000
    stale_intervals: int = 3
    default_interval_ms: int = 1_000
    max_processes: int = 4_096
    max_tombstones: int = 1_024
    max_resources: int = 2_048
    max_errors: int = 2_048
    max_history_entities: int = 256
    max_history_codes: int = 64
    max_intents: int = 256
    #: storage await (ms) above which a device a process waits on counts as slow.
    slow_await_ms: float = 100.0
    #: transport bandwidth (Gbit/s) at or below which a process using it counts as stalled.
    stall_gbps: float = 0.0
    #: GPU utilisation (percent) at or above which a process counts as making progress.
    busy_util_pct: float = 50.0


def base_entity(entity: str) -> str:
    """``gpu-1/nvlink-2`` → ``gpu-1``: sub-resources block their parent's consumers."""
    cut = entity.find("/")
    return entity if cut < 0 else entity[:cut]


def as_float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


@dataclass(slots=True)
class Usage:
    """A Consumes edge: the latest per-process samples of one resource."""

    entity: str
    util: Event | None = None
    mem: Event | None = None

    @property
    def util_pct(self) -> float | None:
        return None if self.util is None else as_float(self.util.value)

    @property
    def mem_used_mib(self) -> float | None:
        if self.mem is None:
            return None
        used = self.mem.attrs.get("used_mib")
        return float(used) if isinstance(used, int | float) and not isinstance(used, bool) else None


@dataclass(slots=True)
class Wait:
    """A WaitsOn edge: to a resource entity or to ``job:ID`` (the job's peers)."""

    target: str
    reason: str
    first: Event
    last: Event


@dataclass(slots=True)
class Process:
    pid: int
    create_time: float | None
    name: str
    state: str
    state_event: Event
    first_ts: int
    job: str | None = None
    attrs: dict[str, AttrValue] = field(default_factory=dict)
    consumes: dict[str, Usage] = field(default_factory=dict)
    waits: dict[str, Wait] = field(default_factory=dict)
    ended_recv: int | None = None
    d_state_since: Event | None = None

    @property
    def rank(self) -> int | None:
        rank = self.attrs.get("rank")
        if isinstance(rank, int) and not isinstance(rank, bool):
            return rank
        if isinstance(rank, str) and rank.isdigit():
            return int(rank)
        return None

    @property
    def alive(self) -> bool:
        return self.ended_recv is None

    def gpus(self) -> Iterator[Usage]:
        return (u for e, u in self.consumes.items() if e.startswith("gpu-"))


@dataclass(slots=True)
class Resource:
    entity: str
    last_recv: int
    interval_ms: int
    metrics: dict[EventType, Event] = field(default_factory=dict)
    consumers: set[int] = field(default_factory=set)

    def metric(self, etype: EventType) -> float | None:
        ev = self.metrics.get(etype)
        return None if ev is None else as_float(ev.value)


@dataclass(slots=True)
class ErrorVertex:
    entity: str
    code: str
    type: EventType
    first: Event
    last: Event
    first_recv: int
    touch: int
    count: int = 1
    condition: bool = False
    pids: set[int] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, str]:
        return (self.entity, self.code)


@dataclass(slots=True)
class CodeHistory:
    """Counts of one code on one GPU over hours, and the jobs it hit (repeat patterns)."""

    count: int
    first_ts: int
    last_ts: int
    jobs: list[str] = field(default_factory=list)

    def add_job(self, job: str | None) -> None:
        if job and job not in self.jobs:
            self.jobs.append(job)
            del self.jobs[:-_MAX_JOBS_PER_CODE]


class NodeGraph:
    """The local causal graph of one node. Not thread-safe: one owner thread applies."""

    def __init__(self, node: str, clock: Clock, limits: GraphLimits | None = None) -> None:
        self.node = node
        self.clock = clock
        self.limits = limits or GraphLimits()
        self.processes: OrderedDict[int, Process] = OrderedDict()
        self.tombstones: OrderedDict[tuple[int, float | None], Process] = OrderedDict()
        self.resources: OrderedDict[str, Resource] = OrderedDict()
        self.errors: OrderedDict[tuple[str, str], ErrorVertex] = OrderedDict()
        self.conditions: dict[tuple[str, str], ErrorVertex] = {}
        self.errors_by_base: dict[str, set[tuple[str, str]]] = {}
        self.errors_by_pid: dict[int, set[tuple[str, str]]] = {}
        self.history: OrderedDict[str, dict[str, CodeHistory]] = OrderedDict()
        self.jobs: dict[str, set[int]] = {}
        self.intents: OrderedDict[tuple[str, str], Event] = OrderedDict()
        self.evicted: dict[str, int] = {"processes": 0, "tombstones": 0, "resources": 0, "errors": 0}
        self.ignored: dict[str, int] = {}
        self.applied = 0
        self._next_expiry = 0
        self._tomb_by_pid: dict[int, tuple[int, float | None]] = {}

    # ------------------------------------------------------------------ apply
    def apply(self, event: Event) -> None:
        """Fold one event into the graph. Never raises on a well-typed event."""
        now = self.clock()
        self._apply(event, now)
        self.applied += 1
        if now >= self._next_expiry:
            self.expire(now)

    def apply_all(self, events: Sequence[Event]) -> None:
        """Fold a batch in, reading the clock once (the ingest hot path: samples go straight
        to :meth:`_apply_metric`, everything else through :meth:`_apply`)."""
        now = self.clock()
        metric, other, metric_types = self._apply_metric, self._apply, _METRIC_TYPES
        for event in events:
            if event.type in metric_types:
                metric(event, now)
            else:
                other(event, now)
        self.applied += len(events)
        if now >= self._next_expiry:
            self.expire(now)

    def _apply(self, event: Event, now: int) -> None:
        etype = event.type
        if etype in _METRIC_TYPES:
            self._apply_metric(event, now)
        elif event.attrs and _WAIT in event.attrs:
            self._restore_wait(event)
        elif etype is EventType.PROCESS_STATE:
            self._apply_state(event, now)
        elif etype in ERROR_TYPES:
            self._apply_error(event, now)
        elif etype is EventType.INTENT_RUN:
            self._remember_intent(event)
        else:
            self._apply_action(event)

    def _ignore(self, reason: str) -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1

    # process.state ------------------------------------------------------------
    def _apply_state(self, event: Event, now: int) -> None:
        pid = event.pid
        if pid is None:
            self._ignore("process_state_without_pid")
            return
        state = event.value
        ctime = _create_time(event)
        proc = self.processes.get(pid)
        if ctime is not None and (pid, ctime) in self.tombstones and (proc is None or proc.create_time != ctime):
            # A late event about a process that already ended (not about the live one).
            self._ignore("state_after_exit")
            return
        same = proc is not None and ctime is not None and proc.create_time == ctime
        reused = ctime is not None and proc is not None and proc.create_time not in (None, ctime)
        if proc is not None and (reused or (state == "start" and not same)):
            # The pid was reused (or the process restarted): the old one is gone. A repeated
            # start with the same create_time (a probe restarted) is the same process.
            self._end(proc, now)
            proc = None
        elif proc is None and state != "start" and (pid, ctime) in self.tombstones:
            # No create_time to tell a late event from a new process: only a start is new.
            self._ignore("state_after_exit")
            return
        if proc is None:
            proc = self._new_process(event, ctime)
        self._merge_attrs(proc, event)
        self.processes.move_to_end(pid)
        if state == "d_state":
            if proc.d_state_since is None:
                proc.d_state_since = event
            target = str(event.attrs.get("device") or self._storage_of(proc) or "storage")
            self._wait(proc, target, "d_state", event)
        elif proc.d_state_since is not None:
            proc.d_state_since = None
            for key in [k for k, w in proc.waits.items() if w.reason == "d_state"]:
                del proc.waits[key]
        proc.state = state
        proc.state_event = event
        if state in ENDED_STATES or _AGE in event.attrs:
            # (a snapshot's tombstone carries its age, whatever state it ended in)
            self._end(proc, now - _int_attr(event, _AGE, 0))

    def _new_process(self, event: Event, ctime: float | None) -> Process:
        assert event.pid is not None
        name = str(event.attrs.get("name") or event.entity)
        proc = Process(
            pid=event.pid,
            create_time=ctime,
            name=name,
            state=event.value if event.type is EventType.PROCESS_STATE else "running",
            state_event=event,
            first_ts=event.ts,
        )
        self.processes[event.pid] = proc
        if len(self.processes) > self.limits.max_processes:
            _, oldest = self.processes.popitem(last=False)
            self._forget_process(oldest)
            self.evicted["processes"] += 1
        return proc

    def _merge_attrs(self, proc: Process, event: Event) -> None:
        attrs = event.attrs
        for key in _PROCESS_ATTRS:
            if key in attrs:
                proc.attrs[key] = attrs[key]
        name = attrs.get("name")
        if isinstance(name, str) and name:
            proc.name = name
        if event.job and proc.job != event.job:
            if proc.job is not None:
                self._unindex_job(proc)
            proc.job = event.job
            self.jobs.setdefault(event.job, set()).add(proc.pid)
        if proc.create_time is None:
            proc.create_time = _create_time(event)

    def _end(self, proc: Process, ended_recv: int) -> None:
        """Move a process to the tombstones; its edges stay so `why` can explain the death."""
        if self.processes.get(proc.pid) is proc:
            del self.processes[proc.pid]
        proc.ended_recv = ended_recv
        for entity in proc.consumes:
            res = self.resources.get(entity)
            if res is not None:
                res.consumers.discard(proc.pid)
        self._unindex_job(proc)
        key = (proc.pid, proc.create_time)
        self.tombstones[key] = proc
        self.tombstones.move_to_end(key)
        self._tomb_by_pid[proc.pid] = key
        if len(self.tombstones) > self.limits.max_tombstones:
            self._bury(*self.tombstones.popitem(last=False))
            self.evicted["tombstones"] += 1

    def _bury(self, key: tuple[int, float | None], proc: Process) -> None:
        if self._tomb_by_pid.get(proc.pid) == key:
            del self._tomb_by_pid[proc.pid]
        self._drop_pid_errors(proc.pid)

    def _forget_process(self, proc: Process) -> None:
        """An evicted live process: drop its edges and indexes (it leaves no tombstone)."""
        for entity in proc.consumes:
            res = self.resources.get(entity)
            if res is not None:
                res.consumers.discard(proc.pid)
        self._unindex_job(proc)
        self._drop_pid_errors(proc.pid)

    def _unindex_job(self, proc: Process) -> None:
        if proc.job is None:
            return
        pids = self.jobs.get(proc.job)
        if pids is not None:
            pids.discard(proc.pid)
            if not pids:
                del self.jobs[proc.job]

    def _tombstone(self, pid: int) -> Process | None:
        key = self._tomb_by_pid.get(pid)
        return None if key is None else self.tombstones.get(key)

    def _storage_of(self, proc: Process) -> str | None:
        for entity in proc.consumes:
            res = self.resources.get(entity)
            if res is not None and (EventType.STORAGE_IOPS in res.metrics or EventType.STORAGE_QDEPTH in res.metrics):
                return entity
        return None

    def _process_for(self, event: Event) -> Process:
        """The process an event with a pid talks about: the live one, else its tombstone (a late
        sample or error about a process that just ended), else a new live process."""
        assert event.pid is not None
        proc = self.processes.get(event.pid) or self._tombstone(event.pid)
        if proc is None:
            proc = self._new_process(event, None)
            proc.name = str(event.attrs.get("name") or "?")
        if event.job and proc.job is None and proc.alive:
            proc.job = event.job
            self.jobs.setdefault(event.job, set()).add(proc.pid)
        return proc

    def _wait(self, proc: Process, target: str, reason: str, event: Event) -> None:
        wait = proc.waits.get(target)
        if wait is None:
            proc.waits[target] = Wait(target, reason, event, event)
        else:
            wait.last = event

    def _restore_wait(self, event: Event) -> None:
        """A snapshot's WaitsOn edge: the event behind it, with bookkeeping attributes."""
        attrs = event.attrs
        if event.pid is None:
            return
        ctime = attrs.get(_CTIME)
        ckey = float(ctime) if isinstance(ctime, int | float) and not isinstance(ctime, bool) else None
        proc = self.tombstones.get((event.pid, ckey)) if _DEAD in attrs else self.processes.get(event.pid)
        if proc is None:
            return
        if attrs.get(_RESET):
            proc.waits.clear()
        reason, target = attrs.get(_WAIT), attrs.get(_TARGET)
        if not isinstance(reason, str) or not reason or not isinstance(target, str) or not target:
            return
        clean = {k: v for k, v in attrs.items() if not k.startswith("_")}
        try:
            etype = EventType(str(attrs.get(_TYPE)))
        except ValueError:
            etype = event.type
        original = Event(event.ts, etype, event.entity, event.value, event.pid, event.job, clean)
        proc.waits[target] = Wait(target, reason, original, original)

    # metrics --------------------------------------------------------------------
    def _apply_metric(self, event: Event, now: int) -> None:
        # The ingest hot path: one call per sample, so lookups are kept to the minimum.
        ts, etype, entity, value, pid, job, _attrs = event
        resources = self.resources
        res = resources.get(entity)
        if res is None:
            res = self._new_resource(entity, now)
        else:
            resources.move_to_end(entity)
        res.last_recv = now
        if pid is None:
            metrics = res.metrics
            previous = metrics.get(etype)
            if previous is not None and ts > previous.ts:
                # A moving estimate of the sample interval, for staleness.
                res.interval_ms = min(max((res.interval_ms * 3 + (ts - previous.ts)) // 4, 100), 600_000)
            metrics[etype] = event
            return
        proc = self.processes.get(pid)
        if proc is None or (job and proc.job is None):
            proc = self._process_for(event)
        usage = proc.consumes.get(entity)
        if usage is None:
            usage = proc.consumes[entity] = Usage(entity)
        if proc.ended_recv is None:
            res.consumers.add(pid)
        if etype is EventType.COMPUTE_MEM:
            usage.mem = event
        elif etype is EventType.TRANSPORT_BW:
            usage.util = event
            gbps = as_float(value)
            if value == "IO_WAIT" or (gbps is not None and gbps <= self.limits.stall_gbps):
                self._wait(proc, entity, "stalled", event)
            elif proc.waits:
                proc.waits.pop(entity, None)
                self._progress(proc)
        else:
            usage.util = event
            if proc.waits and etype is EventType.COMPUTE_UTIL:
                util = as_float(value)
                if util is not None and util >= self.limits.busy_util_pct:
                    self._progress(proc)

    @staticmethod
    def _progress(proc: Process) -> None:
        """The process moves data or computes again: it no longer waits on its job's peers."""
        if proc.waits:
            for target in [t for t in proc.waits if t.startswith("job:")]:
                del proc.waits[target]

    def _resource(self, entity: str, now: int) -> Resource:
        res = self.resources.get(entity)
        if res is None:
            return self._new_resource(entity, now)
        self.resources.move_to_end(entity)
        return res

    def _new_resource(self, entity: str, now: int) -> Resource:
        res = self.resources[entity] = Resource(entity, now, self.limits.default_interval_ms)
        if len(self.resources) > self.limits.max_resources:
            self._evict_resource(res)
        return res

    def _evict_resource(self, new: Resource) -> None:
        """Oldest first, unconsumed before consumed, never the resource being added."""
        for entity, res in self.resources.items():
            if not res.consumers and res is not new:
                del self.resources[entity]
                break
        else:
            self.resources.popitem(last=False)
        self.evicted["resources"] += 1

    # errors ---------------------------------------------------------------------
    def _apply_error(self, event: Event, now: int) -> None:
        code = event.value
        if code in HEALTHY_VALUES:
            self.clear(event.entity, code=str(event.attrs["code"]) if "code" in event.attrs else None)
            return
        if _HIST in event.attrs:
            self._restore_history(event)
            return
        key = (event.entity, code)
        count = _int_attr(event, _COUNT, 1)
        recv = now - _int_attr(event, _AGE, 0)
        err = self.errors.get(key) or self.conditions.get(key)
        if err is None:
            first = event
            if _FIRST in event.attrs:
                clean = {k: v for k, v in event.attrs.items() if not k.startswith("_")}
                first_ts = _int_attr(event, _FIRST, event.ts)
                first = Event(first_ts, event.type, event.entity, code, event.pid, event.job, clean)
            info = code_info(code)
            err = ErrorVertex(event.entity, code, event.type, first, event, recv, recv, count, info.condition)
            self._add_error(err)
        else:
            if _other_channel(err.last, event):
                # The same XID through NVML's event API and the kernel log: one fault, counted
                # once; the kernel line (it names the pid and carries the raw text) is kept.
                count = 0
                if event.attrs.get("source") != "nvml" and err.first.attrs.get("source") == "nvml":
                    err.first = event._replace(ts=min(err.first.ts, event.ts))
            err.count += count
            err.last = event
            err.touch = max(err.touch, recv)
            if not err.condition:
                self.errors.move_to_end(key)
        if event.pid is not None:
            proc = self._process_for(event)
            err.pids.add(proc.pid)
            self.errors_by_pid.setdefault(proc.pid, set()).add(key)
            if code == "NCCL_TIMEOUT" or (event.type is EventType.ERROR_NET and event.entity == proc.job):
                self._wait(proc, f"job:{event.job or proc.job or event.entity}", code, event)
        if _COUNT not in event.attrs and count:
            # (a snapshot's error events do not count again: its history events restore the counts)
            self._record_history(event, count)

    def _add_error(self, err: ErrorVertex) -> None:
        key = err.key
        if err.condition:
            self.conditions[key] = err
        else:
            self.errors[key] = err
        self.errors_by_base.setdefault(base_entity(err.entity), set()).add(key)
        if len(self.errors) + len(self.conditions) > self.limits.max_errors:
            # Oldest first, blips before conditions, never the error being added.
            victim = next((e for e in self.errors.values() if e is not err), None) or next(
                (e for e in self.conditions.values() if e is not err), None
            )
            if victim is not None:
                self._drop_error(victim)
                self.evicted["errors"] += 1

    def _drop_error(self, err: ErrorVertex) -> None:
        key = err.key
        self.errors.pop(key, None)
        self.conditions.pop(key, None)
        keys = self.errors_by_base.get(base_entity(err.entity))
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.errors_by_base[base_entity(err.entity)]
        for pid in err.pids:
            pkeys = self.errors_by_pid.get(pid)
            if pkeys is not None:
                pkeys.discard(key)
                if not pkeys:
                    del self.errors_by_pid[pid]

    def clear(self, entity: str, code: str | None = None) -> int:
        """The entity reports healthy (or an operator cleared it): drop its active errors."""
        keys = [k for k in self.errors_by_base.get(base_entity(entity), ()) if k[0] == entity]
        cleared = 0
        for key in keys:
            if code is None or key[1] == code:
                err = self.errors.get(key) or self.conditions.get(key)
                if err is not None:
                    self._drop_error(err)
                    cleared += 1
        return cleared

    def _record_history(self, event: Event, count: int) -> None:
        if not event.entity.startswith("gpu-"):
            return
        entity = base_entity(event.entity)
        codes = self.history.get(entity)
        if codes is None:
            codes = self.history[entity] = {}
            if len(self.history) > self.limits.max_history_entities:
                self.history.popitem(last=False)
        else:
            self.history.move_to_end(entity)
        entry = codes.get(event.value)
        if entry is None:
            if len(codes) >= self.limits.max_history_codes:
                del codes[min(codes, key=lambda c: codes[c].last_ts)]
            entry = codes[event.value] = CodeHistory(0, event.ts, event.ts)
        entry.count += count
        entry.last_ts = max(entry.last_ts, event.ts)
        entry.add_job(self._job_of(event))

    def _job_of(self, event: Event) -> str | None:
        if event.job:
            return event.job
        if event.pid is not None:
            proc = self.processes.get(event.pid)
            if proc is not None:
                return proc.job
        for pid in self.resource_consumers(base_entity(event.entity)):
            job = self.processes[pid].job
            if job:
                return job
        return None

    def _restore_history(self, event: Event) -> None:
        codes = self.history.setdefault(event.entity, {})
        jobs = str(event.attrs.get(_JOBS, ""))
        codes[event.value] = CodeHistory(
            _int_attr(event, _HIST, 1), _int_attr(event, _FIRST, event.ts), event.ts, [j for j in jobs.split(",") if j]
        )

    # intents and actions ------------------------------------------------------------
    def _remember_intent(self, event: Event) -> None:
        key = (event.entity, event.value)
        self.intents[key] = event
        self.intents.move_to_end(key)
        if len(self.intents) > self.limits.max_intents:
            self.intents.popitem(last=False)

    def _apply_action(self, event: Event) -> None:
        if event.value == "CLEAR":
            self.clear(event.entity, code=str(event.attrs["code"]) if "code" in event.attrs else None)
        self._remember_intent(event)

    # ------------------------------------------------------------------ windows
    def expire_due(self) -> None:
        """Expire if the last pass is more than a second old (cheap to call often)."""
        now = self.clock()
        if now >= self._next_expiry:
            self.expire(now)

    def expire(self, now: int | None = None) -> None:
        """Drop expired errors and tombstones. Amortised O(1): both are kept in expiry order."""
        now = self.clock() if now is None else now
        ttl = self.limits.error_ttl_ms
        while self.errors:
            err = next(iter(self.errors.values()))
            if now - err.touch <= ttl:
                break
            if self._explains_live(err):
                # No error expires while a process it explains is still blocked or waiting.
                err.touch = now
                self.errors.move_to_end(err.key)
                continue
            self._drop_error(err)
        tomb_ttl = self.limits.tombstone_ttl_ms
        while self.tombstones:
            key, proc = next(iter(self.tombstones.items()))
            if proc.ended_recv is not None and now - proc.ended_recv <= tomb_ttl:
                break
            del self.tombstones[key]
            self._bury(key, proc)
        self._next_expiry = now + 1_000

    def _drop_pid_errors(self, pid: int) -> None:
        """Unlink errors from a pid nothing (live or tombstone) answers to any more."""
        if pid in self.processes or pid in self._tomb_by_pid:
            return
        for key in list(self.errors_by_pid.get(pid, ())):
            err = self.errors.get(key) or self.conditions.get(key)
            if err is not None:
                err.pids.discard(pid)
        self.errors_by_pid.pop(pid, None)

    def _explains_live(self, err: ErrorVertex) -> bool:
        for pid in err.pids:
            proc = self.processes.get(pid)
            if proc is not None and (proc.waits or proc.state in ("hung", "d_state")):
                return True
        for pid in self.resource_consumers(base_entity(err.entity)):
            proc = self.processes[pid]
            if proc.waits or proc.state in ("hung", "d_state"):
                return True
        return False

    # ------------------------------------------------------------------ queries
    def find(self, pid: int) -> Process | None:
        """The live process with this pid, else its most recent tombstone."""
        return self.processes.get(pid) or self._tombstone(pid)

    def resource_consumers(self, base: str) -> Iterator[int]:
        """Live pids consuming ``base`` itself (consumers of ``gpu-1/nvlink-0`` are not included)."""
        res = self.resources.get(base)
        if res is not None:
            yield from (p for p in res.consumers if p in self.processes)

    def errors_on(self, entity: str) -> list[ErrorVertex]:
        """Active errors on an entity and its sub-resources (``gpu-1`` → ``gpu-1/nvlink-0``)."""
        out = []
        for key in self.errors_by_base.get(base_entity(entity), ()):
            err = self.errors.get(key) or self.conditions.get(key)
            if err is not None:
                out.append(err)
        return out

    def errors_of(self, pid: int, *, created: float | None = None) -> list[ErrorVertex]:
        """Active errors naming ``pid``. With ``created`` (the process's create time, in
        seconds), errors last seen before that process existed are about an earlier process
        that had the same pid, and are left out."""
        out = []
        floor = None if created is None else int(created * 1000) - _CREATE_SLACK_MS
        for key in self.errors_by_pid.get(pid, ()):
            err = self.errors.get(key) or self.conditions.get(key)
            if err is not None and (floor is None or err.last.ts >= floor):
                out.append(err)
        return out

    def active_errors(self) -> Iterator[ErrorVertex]:
        yield from self.conditions.values()
        yield from self.errors.values()

    def is_stale(self, res: Resource, now: int | None = None) -> bool:
        now = self.clock() if now is None else now
        return now - res.last_recv > self.limits.stale_intervals * res.interval_ms

    def stale_resources(self) -> list[str]:
        now = self.clock()
        return [e for e, r in self.resources.items() if self.is_stale(r, now)]

    def counts(self) -> dict[str, int]:
        consumes = sum(len(p.consumes) for p in self.processes.values())
        waits = sum(len(p.waits) for p in self.processes.values())
        blocked = sum(len(e.pids) + 1 for e in self.active_errors())
        return {
            "processes": len(self.processes),
            "tombstones": len(self.tombstones),
            "resources": len(self.resources),
            "errors": len(self.errors) + len(self.conditions),
            "consumes": consumes,
            "waits_on": waits,
            "blocked_by": blocked,
        }

    # ------------------------------------------------------------------ snapshot
    def snapshot_events(self) -> list[Event]:
        """The minimal event list that rebuilds this graph (``rebuild(snapshot) == graph``).

        Order matters: intents and actions first (a replayed CLEAR must not clear errors that
        came after it), then resources, tombstones, live processes, errors, history, and last
        the WaitsOn edges exactly as they are (replay derives some of them, not all).
        """
        now = self.clock()
        self.expire(now)
        out: list[Event] = list(self.intents.values())
        for res in self.resources.values():
            out.extend(res.metrics.values())
        for proc in self.tombstones.values():
            age = now - proc.ended_recv if proc.ended_recv is not None else 0
            out.extend(_process_events(proc, age))
        for proc in self.processes.values():
            restart = proc.state != "start" and (proc.pid, proc.create_time) in self.tombstones
            out.extend(_process_events(proc, None, restart=restart))
        for err in self.active_errors():
            age = now - err.touch
            attrs: dict[str, AttrValue] = dict(err.first.attrs)
            attrs.update({_COUNT: err.count, _FIRST: err.first.ts, _AGE: age})
            out.append(Event(err.last.ts, err.type, err.entity, err.code, None, err.first.job, attrs))
            out.extend(
                Event(err.last.ts, err.type, err.entity, err.code, pid, None, {_COUNT: 0, _AGE: age})
                for pid in sorted(err.pids)
            )
        for entity, codes in self.history.items():
            for code, hist in codes.items():
                hattrs: dict[str, AttrValue] = {_HIST: hist.count, _FIRST: hist.first_ts, _JOBS: ",".join(hist.jobs)}
                out.append(Event(hist.last_ts, EventType.ERROR_HW, entity, code, None, None, hattrs))
        for proc in self.tombstones.values():
            out.extend(_wait_events(proc, dead=True))
        for proc in self.processes.values():
            out.extend(_wait_events(proc, dead=False))
        return out

    def digest(self) -> dict[str, Any]:
        """A canonical, comparable view of the graph's state (tests and resync checks).

        A resource with neither samples of its own nor live consumers (known only from the
        per-process samples of processes since gone) holds no state and is left out.
        """

        def proc_view(p: Process) -> tuple[Any, ...]:
            return (
                p.pid,
                (p.create_time is not None, p.create_time or 0.0),
                p.name,
                p.state,
                p.job,
                sorted(p.attrs.items()),
                sorted(
                    (e, u.util.value if u.util else None, u.mem.value if u.mem else None) for e, u in p.consumes.items()
                ),
                sorted((t, w.reason) for t, w in p.waits.items()),
            )

        return {
            "processes": sorted(proc_view(p) for p in self.processes.values()),
            "tombstones": sorted(proc_view(p) for p in self.tombstones.values()),
            "resources": sorted(
                (e, sorted((t.value, m.value) for t, m in r.metrics.items()), sorted(r.consumers))
                for e, r in self.resources.items()
                if r.metrics or r.consumers
            ),
            "errors": sorted(
                (e.entity, e.code, e.count, e.first.ts, e.condition, sorted(e.pids)) for e in self.active_errors()
            ),
            "history": sorted(
                (ent, code, h.count, h.first_ts, h.last_ts, tuple(h.jobs))
                for ent, codes in self.history.items()
                for code, h in codes.items()
            ),
            "jobs": sorted((j, sorted(p)) for j, p in self.jobs.items()),
            "intents": sorted((k, v.ts) for k, v in self.intents.items()),
        }


def _process_events(proc: Process, age: int | None, *, restart: bool = False) -> Iterator[Event]:
    """A process first (so later events attach to it), then the events behind its Consumes edges.

    The state event's entity is the process's name, so the rebuilt process gets the same name
    without a ``name`` attribute it never had. ``restart``: a tombstone holds the same
    (pid, unknown create_time), so a start comes first (any other state would be taken for a
    late event about the dead one).
    """
    attrs: dict[str, AttrValue] = dict(proc.attrs)
    if proc.create_time is not None:
        attrs["create_time"] = proc.create_time
    if age is not None:
        attrs[_AGE] = age
    state = proc.state_event
    if restart:
        yield Event(state.ts, EventType.PROCESS_STATE, proc.name, "start", proc.pid, proc.job)
    yield Event(state.ts, EventType.PROCESS_STATE, proc.name, proc.state, proc.pid, proc.job, attrs)
    for usage in proc.consumes.values():
        if usage.util is not None:
            yield usage.util
        if usage.mem is not None:
            yield usage.mem


def _wait_events(proc: Process, *, dead: bool) -> Iterator[Event]:
    """The WaitsOn edges of a process as they are: replay derives some (a stalled sample, a
    d_state, an NCCL_TIMEOUT) but not all (the error may be gone), so they are reset and set."""
    base: dict[str, AttrValue] = {_RESET: True}
    if proc.create_time is not None:
        base[_CTIME] = proc.create_time
    if dead:
        base[_DEAD] = True
    if not proc.waits:
        yield Event(proc.state_event.ts, EventType.PROCESS_STATE, proc.name, "", proc.pid, None, {**base, _WAIT: ""})
        return
    for wait in proc.waits.values():
        ev = wait.first
        attrs = {**ev.attrs, **base, _WAIT: wait.reason, _TARGET: wait.target, _TYPE: ev.type.value}
        yield Event(ev.ts, EventType.PROCESS_STATE, ev.entity, ev.value, proc.pid, ev.job, attrs)
        base.pop(_RESET, None)


def _other_channel(seen: Event, new: Event) -> bool:
    """``new`` reports the XID ``seen`` already reported, through the other channel (NVML's
    event API vs the kernel log), within a few seconds."""
    if not new.value.startswith("XID_") or abs(new.ts - seen.ts) > _SAME_XID_MS:
        return False
    return (new.attrs.get("source") == "nvml") != (seen.attrs.get("source") == "nvml")


def _create_time(event: Event) -> float | None:
    ctime = event.attrs.get("create_time")
    if isinstance(ctime, int | float) and not isinstance(ctime, bool):
        return float(ctime)
    return None


def _int_attr(event: Event, key: str, default: int) -> int:
    value = event.attrs.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default
