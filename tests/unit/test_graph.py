"""The per-node causal graph (DESIGN §4): edges, windows, caps, history and snapshots.

Every test drives a NodeGraph with an injected ManualClock; windows run on that (receiver)
clock, whatever the events' own timestamps say.
"""

from __future__ import annotations

from typing import Any

import pytest

from xctl.core.clock import ManualClock
from xctl.core.events import Event, EventType, parse_line
from xctl.core.graph import GraphLimits, NodeGraph, base_entity

T0 = 1_732_350_000_000
S = 1_000
MIN = 60 * S

U, M, BW, DROP = EventType.COMPUTE_UTIL, EventType.COMPUTE_MEM, EventType.TRANSPORT_BW, EventType.TRANSPORT_DROP
IOPS, QD, ST = EventType.STORAGE_IOPS, EventType.STORAGE_QDEPTH, EventType.PROCESS_STATE
HW, NET, TOPO = EventType.ERROR_HW, EventType.ERROR_NET, EventType.TOPO_LINK_DOWN
INTENT, ACTION = EventType.INTENT_RUN, EventType.ACTION_EXEC


class G:
    """A NodeGraph, its clock, and terse event helpers (ts = the clock unless skewed)."""

    def __init__(self, limits: GraphLimits | None = None) -> None:
        self.clock = ManualClock(T0)
        self.g = NodeGraph("node0", self.clock, limits)

    def emit(
        self,
        etype: EventType,
        entity: str,
        value: str,
        pid: int | None = None,
        job: str | None = None,
        skew: int = 0,
        **attrs: Any,
    ) -> Event:
        ev = Event(self.clock.now + skew, etype, entity, value, pid, job, attrs)
        self.g.apply(ev)
        return ev

    def start(self, pid: int, job: str | None = "job-42", ctime: float | None = None, **attrs: Any) -> Event:
        if ctime is not None:
            attrs["create_time"] = ctime
        attrs.setdefault("name", "python3")
        return self.emit(ST, "python3", "start", pid, job, **attrs)

    def state(self, pid: int, value: str, job: str | None = "job-42", **attrs: Any) -> Event:
        return self.emit(ST, "python3", value, pid, job, **attrs)

    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    def later(self, ms: int) -> None:
        """Advance the receiver's clock and run the windows."""
        self.clock.advance(ms)
        self.g.expire()

    def errors(self) -> set[tuple[str, str]]:
        return {e.key for e in self.g.active_errors()}


def rebuilt(t: G) -> NodeGraph:
    fresh = NodeGraph(t.g.node, t.clock, t.g.limits)
    fresh.apply_all(t.g.snapshot_events())
    return fresh


# ====================================================================== Consumes
@pytest.mark.parametrize(
    ("etype", "entity", "slot"),
    [(U, "gpu-0", "util"), (M, "gpu-0", "mem"), (U, "cpu", "util"), (M, "sysmem", "mem"), (IOPS, "nvme0n1", "util")],
)
def test_compute_and_storage_samples_with_a_pid_are_consumes_edges(etype: EventType, entity: str, slot: str) -> None:
    t = G()
    t.start(4812)
    ev = t.emit(etype, entity, "42", 4812, "job-42", used_mib=100)
    usage = t.g.processes[4812].consumes[entity]
    assert getattr(usage, slot) is ev
    assert t.g.resources[entity].consumers == {4812}
    assert list(t.g.resource_consumers(entity)) == [4812]


def test_storage_qdepth_with_a_pid_consumes_the_device() -> None:
    t = G()
    t.start(7)
    t.emit(QD, "nvme0n1", "4", 7)
    assert "nvme0n1" in t.g.processes[7].consumes
    assert t.g.resources["nvme0n1"].consumers == {7}


def test_usage_exposes_util_and_mem_used() -> None:
    t = G()
    t.start(4812)
    t.emit(U, "gpu-1", "97.5", 4812)
    t.emit(M, "gpu-1", "78", 4812, used_mib=64000, total_mib=81559)
    usage = t.g.processes[4812].consumes["gpu-1"]
    assert usage.util_pct == 97.5
    assert usage.mem_used_mib == 64000.0
    assert [u.entity for u in t.g.processes[4812].gpus()] == ["gpu-1"]


def test_a_sample_without_a_pid_is_a_resource_metric_not_an_edge() -> None:
    t = G()
    ev = t.emit(U, "gpu-0", "97")
    assert t.g.processes == {}
    res = t.g.resources["gpu-0"]
    assert res.metrics[U] is ev
    assert res.metric(U) == 97.0
    assert res.consumers == set()


def test_a_sample_for_an_unknown_pid_creates_the_process() -> None:
    t = G()
    t.emit(U, "gpu-2", "50", 999, "job-9", name="trainer")
    proc = t.g.processes[999]
    assert (proc.name, proc.state, proc.job) == ("trainer", "running", "job-9")
    assert t.g.jobs == {"job-9": {999}}


def test_several_processes_share_a_resource_in_the_reverse_index() -> None:
    t = G()
    for pid in (1, 2, 3):
        t.start(pid)
        t.emit(U, "gpu-0", "30", pid)
    assert t.g.resources["gpu-0"].consumers == {1, 2, 3}
    t.state(2, "exit", exit_code=0)
    assert t.g.resources["gpu-0"].consumers == {1, 3}
    assert sorted(t.g.resource_consumers("gpu-0")) == [1, 3]


# ====================================================================== WaitsOn
@pytest.mark.parametrize("value", ["IO_WAIT", "0", "0.0"])
def test_a_stalled_transport_sample_with_a_pid_waits_on_the_link(value: str) -> None:
    t = G()
    t.start(4812)
    ev = t.emit(BW, "mlx5_0", value, 4812)
    wait = t.g.processes[4812].waits["mlx5_0"]
    assert (wait.target, wait.reason, wait.first) == ("mlx5_0", "stalled", ev)


