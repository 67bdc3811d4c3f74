"""Properties of the pure core over generated event streams (hypothesis).

Streams mix all twelve event types over small pools of entities, pids, jobs and values
(XID codes, conditions, OK, IO_WAIT, process states), interleaved with receiver-clock
advances that cross every window. Example counts are kept modest so the file stays fast.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from xctl.core.clock import ManualClock
from xctl.core.cluster import ClusterGraph, LivenessConfig
from xctl.core.errors import EventError, NotFoundError, TargetError
from xctl.core.events import Event, EventType, events_from_wire, parse_line
from xctl.core.graph import GraphLimits, NodeGraph
from xctl.core.targets import Target, parse_target
from xctl.core.why import explain

T = EventType
T0 = 1_732_350_000_000
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PIDS = [101, 102, 103, 104]
JOBS = [None, "job-a", "job-b"]
GPUS = ["gpu-0", "gpu-1", "gpu-1/nvlink-0", "gpu-0/pcie"]
NICS = ["mlx5_0", "mlx5_1"]
STATES = ["start", "running", "exit", "zombie", "d_state", "oom_killed", "killed", "hung"]
HW_CODES = [
    "XID_79",
    "XID_13",
    "XID_31",
    "XID_45",
    "XID_48",
    "XID_63",
    "XID_74",
    "ECC_DBE",
    "ROW_REMAP_PENDING",
    "GPU_LOST",
    "CLOCK_EVENT_HW_THERMAL",
    "PROBE_CRASHED",
    "OK",
]
NET_CODES = ["LINK_FLAP", "LINK_DOWN", "NCCL_TIMEOUT", "OK"]
TOPO_CODES = ["NVLINK_DOWN", "PCIE_DEGRADED", "IB_PORT_DOWN", "OK"]

# A spec is (type, entity, value, pid, job, attrs); the event gets its ts when applied.
Spec = tuple[EventType, str, str, int | None, str | None, dict[str, Any]]

_pid = st.sampled_from([None, *PIDS])
_job = st.sampled_from(JOBS)


def _spec(etype: EventType, entity: Any, value: Any, pid: Any = _pid, attrs: Any = None) -> st.SearchStrategy[Spec]:
    return st.tuples(st.just(etype), entity, value, pid, _job, attrs if attrs is not None else st.just({}))


_state_attrs = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["python3", "loader"]),
        "create_time": st.sampled_from([1.0, 2.0]),
        "rank": st.integers(0, 3),
        "exit_code": st.sampled_from([0, 1, 137]),
        "device": st.sampled_from(["nvme0n1", "sda"]),
        "raw": st.just("Out of memory: Killed process"),
    },
)
_states = _spec(
    T.PROCESS_STATE, st.sampled_from(["python3", "proc"]), st.sampled_from(STATES), st.sampled_from(PIDS), _state_attrs
)
specs: st.SearchStrategy[Spec] = st.one_of(
    _spec(T.COMPUTE_UTIL, st.sampled_from([*GPUS[:2], "cpu"]), st.sampled_from(["0", "50", "97.5", "n/a"])),
    _spec(
        T.COMPUTE_MEM,
        st.sampled_from(["gpu-0", "gpu-1", "sysmem"]),
        st.sampled_from(["4", "78"]),
        attrs=st.fixed_dictionaries({"used_mib": st.sampled_from([100, 64000])}),
    ),
    _spec(T.TRANSPORT_BW, st.sampled_from([*NICS, "gpu-1/nvlink-0"]), st.sampled_from(["0", "IO_WAIT", "190.5"])),
    _spec(T.TRANSPORT_DROP, st.sampled_from(NICS), st.sampled_from(["0", "5"]), pid=st.none()),
    _spec(
        T.STORAGE_IOPS,
        st.just("nvme0n1"),
        st.sampled_from(["85", "3000"]),
        attrs=st.fixed_dictionaries({"await_ms": st.sampled_from([1.0, 850.0])}),
    ),
    _spec(T.STORAGE_QDEPTH, st.just("nvme0n1"), st.just("4")),
    _states,
    _spec(T.ERROR_HW, st.sampled_from([*GPUS, "nvme0n1"]), st.sampled_from(HW_CODES)),
    _spec(T.ERROR_NET, st.sampled_from([*NICS, "job-a"]), st.sampled_from(NET_CODES)),
    _spec(T.TOPO_LINK_DOWN, st.sampled_from(["gpu-1/nvlink-0", "gpu-0/pcie", "mlx5_0"]), st.sampled_from(TOPO_CODES)),
    _spec(T.INTENT_RUN, st.sampled_from(["job-a", "job-b"]), st.sampled_from(["JOB_START", "CHECKPOINT_BEGIN"])),
    _spec(
        T.ACTION_EXEC,
        st.sampled_from(["gpu-0", "gpu-1/nvlink-0", "mlx5_0"]),
        st.sampled_from(["ZAP", "CLEAR"]),
        pid=st.none(),
        attrs=st.fixed_dictionaries({}, optional={"code": st.sampled_from(["XID_79", "NVLINK_DOWN", "LINK_FLAP"])}),
    ),
)
# Receiver-clock advances that cross the staleness, error (5 min) and tombstone (10 min) windows.
advances = st.sampled_from([0, 1_000, 61_000, 301_000, 700_000])
# Sender skew: most events in sync, some an hour off either way.
skews = st.sampled_from([0, 0, 0, -3_600_000, 3_600_000])
Step = tuple[str, Any, int]
steps: st.SearchStrategy[list[Step]] = st.lists(
    st.one_of(
        st.tuples(st.just("ev"), specs, skews),
        st.tuples(st.just("adv"), advances, st.just(0)),
    ),
    max_size=40,
)


def event_at(clock: ManualClock, spec: Spec, skew: int) -> Event:
    etype, entity, value, pid, job, attrs = spec
    return Event(clock.now + skew, etype, entity, value, pid, job, attrs)


def play(graphs: list[NodeGraph], clock: ManualClock, seq: list[Step]) -> None:
    for kind, what, skew in seq:
        if kind == "adv":
            clock.advance(what)
            for g in graphs:
                g.expire()
        else:
            for g in graphs:
                g.apply(event_at(clock, what, skew))


TINY = GraphLimits(
    max_processes=3,
    max_tombstones=2,
    max_resources=4,
    max_errors=3,
    max_history_entities=2,
    max_history_codes=2,
    max_intents=3,
)
#: Tiny caps everywhere but resources: a process keeps its Consumes edge to an evicted
#: resource, and a replay recreates it, so resource eviction is not round-trip exact.
TINY_BUT_RESOURCES = GraphLimits(
    max_processes=3,
    max_tombstones=2,
    max_errors=3,
    max_history_entities=2,
    max_history_codes=2,
    max_intents=3,
)


def assert_consistent(g: NodeGraph) -> None:
    """Caps hold and every index agrees with the vertices it indexes."""
    lim = g.limits
    assert len(g.processes) <= lim.max_processes
    assert len(g.tombstones) <= lim.max_tombstones
    assert len(g.resources) <= lim.max_resources
    assert len(g.errors) + len(g.conditions) <= lim.max_errors
    assert len(g.history) <= lim.max_history_entities
    assert all(len(codes) <= lim.max_history_codes for codes in g.history.values())
    assert len(g.intents) <= lim.max_intents
    active = {e.key: e for e in g.active_errors()}
    assert not set(g.errors) & set(g.conditions)
    assert {k for keys in g.errors_by_base.values() for k in keys} == set(active)
    by_pid = {(p, k) for p, keys in g.errors_by_pid.items() for k in keys}
    assert by_pid == {(p, k) for k, e in active.items() for p in e.pids}
    assert all(p in g.processes or g.find(p) is not None for p in g.errors_by_pid)
    jobs: dict[str, set[int]] = {}
    for proc in g.processes.values():
        assert proc.alive
        if proc.job is not None:
            jobs.setdefault(proc.job, set()).add(proc.pid)
    assert jobs == g.jobs
    for entity, res in g.resources.items():
        assert all(pid in g.processes and entity in g.processes[pid].consumes for pid in res.consumers)
    for key, proc in g.tombstones.items():
        assert key == (proc.pid, proc.create_time) and not proc.alive


# ====================================================================== apply
@FAST
@given(steps)
def test_apply_never_raises_and_never_exceeds_a_cap(seq: list[Step]) -> None:
    clock = ManualClock(T0)
    g = NodeGraph("n", clock, TINY)
    for kind, what, skew in seq:
        if kind == "adv":
            clock.advance(what)
        else:
            g.apply(event_at(clock, what, skew))
        assert_consistent(g)
    assert g.applied == sum(1 for kind, _, _ in seq if kind == "ev")


_growth = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from([T.COMPUTE_UTIL, T.COMPUTE_MEM]), st.sampled_from(GPUS), st.sampled_from([*PIDS, 105])
        ),
        st.tuples(
            st.sampled_from([T.ERROR_HW, T.TOPO_LINK_DOWN]), st.sampled_from(GPUS), st.sampled_from(HW_CODES[:-1])
        ),
    ),
    max_size=60,
)


@FAST
@given(_growth)
def test_every_eviction_is_counted(seq: list[tuple[EventType, str, Any]]) -> None:
    # Samples and errors only, on a still clock: nothing ends, expires or clears, so every
    # vertex created and not present any more was evicted.
    g = NodeGraph("n", ManualClock(T0), GraphLimits(max_processes=2, max_resources=2, max_errors=2))
    created = {"processes": 0, "resources": 0, "errors": 0}
    for etype, entity, what in seq:
        if etype in (T.ERROR_HW, T.TOPO_LINK_DOWN):
            created["errors"] += all(e.key != (entity, what) for e in g.active_errors())
            g.apply(Event(T0, etype, entity, what))
        else:
            created["processes"] += what not in g.processes
            created["resources"] += entity not in g.resources
            g.apply(Event(T0, etype, entity, "50", what))
        assert_consistent(g)
    assert g.evicted["processes"] == created["processes"] - len(g.processes)
    assert g.evicted["resources"] == created["resources"] - len(g.resources)
    assert g.evicted["errors"] == created["errors"] - len(list(g.active_errors()))


# ====================================================================== snapshot
def _rebuild(g: NodeGraph, clock: ManualClock) -> NodeGraph:
    fresh = NodeGraph(g.node, clock, g.limits)
    fresh.apply_all(g.snapshot_events())
    return fresh


@FAST
@given(steps, steps)
def test_snapshot_round_trip_and_the_rebuild_behaves_the_same_afterwards(seq: list[Step], cont: list[Step]) -> None:
    clock = ManualClock(T0)
    g = NodeGraph("n", clock)
    play([g], clock, seq)
    again = _rebuild(g, clock)
    assert again.digest() == g.digest()
    play([g, again], clock, cont)
    assert again.digest() == g.digest()


@FAST
@given(steps, steps)
def test_snapshot_round_trip_under_tiny_caps(seq: list[Step], cont: list[Step]) -> None:
    clock = ManualClock(T0)
    g = NodeGraph("n", clock, TINY_BUT_RESOURCES)
    play([g], clock, seq)
    again = _rebuild(g, clock)
    assert again.digest() == g.digest()
    assert_consistent(again)
    play([g, again], clock, cont)
    assert again.digest() == g.digest()


@FAST
@given(steps)
def test_a_rebuild_under_tiny_caps_stays_within_them(seq: list[Step]) -> None:
    clock = ManualClock(T0)
    g = NodeGraph("n", clock, TINY)
    play([g], clock, seq)
    assert_consistent(_rebuild(g, clock))


# ====================================================================== why
NODES = ["node0", "node1"]
_any_text = st.text(max_size=20)
_known = st.builds(Target, node=st.sampled_from(NODES), pid=st.sampled_from(PIDS))
targets = st.one_of(
    _known,
    _known,
    _known,
    st.builds(Target, job=st.sampled_from(["job-a", "job-b"])),
    st.builds(Target, node=st.sampled_from([None, "node9"]), pid=st.sampled_from([*PIDS, 999])),
    st.builds(Target, job=st.sampled_from(["job-z", "", "job:a"])),
    _any_text,
    st.builds(lambda n, p: f"{n}:{p}", st.sampled_from([*NODES, "node9", ""]), st.sampled_from([*PIDS, "x", "0"])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("ev"), st.sampled_from(NODES), specs, skews),
            st.tuples(st.just("ev"), st.sampled_from(NODES), _states, skews),
            st.tuples(st.just("adv"), st.just(""), advances, st.just(0)),
            st.tuples(st.just("beat"), st.sampled_from(NODES), st.just(0), st.just(0)),
        ),
        min_size=5,
        max_size=40,
    ),
    st.lists(targets, min_size=1, max_size=8),
)
def test_explain_raises_only_not_found_or_target_errors(seq: list[Any], asked: list[Target | str]) -> None:
    clock = ManualClock(T0)
    cluster = ClusterGraph(clock, GraphLimits(), LivenessConfig(3_000, 30_000))
    for kind, node, what, skew in seq:
        if kind == "ev":
            cluster.apply(node, event_at(clock, what, skew))
        elif kind == "adv":
            clock.advance(what)
        else:
            cluster.seen(node)
    for target in asked:
        try:
            parsed = parse_target(target) if isinstance(target, str) else target
            exp = explain(cluster, parsed)
        except (NotFoundError, TargetError):
            continue
        assert exp.verdict in {"blocked", "waiting", "degraded", "exited", "running", "unknown"}
        json.dumps(exp.to_json())
        assert exp.to_text()


# ====================================================================== parse_line
def _assert_parse_only_raises_event_error(line: str | bytes) -> None:
    for node in (None, "node3"):
        try:
            ev = parse_line(line, now_ms=T0, node=node)
        except EventError:
            continue
        assert isinstance(ev, Event)
        assert isinstance(ev.value, str) and isinstance(ev.entity, str) and ev.entity


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parse_line_on_arbitrary_text(line: str) -> None:
    _assert_parse_only_raises_event_error(line)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_parse_line_on_arbitrary_bytes(line: bytes) -> None:
    _assert_parse_only_raises_event_error(line)


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12), st.sampled_from(PIDS)
)
_json_any = st.recursive(
    _json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
)
_field_values: dict[str, st.SearchStrategy[Any]] = {
    "ts": st.one_of(_json_any, st.integers(-10, 2**60)),
    "event_type": st.one_of(_json_any, st.sampled_from([t.value for t in EventType])),
    "type": st.one_of(_json_any, st.sampled_from([t.value for t in EventType])),
    "entity_id": st.one_of(_json_any, st.sampled_from(GPUS)),
    "entity": st.one_of(_json_any, st.text(min_size=1, max_size=300)),
    "job_id": _json_any,
    "job": st.one_of(_json_any, st.integers()),
    "pid": st.one_of(_json_any, st.integers(-5, 2**32)),
    "value": _json_any,
    "node": st.one_of(_json_any, st.sampled_from(["node3", "node7"])),
    "attrs": st.one_of(_json_any, st.dictionaries(st.text(max_size=70), _json_any, max_size=70)),
}
json_objects = st.one_of(_json_any, st.fixed_dictionaries({}, optional=_field_values))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_objects)
def test_parse_line_on_json_ish_objects(obj: Any) -> None:
    line = json.dumps(obj)
    _assert_parse_only_raises_event_error(line)
    _assert_parse_only_raises_event_error(line.encode())


@settings(max_examples=100, deadline=None)
@given(st.fixed_dictionaries({}, optional=_field_values))
def test_a_parsed_line_is_a_valid_wire_event(obj: dict[str, Any]) -> None:
    try:
        ev = parse_line(json.dumps(obj), now_ms=T0)
    except EventError:
        return
    assert Event.from_wire(ev.to_wire()) == ev


# Wire tuples near the edges of every limit: the batch fast path must accept and refuse
# exactly what the field-by-field checks do, and build the same event. Each item is a valid
# event with at most one field replaced, so both paths are exercised on every example.
_odd = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.integers(), st.lists(st.none(), max_size=1))
_edge_text = st.one_of(st.text(max_size=4), st.sampled_from(["", "x" * 256, "x" * 257, "x" * 4096, "x" * 4097]), _odd)
_edge_attrs = st.one_of(
    st.dictionaries(
        st.one_of(st.text(min_size=1, max_size=3), st.sampled_from(["", "k" * 64, "k" * 65, 7])),
        st.one_of(
            st.text(max_size=3),
            st.integers(),
            st.booleans(),
            st.floats(allow_nan=False, allow_infinity=False),
            st.sampled_from(["v" * 8192, "v" * 8193, math.nan, math.inf, None, [1]]),
        ),
        max_size=3,
    ),
    st.sampled_from([{f"k{i}": i for i in range(64)}, {f"k{i}": i for i in range(65)}, [], [1]]),
    _odd,
)
_edges = (
    st.one_of(st.sampled_from([0, 2**53 - 1, 2**53, -1]), _odd),  # ts
    st.one_of(st.sampled_from([t.value for t in EventType] + ["", "nope"]), _odd),  # type
    _edge_text,  # entity
    st.one_of(st.sampled_from([1, 2**31 - 1, 2**31, 0, -5]), _odd),  # pid
    _edge_text,  # job
    _edge_text,  # value
    _edge_attrs,
)
_valid_wire = [T0, "compute.util", "gpu-0", 4812, "job-1", "95", {"rank": 3, "name": "python3", "ok": True, "f": 1.5}]


@st.composite
def _wire_item(draw: st.DrawFn) -> Any:
    item = list(_valid_wire)
    item[6] = dict(item[6])
    field = draw(st.integers(min_value=-1, max_value=7))
    if 0 <= field < 7:
        item[field] = draw(_edges[field])
    elif field == 7:
        return draw(st.one_of(_odd, st.lists(st.integers(), max_size=8), st.just(tuple(item))))
    return item


def _with_attrs(attrs: Any) -> list[Any]:
    return [*_valid_wire[:6], attrs]


@settings(max_examples=600, deadline=None)
@given(st.lists(_wire_item(), max_size=3))
@example([_with_attrs({"k": "v" * 8192}), _with_attrs({"k": "v" * 8193})])
@example([_with_attrs({"k": math.inf}), _with_attrs({"k": -math.inf}), _with_attrs({"k": math.nan})])
@example([_with_attrs({"": 1}), _with_attrs({"k" * 65: 1}), _with_attrs({7: 1})])
def test_batch_fast_path_agrees_with_the_field_checks(items: list[Any]) -> None:
    good, bad = events_from_wire(items)
    expected_good: list[Event] = []
    expected_bad: list[tuple[int, str]] = []
    for index, item in enumerate(items):
        try:
            expected_good.append(Event._from_wire_checked(item))
        except EventError as exc:
            expected_bad.append((index, str(exc)))
    assert good == expected_good
    assert [(i, str(exc)) for i, exc in bad] == expected_bad