def test_a_later_positive_sample_clears_the_stall() -> None:
    t = G()
    t.start(4812)
    first = t.emit(BW, "mlx5_0", "IO_WAIT", 4812)
    t.advance(S)
    again = t.emit(BW, "mlx5_0", "0", 4812)
    wait = t.g.processes[4812].waits["mlx5_0"]
    assert (wait.first, wait.last) == (first, again)
    t.advance(S)
    t.emit(BW, "mlx5_0", "190.5", 4812)
    assert t.g.processes[4812].waits == {}


def test_a_stall_without_a_pid_is_no_wait() -> None:
    t = G()
    t.start(4812)
    t.emit(BW, "mlx5_0", "IO_WAIT")
    assert t.g.processes[4812].waits == {}


def test_a_configured_stall_threshold() -> None:
    t = G(GraphLimits(stall_gbps=1.0))
    t.start(4812)
    t.emit(BW, "ib0", "0.5", 4812)
    assert t.g.processes[4812].waits["ib0"].reason == "stalled"
    t.emit(BW, "ib0", "1.5", 4812)
    assert t.g.processes[4812].waits == {}


def test_d_state_waits_on_the_named_device_and_running_clears_it() -> None:
    t = G()
    t.start(4812)
    ev = t.state(4812, "d_state", device="nvme1n1")
    proc = t.g.processes[4812]
    assert proc.waits["nvme1n1"].reason == "d_state"
    assert proc.d_state_since is ev
    t.advance(S)
    t.state(4812, "d_state", device="nvme1n1")
    assert proc.d_state_since is ev, "d_state_since is the first of the run"
    t.advance(S)
    t.state(4812, "running")
    assert proc.waits == {}
    assert proc.d_state_since is None


def test_d_state_waits_on_the_storage_the_process_consumes() -> None:
    t = G()
    t.start(4812)
    t.emit(IOPS, "nvme0n1", "85", None, await_ms=850.0)
    t.emit(IOPS, "nvme0n1", "85", 4812)
    t.state(4812, "d_state")
    assert set(t.g.processes[4812].waits) == {"nvme0n1"}


def test_d_state_without_known_storage_waits_on_storage() -> None:
    t = G()
    t.start(4812)
    t.state(4812, "d_state")
    assert t.g.processes[4812].waits["storage"].reason == "d_state"


def test_d_state_clearing_keeps_other_waits() -> None:
    t = G()
    t.start(4812)
    t.emit(BW, "mlx5_0", "IO_WAIT", 4812)
    t.state(4812, "d_state", device="sda")
    t.state(4812, "running")
    assert set(t.g.processes[4812].waits) == {"mlx5_0"}


def test_nccl_timeout_with_a_pid_waits_on_the_job() -> None:
    t = G()
    t.start(4812)
    ev = t.emit(NET, "job-42", "NCCL_TIMEOUT", 4812, "job-42")
    wait = t.g.processes[4812].waits["job:job-42"]
    assert (wait.reason, wait.first) == ("NCCL_TIMEOUT", ev)


def test_nccl_timeout_named_on_a_device_still_waits_on_the_process_job() -> None:
    t = G()
    t.start(4812, job="job-7")
    t.emit(NET, "mlx5_3", "NCCL_TIMEOUT", 4812)
    assert set(t.g.processes[4812].waits) == {"job:job-7"}


def test_another_network_error_on_the_job_entity_waits_on_the_job() -> None:
    t = G()
    t.start(4812)
    t.emit(NET, "job-42", "IBV_WC_RETRY_EXC_ERR", 4812, "job-42")
    assert t.g.processes[4812].waits["job:job-42"].reason == "IBV_WC_RETRY_EXC_ERR"


def test_a_network_error_on_a_device_with_a_pid_is_no_job_wait() -> None:
    t = G()
    t.start(4812)
    t.emit(NET, "mlx5_0", "LINK_FLAP", 4812, "job-42")
    assert t.g.processes[4812].waits == {}
    assert [e.code for e in t.g.errors_of(4812)] == ["LINK_FLAP"]


# ====================================================================== BlockedBy
def test_an_error_naming_a_resource_blocks_it() -> None:
    t = G()
    ev = t.emit(HW, "gpu-3", "XID_79", raw="NVRM: Xid (PCI:0000:8a:00): 79")
    [err] = t.g.errors_on("gpu-3")
    assert (err.entity, err.code, err.type, err.first, err.count, err.condition) == (
        "gpu-3",
        "XID_79",
        HW,
        ev,
        1,
        True,
    )
    assert t.g.errors_on("gpu-2") == []


def test_errors_on_sub_resources_count_for_their_gpu() -> None:
    t = G()
    t.emit(TOPO, "gpu-1/nvlink-0", "NVLINK_DOWN")
    t.emit(TOPO, "gpu-1/pcie", "PCIE_DEGRADED", width=4, max_width=16)
    t.emit(HW, "gpu-10", "XID_48")
    assert base_entity("gpu-1/nvlink-0") == "gpu-1"
    assert {e.entity for e in t.g.errors_on("gpu-1")} == {"gpu-1/nvlink-0", "gpu-1/pcie"}
    assert {e.entity for e in t.g.errors_on("gpu-1/nvlink-3")} == {"gpu-1/nvlink-0", "gpu-1/pcie"}
    assert {e.entity for e in t.g.errors_on("gpu-10")} == {"gpu-10"}


def test_an_error_naming_a_pid_blocks_the_process() -> None:
    t = G()
    t.start(4812)
    t.emit(HW, "gpu-2", "XID_13", 4812, "job-42")
    [err] = t.g.errors_of(4812)
    assert (err.code, err.pids) == ("XID_13", {4812})
    assert t.g.errors_of(4813) == []


def test_a_repeated_error_counts_and_keeps_its_first_event() -> None:
    t = G()
    first = t.emit(HW, "gpu-0", "XID_92")
    t.advance(10 * S)
    last = t.emit(HW, "gpu-0", "XID_92", count=1)
    [err] = t.g.errors_on("gpu-0")
    assert (err.count, err.first, err.last) == (2, first, last)


def test_an_error_with_pids_collects_them_all() -> None:
    t = G()
    for pid in (1, 2):
        t.start(pid)
        t.emit(HW, "gpu-0", "XID_31", pid)
    [err] = t.g.errors_on("gpu-0")
    assert (err.pids, err.count) == ({1, 2}, 2)


@pytest.mark.parametrize("healthy", ["OK", "HEALTHY", "UP", "CLEARED"])
def test_a_healthy_value_on_the_entity_clears_its_errors(healthy: str) -> None:
    t = G()
    t.emit(TOPO, "gpu-1/nvlink-0", "NVLINK_DOWN")
    t.emit(HW, "gpu-1", "XID_79")
    t.emit(TOPO, "gpu-1/nvlink-0", healthy)
    assert t.errors() == {("gpu-1", "XID_79")}
    assert t.g.errors_by_base == {"gpu-1": {("gpu-1", "XID_79")}}


def test_a_healthy_value_with_a_code_clears_only_that_code() -> None:
    t = G()
    t.emit(HW, "gpu-1", "XID_79")
    t.emit(HW, "gpu-1", "ROW_REMAP_PENDING")
    t.emit(HW, "gpu-1", "OK", code="ROW_REMAP_PENDING")
    assert t.errors() == {("gpu-1", "XID_79")}


def test_an_operator_clear_action_clears_and_is_remembered() -> None:
    t = G()
    t.emit(HW, "gpu-1", "XID_79")
    t.emit(HW, "gpu-1", "ECC_DBE")
    t.emit(HW, "gpu-2", "XID_79")
    ev = t.emit(ACTION, "gpu-1", "CLEAR", by="alice", code="ECC_DBE")
    assert t.errors() == {("gpu-1", "XID_79"), ("gpu-2", "XID_79")}
    t.emit(ACTION, "gpu-1", "CLEAR", by="alice")
    assert t.errors() == {("gpu-2", "XID_79")}
    assert t.g.intents[("gpu-1", "CLEAR")].attrs["by"] == "alice"
    assert ev.value == "CLEAR"


def test_other_actions_clear_nothing() -> None:
    t = G()
    t.emit(HW, "gpu-1", "XID_79")
    t.emit(ACTION, "gpu-1", "ZAP", by="alice")
    assert t.errors() == {("gpu-1", "XID_79")}
    assert ("gpu-1", "ZAP") in t.g.intents


def test_clear_returns_how_many_it_cleared() -> None:
    t = G()
    t.emit(HW, "gpu-1", "XID_79")
    t.emit(HW, "gpu-1", "XID_63")
    assert t.g.clear("gpu-1", code="XID_63") == 1
    assert t.g.clear("gpu-1") == 1
    assert t.g.clear("gpu-1") == 0


# ====================================================================== processes
def test_start_creates_a_process_with_its_attributes_and_job() -> None:
    t = G()
    t.start(4812, ctime=1_732_349_000.5, rank=3, cmdline="python3 train.py", ppid=1, local_rank=3, world_size=8)
    proc = t.g.processes[4812]
    assert (proc.pid, proc.create_time, proc.name, proc.state, proc.job, proc.rank) == (
        4812,
        1_732_349_000.5,
        "python3",
        "start",
        "job-42",
        3,
    )
    assert proc.attrs["cmdline"] == "python3 train.py"
    assert t.g.jobs == {"job-42": {4812}}


def test_a_state_without_a_pid_is_ignored_and_counted() -> None:
    t = G()
    t.emit(ST, "python3", "running")
    assert t.g.processes == {}
    assert t.g.ignored == {"process_state_without_pid": 1}


@pytest.mark.parametrize("ended", ["exit", "killed", "oom_killed"])
def test_an_ended_process_becomes_a_tombstone(ended: str) -> None:
    t = G()
    t.start(4812, ctime=1.0)
    t.emit(U, "gpu-0", "90", 4812)
    t.advance(5 * S)
    t.state(4812, ended, exit_code=137)
    assert 4812 not in t.g.processes
    tomb = t.g.tombstones[(4812, 1.0)]
    assert (tomb.state, tomb.ended_recv, tomb.alive) == (ended, t.clock.now, False)
    assert "gpu-0" in tomb.consumes, "edges stay so why can explain the death"
    assert t.g.find(4812) is tomb
    assert t.g.jobs == {}
    assert t.g.resources["gpu-0"].consumers == set()


def test_pid_reuse_ends_the_old_process_into_a_tombstone() -> None:
    t = G()
    t.start(4812, job="job-a", ctime=1.0)
    t.emit(U, "gpu-0", "90", 4812)
    t.advance(S)
    t.start(4812, job="job-b", ctime=2.0)
    old = t.g.tombstones[(4812, 1.0)]
    new = t.g.processes[4812]
    assert old is not new
    assert (old.job, old.ended_recv) == ("job-a", t.clock.now)
    assert (new.job, new.create_time, new.consumes) == ("job-b", 2.0, {})
    assert t.g.jobs == {"job-b": {4812}}
    assert t.g.find(4812) is new


def test_any_state_with_another_create_time_is_a_reused_pid() -> None:
    t = G()
    t.start(4812, ctime=1.0)
    t.state(4812, "running", create_time=2.0)
    assert t.g.processes[4812].create_time == 2.0
    assert (4812, 1.0) in t.g.tombstones


def test_start_for_a_live_pid_restarts_it() -> None:
    t = G()
    t.start(4812)
    old = t.g.processes[4812]
    t.advance(S)
    t.start(4812)
    assert t.g.processes[4812] is not old
    assert t.g.processes[4812].state == "start"
    assert t.g.tombstones[(4812, None)] is old


def test_a_repeated_start_with_the_same_create_time_is_the_same_process() -> None:
    t = G()
    t.start(4812, ctime=1.0, rank=0)
    proc = t.g.processes[4812]
    t.state(4812, "hung")
    t.start(4812, ctime=1.0, rank=0)
    assert t.g.processes[4812] is proc
    assert proc.state == "start"
    assert t.g.tombstones == {}


def test_a_late_event_about_a_dead_process_does_not_touch_its_successor() -> None:
    t = G()
    t.start(4812, ctime=1.0)
    t.state(4812, "exit", create_time=1.0)
    t.start(4812, ctime=2.0)
    successor = t.g.processes[4812]
    t.state(4812, "hung", create_time=1.0)
    assert t.g.processes[4812] is successor
    assert successor.state == "start"
    assert set(t.g.tombstones) == {(4812, 1.0)}
    assert t.g.ignored == {"state_after_exit": 1}


def test_a_late_state_after_exit_does_not_resurrect_the_process() -> None:
    t = G()
    t.start(4812, ctime=1.0)
    t.state(4812, "exit", create_time=1.0)
    t.state(4812, "running", create_time=1.0)
    assert 4812 not in t.g.processes
    assert t.g.ignored == {"state_after_exit": 1}


def test_a_late_sample_about_an_exited_pid_goes_to_its_tombstone() -> None:
    t = G()
    t.start(4812, ctime=1.0)
    t.state(4812, "exit", create_time=1.0)
    t.emit(U, "gpu-0", "0", 4812, "job-42")
    t.emit(HW, "gpu-0", "XID_43", 4812)
    assert 4812 not in t.g.processes, "no phantom live process"
    tomb = t.g.tombstones[(4812, 1.0)]
    assert tomb.consumes["gpu-0"].util_pct == 0.0
    assert t.g.resources["gpu-0"].consumers == set()
    assert t.g.jobs == {}
    assert [e.code for e in t.g.errors_of(4812)] == ["XID_43"]


def test_a_job_change_moves_the_process_in_the_job_index() -> None:
    t = G()
    t.start(4812, job="job-a")
    t.state(4812, "running", job="job-b")
    assert t.g.jobs == {"job-b": {4812}}
    assert t.g.processes[4812].job == "job-b"


# ====================================================================== windows
@pytest.mark.parametrize(
    "skew", [0, 86_400_000, -86_400_000, 10 * 365 * 86_400_000], ids=["in-sync", "+1d", "-1d", "+10y"]
)
def test_errors_expire_after_five_minutes_of_receiver_time(skew: int) -> None:
    t = G()
    t.emit(HW, "gpu-0", "XID_13", skew=skew)
    t.emit(NET, "mlx5_0", "LINK_FLAP", skew=skew)
    t.later(299 * S)
    assert t.errors() == {("gpu-0", "XID_13"), ("mlx5_0", "LINK_FLAP")}
    t.later(2 * S)
    assert t.errors() == set()
    assert t.g.errors_by_base == {}


def test_a_skewed_sender_cannot_expire_other_errors() -> None:
    t = G()
    t.emit(HW, "gpu-0", "XID_13")
    t.emit(HW, "gpu-1", "XID_13", skew=3_600_000)
    t.emit(U, "gpu-2", "50", skew=3_600_000)
    assert t.errors() == {("gpu-0", "XID_13"), ("gpu-1", "XID_13")}


def test_a_repeat_restarts_the_window() -> None:
    t = G()
    t.emit(HW, "gpu-0", "XID_13")
    t.later(200 * S)
    t.emit(HW, "gpu-0", "XID_13")
    t.later(200 * S)
    assert t.errors() == {("gpu-0", "XID_13")}
    t.later(101 * S)
    assert t.errors() == set()


def test_the_window_is_configurable() -> None:
    t = G(GraphLimits(error_ttl_ms=10 * S))
    t.emit(HW, "gpu-0", "XID_13")
    t.later(10 * S)
    assert t.errors() == {("gpu-0", "XID_13")}
    t.later(1)
    assert t.errors() == set()


def test_apply_runs_the_windows_too() -> None:
    t = G()
    t.emit(HW, "gpu-0", "XID_13")
    t.advance(301 * S)
    t.emit(U, "gpu-1", "50")
    assert t.errors() == set()


@pytest.mark.parametrize(
    ("etype", "entity", "code"),
    [
        (HW, "gpu-0", "XID_79"),
        (HW, "gpu-0", "GPU_LOST"),
        (HW, "gpu-0", "ECC_DBE"),
        (HW, "gpu-0", "XID_48"),
        (HW, "gpu-0", "ROW_REMAP_PENDING"),
        (HW, "gpu-0", "ROW_REMAP_FAILURE"),
        (TOPO, "gpu-0/nvlink-2", "NVLINK_DOWN"),
        (TOPO, "gpu-0/pcie", "PCIE_DEGRADED"),
        (TOPO, "mlx5_0", "IB_PORT_DOWN"),
        (NET, "eth0", "LINK_DOWN"),
    ],
)
def test_conditions_never_expire_until_healthy_or_cleared(etype: EventType, entity: str, code: str) -> None:
    t = G()
    t.emit(etype, entity, code)
    t.later(24 * 3_600 * S)
    assert t.errors() == {(entity, code)}
    assert t.g.conditions[(entity, code)].condition
    t.emit(etype, entity, "OK")
    assert t.errors() == set()
    t.emit(etype, entity, code)
    t.later(3_600 * S)
    t.emit(ACTION, entity, "CLEAR", by="op")
    assert t.errors() == set()


def test_an_error_naming_a_hung_process_does_not_expire() -> None:
    t = G()
    t.start(4812)
    t.emit(HW, "gpu-2", "XID_13", 4812)
    t.state(4812, "hung")
    t.later(3_600 * S)
    assert t.errors() == {("gpu-2", "XID_13")}
    t.state(4812, "exit", exit_code=1)
    t.later(299 * S)
    assert t.errors() == {("gpu-2", "XID_13")}
    t.later(2 * S)
    assert t.errors() == set()


def test_an_error_on_a_resource_a_waiting_process_consumes_does_not_expire() -> None:
    t = G()
    t.start(4812)
    t.emit(U, "gpu-2", "0", 4812)
    t.emit(HW, "gpu-2/nvlink-1", "XID_74")
    t.emit(NET, "job-42", "NCCL_TIMEOUT", 4812, "job-42")
    t.emit(HW, "gpu-5", "XID_74")
    t.later(3_600 * S)
    assert ("gpu-2/nvlink-1", "XID_74") in t.errors()
    assert ("job-42", "NCCL_TIMEOUT") in t.errors()
    assert ("gpu-5", "XID_74") not in t.errors(), "nobody waiting consumes gpu-5"


def test_an_error_on_the_storage_of_a_d_state_process_does_not_expire() -> None:
    t = G()
    t.start(4812)
    t.emit(IOPS, "nvme0n1", "3", 4812)
    t.state(4812, "d_state", device="nvme0n1")
    t.emit(HW, "nvme0n1", "NVME_TIMEOUT")
    t.later(3_600 * S)
    assert t.errors() == {("nvme0n1", "NVME_TIMEOUT")}
    t.state(4812, "running")
    t.later(301 * S)
    assert t.errors() == set()


def test_tombstones_stay_ten_minutes_then_go() -> None:
    t = G()
    t.start(4812, ctime=1.0)
    t.emit(HW, "gpu-0", "XID_13", 4812)
    t.state(4812, "exit", exit_code=1)
    t.later(599 * S)
    assert t.g.find(4812) is not None
    t.later(2 * S)
    assert t.g.find(4812) is None
    assert t.g.tombstones == {}
    assert t.g.errors_by_pid == {}


def test_the_tombstone_window_is_configurable() -> None:
    t = G(GraphLimits(tombstone_ttl_ms=30 * S))
    t.start(4812)
    t.state(4812, "killed")
    t.later(30 * S)
    assert len(t.g.tombstones) == 1
    t.later(1)
    assert len(t.g.tombstones) == 0


def test_a_resource_not_refreshed_for_three_intervals_is_stale() -> None:
    t = G()
    for _ in range(5):
        t.emit(U, "gpu-0", "50")
        t.emit(U, "gpu-1", "50")
        t.advance(S)
    t.emit(U, "gpu-1", "50")
    t.advance(2 * S)
    res = t.g.resources["gpu-0"]
    assert res.interval_ms == S
    assert not t.g.is_stale(res)
    assert t.g.stale_resources() == []
    t.advance(1)
    assert t.g.is_stale(res)
    assert t.g.stale_resources() == ["gpu-0"]
    t.emit(U, "gpu-0", "50")
    assert t.g.stale_resources() == []


def test_staleness_learns_the_sample_interval_from_event_timestamps() -> None:
    t = G()
    for _ in range(30):
        t.emit(IOPS, "nvme0n1", "85")
        t.advance(10 * S)
    res = t.g.resources["nvme0n1"]
    assert 9 * S < res.interval_ms <= 10 * S
    t.advance(15 * S)  # 25 s of silence: less than three 10 s intervals
    assert not t.g.is_stale(res)
    t.advance(10 * S)
    assert t.g.is_stale(res)


def test_the_stale_interval_count_is_configurable() -> None:
    t = G(GraphLimits(stale_intervals=10))
    t.emit(U, "gpu-0", "50")
    t.advance(9 * S)
    assert t.g.stale_resources() == []
    t.advance(2 * S)
    assert t.g.stale_resources() == ["gpu-0"]


# ====================================================================== caps
TINY = GraphLimits(max_processes=5, max_errors=3, max_tombstones=2, max_resources=4, max_intents=3)


def assert_within(g: NodeGraph) -> None:
    lim = g.limits
    assert len(g.processes) <= lim.max_processes
    assert len(g.tombstones) <= lim.max_tombstones
    assert len(g.resources) <= lim.max_resources
    assert len(g.errors) + len(g.conditions) <= lim.max_errors
    assert len(g.intents) <= lim.max_intents
    assert len(g.history) <= lim.max_history_entities


def test_processes_are_capped_oldest_first() -> None:
    t = G(TINY)
    for pid in range(1, 9):
        t.start(pid, job=f"job-{pid}")
        t.emit(U, "gpu-0", "10", pid)
        t.emit(HW, "gpu-1", "XID_13", pid)
        assert_within(t.g)
    assert list(t.g.processes) == [4, 5, 6, 7, 8]
    assert t.g.evicted["processes"] == 3
    assert set(t.g.jobs) == {f"job-{p}" for p in range(4, 9)}
    assert t.g.resources["gpu-0"].consumers == {4, 5, 6, 7, 8}
    assert set(t.g.errors_by_pid) == {4, 5, 6, 7, 8}, "evicted processes leave no error links"


def test_recently_active_processes_survive_eviction() -> None:
    t = G(TINY)
    for pid in range(1, 6):
        t.start(pid)
    t.state(1, "running")
    t.start(6)
    assert 1 in t.g.processes
    assert 2 not in t.g.processes


def test_tombstones_are_capped_oldest_first() -> None:
    t = G(TINY)
    for pid in range(1, 5):
        t.start(pid, ctime=float(pid))
        t.emit(HW, "gpu-0", "XID_13", pid)
        t.state(pid, "exit")
        assert_within(t.g)
    assert set(t.g.tombstones) == {(3, 3.0), (4, 4.0)}
    assert t.g.evicted["tombstones"] == 2
    assert t.g.find(1) is None
    assert set(t.g.errors_by_pid) == {3, 4}


def test_errors_are_capped_evicting_blips_before_conditions() -> None:
    t = G(TINY)
    t.emit(HW, "gpu-0", "XID_79")
    for i in range(1, 6):
        t.emit(HW, f"gpu-{i}", "XID_13")
        assert_within(t.g)
    assert t.errors() == {("gpu-0", "XID_79"), ("gpu-4", "XID_13"), ("gpu-5", "XID_13")}
    assert t.g.evicted["errors"] == 3
    assert set(t.g.errors_by_base) == {"gpu-0", "gpu-4", "gpu-5"}


def test_a_new_error_is_kept_when_conditions_fill_the_cap() -> None:
    t = G(TINY)
    for i in range(3):
        t.emit(HW, f"gpu-{i}", "XID_79")
    t.start(4812)
    t.emit(HW, "gpu-7", "XID_13", 4812)
    assert ("gpu-7", "XID_13") in t.errors()
    assert [e.code for e in t.g.errors_of(4812)] == ["XID_13"]
    assert len(t.errors()) == 3
    assert t.g.evicted["errors"] == 1


def test_resources_are_capped_and_a_new_one_is_kept() -> None:
    t = G(TINY)
    t.start(1)
    for i in range(4):
        t.emit(U, f"gpu-{i}", "10", 1)
    t.emit(U, "cpu", "50")
    assert "cpu" in t.g.resources
    assert len(t.g.resources) == 4
    assert "gpu-0" not in t.g.resources, "all consumed: the oldest goes"
    assert t.g.evicted["resources"] == 1


def test_unconsumed_resources_are_evicted_before_consumed_ones() -> None:
    t = G(TINY)
    t.start(1)
    t.emit(U, "gpu-0", "10", 1)
    t.emit(U, "gpu-1", "10")
    t.emit(U, "gpu-2", "10", 1)
    t.emit(U, "gpu-3", "10", 1)
    t.emit(U, "gpu-4", "10")
    assert set(t.g.resources) == {"gpu-0", "gpu-2", "gpu-3", "gpu-4"}


def test_intents_are_capped() -> None:
    t = G(TINY)
    for i in range(5):
        t.emit(INTENT, f"job-{i}", "JOB_START", None, f"job-{i}")
        assert_within(t.g)
    assert list(t.g.intents) == [("job-2", "JOB_START"), ("job-3", "JOB_START"), ("job-4", "JOB_START")]


def test_history_is_capped_per_gpu_and_in_gpus_least_recently_updated_first() -> None:
    t = G(GraphLimits(max_history_entities=2, max_history_codes=2))
    for i, code in enumerate(("XID_13", "XID_31", "XID_43")):
        t.advance(S)
        t.emit(HW, "gpu-0", code)
        t.emit(HW, f"gpu-{i + 1}", code)
    assert set(t.g.history["gpu-0"]) == {"XID_31", "XID_43"}
    assert list(t.g.history) == ["gpu-0", "gpu-3"]


def test_a_long_mixed_stream_never_exceeds_a_cap() -> None:
    t = G(TINY)
    for i in range(400):
        pid = 100 + i % 11
        t.emit(U, f"gpu-{i % 7}", "50", pid if i % 3 else None, f"job-{i % 4}")
        if i % 5 == 0:
            t.emit(HW, f"gpu-{i % 6}", ("XID_13", "XID_79", "XID_31")[i % 3], pid)
        if i % 7 == 0:
            t.state(pid, ("start", "exit", "killed", "d_state", "running")[i % 5], create_time=float(i))
        if i % 13 == 0:
            t.emit(INTENT, f"job-{i % 5}", "CHECKPOINT_BEGIN")
        t.advance(S * (i % 3))
        assert_within(t.g)
    assert all(n > 0 for n in t.g.evicted.values()), t.g.evicted


# ====================================================================== history
def test_history_counts_the_same_code_across_jobs_on_one_gpu() -> None:
    t = G()
    for n, job in enumerate(("job-a", "job-b", "job-c")):
        t.start(4801, job=job, ctime=float(n))
        t.emit(HW, "gpu-1", "XID_31", 4801)
        t.state(4801, "exit", job=job, exit_code=1)
        t.later(20 * MIN)
    assert t.errors() == set(), "the errors themselves expired"
    hist = t.g.history["gpu-1"]["XID_31"]
    assert (hist.count, hist.jobs) == (3, ["job-a", "job-b", "job-c"])
    assert hist.first_ts == T0
    assert hist.last_ts == T0 + 2 * 20 * MIN


def test_history_takes_the_job_from_the_event_then_the_pid_then_the_gpu_consumer() -> None:
    t = G()
    t.emit(HW, "gpu-1", "XID_13", None, "job-a")
    t.start(7, job="job-b")
    t.emit(HW, "gpu-1", "XID_13", 7)
    t.start(8, job="job-c")
    t.emit(U, "gpu-1", "90", 8)
    t.emit(HW, "gpu-1/nvlink-0", "XID_13")
    hist = t.g.history["gpu-1"]["XID_13"]
    assert (hist.count, hist.jobs) == (3, ["job-a", "job-b", "job-c"])


def test_history_keeps_gpus_only() -> None:
    t = G()
    t.emit(HW, "gpu-4", "XID_92")
    t.emit(HW, "nvme0n1", "NVME_MEDIA_ERRORS")
    t.emit(NET, "mlx5_0", "LINK_FLAP")
    t.emit(HW, "nvswitch-0", "SXID_12028")
    assert set(t.g.history) == {"gpu-4"}
    assert t.g.history["gpu-4"]["XID_92"].count == 1


def test_history_remembers_at_most_eight_jobs_per_code() -> None:
    t = G()
    for i in range(12):
        t.emit(HW, "gpu-0", "XID_13", None, f"job-{i}")
    assert t.g.history["gpu-0"]["XID_13"].jobs == [f"job-{i}" for i in range(4, 12)]


def test_a_probe_cannot_forge_snapshot_bookkeeping() -> None:
    t = G()
    line = '{"type": "error.hw", "entity": "gpu-0", "value": "XID_13", "attrs": {"_age": 999999999, "_hist": 7}}'
    t.g.apply(parse_line(line, now_ms=t.clock.now))
    assert t.errors() == {("gpu-0", "XID_13")}, "not expired at once by a forged age"
    assert t.g.history["gpu-0"]["XID_13"].count == 1, "not taken for a history restore"


# ====================================================================== counts
def test_counts_report_vertices_and_edges() -> None:
    t = G()
    t.start(1)
    t.emit(U, "gpu-0", "90", 1)
    t.emit(BW, "mlx5_0", "IO_WAIT", 1)
    t.emit(HW, "gpu-0", "XID_13", 1)
    t.start(2, ctime=1.0)
    t.state(2, "exit")
    assert t.g.counts() == {
        "processes": 1,
        "tombstones": 1,
        "resources": 2,
        "errors": 1,
        "consumes": 2,
        "waits_on": 1,
        "blocked_by": 2,
    }


# ====================================================================== snapshots
def rich_graph() -> G:
    """Processes, tombstones, every kind of wait, d_state, errors with counts and pids,
    conditions, history across jobs, intents and an operator action."""
    t = G()
    t.emit(INTENT, "job-42", "JOB_START", None, "job-42", world_size=4)
    t.emit(ACTION, "gpu-7", "CLEAR", by="alice")
    for gpu in range(4):
        t.emit(U, f"gpu-{gpu}", "95")
        t.emit(M, f"gpu-{gpu}", "78", used_mib=64000, total_mib=81559)
    t.emit(IOPS, "nvme0n1", "85", await_ms=850.0)
    t.emit(QD, "nvme0n1", "32")
    for rank in range(4):
        pid = 4800 + rank
        t.start(pid, ctime=1000.0 + rank, rank=rank, local_rank=rank, world_size=4, cmdline=f"train --rank {rank}")
        t.emit(U, f"gpu-{rank}", "97", pid, "job-42")
        t.emit(M, f"gpu-{rank}", "78", pid, "job-42", used_mib=64000)
        t.emit(BW, f"mlx5_{rank}", "190.5", pid, "job-42")
    t.advance(10 * S)
    # XID 31 on gpu-1 in an earlier job (history across jobs) and a dead rank of that job
    t.start(5000, job="job-old", ctime=500.0, rank=0)
    t.emit(HW, "gpu-1", "XID_31", 5000, "job-old", raw="NVRM: Xid 31 pid=5000")
    t.state(5000, "exit", job="job-old", exit_code=1)
    t.advance(10 * S)
    # pid reuse: 5000 comes back for another job
    t.start(5000, job="job-new", ctime=600.0)
    t.emit(HW, "gpu-1", "XID_31", 5000, "job-new")
    # a process restarted without create_time (tombstone and live share (pid, None))
    t.emit(ST, "loader", "start", 6000, None, name="loader")
    t.emit(ST, "loader", "start", 6000, None, name="loader")
    t.emit(ST, "loader", "running", 6000, None)
    t.emit(M, "sysmem", "40", 6000, None, used_mib=100_000)
    # waits of each kind
    t.emit(BW, "mlx5_1", "IO_WAIT", 4801, "job-42")
    t.state(4802, "d_state", create_time=1002.0, device="nvme0n1")
    t.emit(IOPS, "nvme0n1", "85", 4802, "job-42", await_ms=850.0)
    t.emit(NET, "job-42", "NCCL_TIMEOUT", 4803, "job-42", raw="NCCL WARN Timeout")
    t.emit(NET, "job-42", "NCCL_TIMEOUT", 4800, "job-42")
    t.state(4803, "hung", create_time=1003.0)
    # errors with counts, pids and conditions
    t.emit(HW, "gpu-3", "XID_79", None, None, raw="NVRM: Xid (PCI:0000:8a:00): 79")
    t.emit(HW, "gpu-0", "XID_92")
    t.emit(HW, "gpu-0", "XID_92")
    t.emit(TOPO, "gpu-2/nvlink-1", "NVLINK_DOWN")
    t.emit(TOPO, "gpu-2/pcie", "PCIE_DEGRADED", width=4, max_width=16)
    t.emit(HW, "gpu-0", "CLOCK_EVENT_HW_THERMAL", temp_c=92)
    t.emit(NET, "mlx5_2", "LINK_FLAP")
    # a killed process (tombstone whose edges stay) and an oom victim
    t.start(7000, ctime=7.0)
    t.emit(U, "gpu-0", "3", 7000)
    t.emit(BW, "mlx5_0", "IO_WAIT", 7000)
    t.emit(NET, "job-42", "NCCL_TIMEOUT", 7000, "job-42")
    t.state(7000, "killed")
    t.start(7001, ctime=8.0)
    t.state(7001, "oom_killed", exit_code=137)
    t.emit(ACTION, "node0:7000", "ZAP", by="bob", result="ok")
    t.advance(5 * S)
    return t


def test_snapshot_rebuilds_the_same_graph() -> None:
    t = rich_graph()
    digest = t.g.digest()
    assert len(digest["processes"]) == 6 and len(digest["tombstones"]) == 4
    kinds = {w.reason for p in t.g.processes.values() for w in p.waits.values()}
    assert kinds == {"stalled", "d_state", "NCCL_TIMEOUT"}
    again = rebuilt(t)
    assert again.digest() == digest
    assert again.counts() == t.g.counts()


def test_a_snapshot_of_a_rebuild_is_the_same_snapshot() -> None:
    t = rich_graph()
    again = rebuilt(t)
    third = NodeGraph("node0", t.clock, t.g.limits)
    third.apply_all(again.snapshot_events())
    assert third.digest() == t.g.digest()


def test_the_rebuild_keeps_what_why_shows() -> None:
    t = rich_graph()
    again = rebuilt(t)
    xid = again.conditions[("gpu-3", "XID_79")]
    assert xid.first.attrs["raw"] == "NVRM: Xid (PCI:0000:8a:00): 79"
    assert again.history["gpu-1"]["XID_31"].jobs == ["job-old", "job-new"]
    nccl = again.processes[4803].waits["job:job-42"]
    assert (nccl.first.type, nccl.first.value, nccl.first.attrs.get("raw")) == (
        NET,
        "NCCL_TIMEOUT",
        "NCCL WARN Timeout",
    )
    assert "_wait" not in nccl.first.attrs
    assert again.processes[4802].waits["nvme0n1"].reason == "d_state"
    assert again.tombstones[(7000, 7.0)].waits.keys() == {"mlx5_0", "job:job-42"}
    assert again.find(5000) is again.processes[5000]
    assert again.tombstones[(5000, 500.0)].job == "job-old"


def test_the_rebuild_keeps_expiry_timing() -> None:
    t = G()
    t.emit(HW, "gpu-0", "XID_13")
    t.start(4812, ctime=1.0)
    t.state(4812, "exit", exit_code=1)
    t.later(200 * S)
    again = rebuilt(t)
    t.clock.advance(99 * S)
    again.expire()
    assert {e.key for e in again.active_errors()} == {("gpu-0", "XID_13")}
    t.clock.advance(2 * S)
    again.expire()
    assert list(again.active_errors()) == [], "expired 101 s after the rebuild, not 300 s"
    assert again.find(4812) is not None
    t.clock.advance(298 * S)
    again.expire()
    assert again.find(4812) is not None
    t.clock.advance(2 * S)
    again.expire()
    assert again.find(4812) is None, "the tombstone kept its 10 minutes from the exit"


def test_the_rebuild_keeps_expiry_timing_of_errors_naming_pids() -> None:
    t = G()
    t.start(4812)
    t.emit(HW, "gpu-0", "XID_13", 4812)
    t.later(200 * S)
    again = rebuilt(t)
    t.clock.advance(101 * S)
    again.expire()
    assert list(again.active_errors()) == []


def test_the_snapshot_leaves_out_what_has_expired() -> None:
    t = G()
    t.emit(HW, "gpu-0", "XID_13")
    t.advance(301 * S)  # no apply, no expire since
    again = rebuilt(t)
    assert list(again.active_errors()) == []
    assert list(t.g.active_errors()) == []
    assert again.digest() == t.g.digest()


def test_a_replayed_clear_does_not_clear_a_later_error() -> None:
    t = G()
    t.emit(ACTION, "gpu-1", "CLEAR", by="alice")
    t.advance(S)
    t.emit(HW, "gpu-1", "XID_79")
    again = rebuilt(t)
    assert {e.key for e in again.active_errors()} == {("gpu-1", "XID_79")}


def test_a_rebuild_does_not_double_the_history() -> None:
    t = G()
    t.emit(HW, "gpu-1", "XID_31", None, "job-a")
    t.emit(HW, "gpu-1", "XID_31", None, "job-b")
    again = rebuilt(t)
    assert again.history["gpu-1"]["XID_31"].count == 2
    assert again.conditions == {} and again.errors[("gpu-1", "XID_31")].count == 2


def test_a_rebuilt_graph_behaves_like_the_original_afterwards() -> None:
    t = rich_graph()
    again = rebuilt(t)
    for g in (t.g, again):
        g.apply(Event(t.clock.now, BW, "mlx5_1", "190.5", 4801, "job-42"))
        g.apply(Event(t.clock.now, ST, "python3", "running", 4802, "job-42", {"create_time": 1002.0}))
        g.apply(Event(t.clock.now, HW, "gpu-3", "OK"))
        g.apply(Event(t.clock.now, ST, "python3", "exit", 4803, "job-42", {"create_time": 1003.0}))
    t.clock.advance(11 * MIN)
    t.g.expire()
    again.expire()
    assert again.digest() == t.g.digest()


# ====================================================================== XID from two channels
def test_the_same_xid_from_nvml_and_the_kernel_log_counts_once_and_keeps_the_pid() -> None:
    t = G()
    t.start(449, ctime=1_732_349_000.0)
    nvml = Event(T0, HW, "gpu-0", "XID_31", None, None, {"source": "nvml", "xid": 31})
    raw = "NVRM: Xid (PCI:0000:00:06): 31, pid=449, name=python3, channel 0x0000000a"
    kmsg = Event(T0 + 800, HW, "gpu-0", "XID_31", 449, None, {"xid": 31, "raw": raw})
    t.g.apply(nvml)
    t.g.apply(kmsg)
    [err] = [e for e in t.g.active_errors() if e.code == "XID_31"]
    assert err.count == 1
    assert err.first.pid == 449
    assert err.first.ts == T0
    assert err.first.attrs["raw"] == raw
    assert [e.code for e in t.g.errors_of(449)] == ["XID_31"]
    assert t.g.history["gpu-0"]["XID_31"].count == 1


def test_the_same_xid_twice_from_one_channel_counts_twice() -> None:
    t = G()
    for ts in (T0, T0 + 1_000):
        t.g.apply(Event(ts, HW, "gpu-0", "XID_31", None, None, {"source": "nvml"}))
    [err] = [e for e in t.g.active_errors() if e.code == "XID_31"]
    assert err.count == 2
