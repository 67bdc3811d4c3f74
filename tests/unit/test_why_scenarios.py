"""The twelve failure scenarios of the foundation issue, each as an event list.

Each asserts the root cause (node + entity + code) and that none of the listed symptoms is
blamed — neither as root cause nor silently dropped where the test says it is a symptom.
"""

from __future__ import annotations

from _scenario import Scenario

from xctl.core.catalog import Kind
from xctl.core.events import EventType
from xctl.core.targets import Target
from xctl.core.why import Explanation, explain


def why(s: Scenario, node: str, pid: int) -> Explanation:
    return explain(s.cluster, Target(node=node, pid=pid))


def assert_root(exp: Explanation, node: str, entity: str, code: str) -> None:
    assert exp.root is not None, exp.to_text()
    assert (exp.root.node, exp.root.entity, exp.root.code) == (node, entity, code), exp.to_text()


def symptom_codes(exp: Explanation) -> set[str]:
    return {s.code for s in exp.symptoms}


def test_xid79_in_four_node_job_asked_from_victim_on_another_node() -> None:
    s = Scenario()
    s.start_job()
    s.advance(10_000)
    s.emit(
        "node2",
        EventType.ERROR_HW,
        "gpu-3",
        "XID_79",
        None,
        None,
        xid=79,
        raw="NVRM: Xid (PCI:0000:8a:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
    )
    s.emit("node2", EventType.PROCESS_STATE, "python3", "hung", s.pid(3), s.job)
    s.advance(30_000)
    s.victims(skip=("node2", s.pid(3)))
    s.heartbeat_all()
    exp = why(s, "node0", s.pid(5))
    assert_root(exp, "node2", "gpu-3", "XID_79")
    assert exp.root is not None and exp.root.kind is Kind.HARDWARE
    assert exp.verdict == "waiting"
    assert "NCCL_TIMEOUT" in symptom_codes(exp)
    edges = [step.edge for step in exp.chain]
    assert edges[:2] == ["WaitsOn", "Member"] and edges[-1] == "BlockedBy"
    assert exp.chain[1].dst.startswith("node2:4803")
    assert exp.to_json()["root_cause"]["node"] == "node2"


def test_double_bit_ecc_then_row_remap_blames_the_ecc_error() -> None:
    s = Scenario(nodes=1)
    s.start_job()
    s.advance(5_000)
    s.emit("node0", EventType.ERROR_HW, "gpu-2", "XID_48", s.pid(2), s.job, xid=48)
    s.advance(1_000)
    s.emit("node0", EventType.ERROR_HW, "gpu-2", "XID_63", s.pid(2), s.job, xid=63)
    exp = why(s, "node0", s.pid(2))
    assert_root(exp, "node0", "gpu-2", "XID_48")
    assert exp.verdict == "blocked"
    assert "XID_63" in symptom_codes(exp)


def test_application_fault_xid13_on_one_rank_blames_the_application() -> None:
    s = Scenario(nodes=2)
    s.start_job()
    s.advance(5_000)
    s.emit("node1", EventType.ERROR_HW, "gpu-6", "XID_13", s.pid(6), s.job, xid=13)
    s.emit("node1", EventType.PROCESS_STATE, "python3", "exit", s.pid(6), s.job, exit_code=1)
    s.advance(20_000)
    s.victims(skip=("node1", s.pid(6)))
    s.heartbeat_all()
    exp = why(s, "node0", s.pid(0))
    assert_root(exp, "node1", "gpu-6", "XID_13")
    assert exp.root is not None and exp.root.kind is Kind.APPLICATION
    own = why(s, "node1", s.pid(6))
    assert_root(own, "node1", "gpu-6", "XID_13")
    assert own.verdict == "exited"
    assert all(a.code != "NCCL_TIMEOUT" for a in exp.alternatives)


def test_xid31_repeated_on_one_gpu_across_jobs_is_hardware() -> None:
    s = Scenario(nodes=1, ranks_per_node=4)
    for n, job in enumerate(("job-a", "job-b", "job-c")):
        s.start_job(job=job)
        s.advance(1_000)
        s.emit("node0", EventType.ERROR_HW, "gpu-1", "XID_31", s.pid(1), job, xid=31)
        s.emit("node0", EventType.PROCESS_STATE, "python3", "exit", s.pid(1), job, exit_code=1)
        s.advance(60_000 if n < 2 else 1_000)
    exp = why(s, "node0", s.pid(1))
    assert_root(exp, "node0", "gpu-1", "XID_31")
    assert exp.root is not None and exp.root.kind is Kind.HARDWARE
    assert "3 jobs" in exp.root.summary


def test_single_xid31_is_the_application() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    s.emit("node0", EventType.ERROR_HW, "gpu-1", "XID_31", s.pid(1), s.job, xid=31)
    exp = why(s, "node0", s.pid(1))
    assert exp.root is not None and exp.root.kind is Kind.APPLICATION


def test_nvlink_down_with_xid74_on_the_peer_gpu() -> None:
    s = Scenario(nodes=1)
    s.start_job()
    s.advance(2_000)
    s.emit("node0", EventType.TOPO_LINK_DOWN, "gpu-1/nvlink-0", "NVLINK_DOWN")
    s.advance(1_000)
    s.emit("node0", EventType.ERROR_HW, "gpu-2", "XID_74", None, None, xid=74)
    s.advance(10_000)
    s.victims(skip=("node0", s.pid(1)))
    exp = why(s, "node0", s.pid(2))
    assert_root(exp, "node0", "gpu-1/nvlink-0", "NVLINK_DOWN")
    assert "XID_74" in symptom_codes(exp)


def test_thermally_throttled_straggler_whose_peers_idle() -> None:
    s = Scenario(nodes=2)
    s.start_job()
    s.advance(5_000)
    s.emit("node1", EventType.ERROR_HW, "gpu-5", "CLOCK_EVENT_HW_THERMAL", None, None, temp_c=92)
    s.emit("node1", EventType.COMPUTE_UTIL, "gpu-5", "100", s.pid(5), s.job)
    for n in range(2):
        for i in range(8):
            if (n, i) != (1, 5):
                s.emit(s.node(n), EventType.COMPUTE_UTIL, f"gpu-{i}", "8", s.pid(i), s.job)
    s.heartbeat_all()
    exp = why(s, "node0", s.pid(3))
    assert_root(exp, "node1", "gpu-5", "CLOCK_EVENT_HW_THERMAL")
    assert exp.root is not None and exp.root.kind is Kind.THERMAL
    assert exp.verdict == "waiting"
    straggler = why(s, "node1", s.pid(5))
    assert straggler.verdict == "degraded"


def test_a_later_hardware_slowdown_outranks_the_power_cap_a_busy_gpu_sat_at() -> None:
    """A busy H100 sits at its power cap all day: that routine state began first, but the
    hardware slowdown that came later is what made the rank slow."""
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    s.emit("node0", EventType.ERROR_HW, "gpu-1", "CLOCK_EVENT_SW_POWER_CAP", power_w=700)
    s.advance(60_000)
    s.emit("node0", EventType.ERROR_HW, "gpu-1", "CLOCK_EVENT_HW_SLOWDOWN")
    s.emit("node0", EventType.COMPUTE_UTIL, "gpu-1", "100", s.pid(1), s.job)
    s.emit("node0", EventType.COMPUTE_UTIL, "gpu-0", "9", s.pid(0), s.job)
    assert_root(why(s, "node0", s.pid(1)), "node0", "gpu-1", "CLOCK_EVENT_HW_SLOWDOWN")
    assert_root(why(s, "node0", s.pid(0)), "node0", "gpu-1", "CLOCK_EVENT_HW_SLOWDOWN")


def test_the_power_cap_is_blamed_when_it_is_all_there_is() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    s.emit("node0", EventType.ERROR_HW, "gpu-1", "CLOCK_EVENT_SW_POWER_CAP", power_w=300)
    s.emit("node0", EventType.COMPUTE_UTIL, "gpu-1", "100", s.pid(1), s.job)
    s.emit("node0", EventType.COMPUTE_UTIL, "gpu-0", "9", s.pid(0), s.job)
    exp = why(s, "node0", s.pid(0))
    assert_root(exp, "node0", "gpu-1", "CLOCK_EVENT_SW_POWER_CAP")
    assert exp.verdict == "waiting"


def test_pcie_link_degraded_to_x4() -> None:
    s = Scenario(nodes=1, ranks_per_node=4)
    s.start_job()
    s.emit("node0", EventType.TOPO_LINK_DOWN, "gpu-2/pcie", "PCIE_DEGRADED", width=4, max_width=16, gen=5, max_gen=5)
    for i in (0, 1, 3):  # the others idle at the collective, waiting for the slow rank
        s.emit("node0", EventType.COMPUTE_UTIL, f"gpu-{i}", "12", s.pid(i), s.job)
    exp = why(s, "node0", s.pid(2))
    assert_root(exp, "node0", "gpu-2/pcie", "PCIE_DEGRADED")
    assert exp.verdict == "degraded"
    peer = why(s, "node0", s.pid(0))
    assert_root(peer, "node0", "gpu-2/pcie", "PCIE_DEGRADED")
    assert peer.verdict == "waiting"


def test_rdma_link_flap() -> None:
    s = Scenario(nodes=2)
    s.start_job()
    s.advance(3_000)
    s.emit("node1", EventType.ERROR_NET, "mlx5_4", "LINK_FLAP", None, None, count=2)
    s.emit("node1", EventType.TRANSPORT_BW, "mlx5_4", "IO_WAIT", s.pid(4), s.job)
    s.advance(8_000)
    s.victims(skip=("node1", s.pid(4)))
    s.heartbeat_all()
    own = why(s, "node1", s.pid(4))
    assert_root(own, "node1", "mlx5_4", "LINK_FLAP")
    assert own.verdict == "waiting"
    peer = why(s, "node0", s.pid(1))
    assert_root(peer, "node1", "mlx5_4", "LINK_FLAP")
    assert {"NCCL_TIMEOUT", "STALLED"} <= symptom_codes(peer)


def test_slow_nvme_during_checkpoint() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    s.emit("node0", EventType.INTENT_RUN, s.job, "CHECKPOINT_BEGIN", None, s.job)
    s.advance(1_000)
    s.emit("node0", EventType.STORAGE_IOPS, "nvme0n1", "85", None, None, await_ms=850.0, util=100.0)
    s.emit("node0", EventType.STORAGE_IOPS, "nvme0n1", "85", s.pid(0), s.job, await_ms=850.0)
    for _ in range(3):
        s.advance(1_000)
        s.emit("node0", EventType.PROCESS_STATE, "python3", "d_state", s.pid(0), s.job, wchan="io_schedule")
    exp = why(s, "node0", s.pid(0))
    assert_root(exp, "node0", "nvme0n1", "STORAGE_SLOW")
    assert exp.verdict == "waiting"
    assert exp.chain[0].edge == "WaitsOn"


def test_host_oom_kill_of_the_wrong_victim() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    s.emit(
        "node0",
        EventType.PROCESS_STATE,
        "data_loader",
        "start",
        4900,
        None,
        name="data_loader",
        create_time=1_732_349_000.0,
        ppid=1,
    )
    s.emit("node0", EventType.COMPUTE_MEM, "sysmem", "71", 4900, None, used_mib=180_000, total_mib=256_000)
    s.emit("node0", EventType.COMPUTE_MEM, "sysmem", "4", s.pid(1), s.job, used_mib=10_000, total_mib=256_000)
    s.advance(2_000)
    s.emit(
        "node0",
        EventType.PROCESS_STATE,
        "python3",
        "oom_killed",
        s.pid(1),
        s.job,
        exit_code=137,
        raw="Out of memory: Killed process 4801 (python3)",
    )
    exp = why(s, "node0", s.pid(1))
    assert_root(exp, "node0", "sysmem", "HOST_OOM")
    assert exp.root is not None and exp.root.pid == 4900
    assert exp.verdict == "exited"
    assert "OOM_KILLED" in symptom_codes(exp)


def test_zombie_holding_gpu_memory() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    s.advance(1_000)
    s.emit("node0", EventType.PROCESS_STATE, "python3", "zombie", s.pid(0), s.job)
    exp = why(s, "node0", s.pid(0))
    assert_root(exp, "node0", "gpu-0", "ZOMBIE_GPU_MEMORY")
    assert "4700" in exp.root.summary if exp.root else False
    assert exp.verdict == "exited"


def test_node_that_went_silent_mid_job() -> None:
    s = Scenario(nodes=4)
    s.start_job()
    s.advance(2_000)
    s.heartbeat_all(except_nodes=("node3",))
    s.advance(31_000)
    for n in range(3):
        for i in range(8):
            s.emit(s.node(n), EventType.ERROR_NET, s.job, "NCCL_TIMEOUT", s.pid(i), s.job)
    s.heartbeat_all(except_nodes=("node3",))
    exp = why(s, "node1", s.pid(2))
    assert_root(exp, "node3", "node", "NODE_DOWN")
    assert exp.root is not None and "node3 silent since" in exp.root.summary
    assert "NCCL_TIMEOUT" in symptom_codes(exp)


def test_job_target_explains_the_whole_job() -> None:
    s = Scenario(nodes=2)
    s.start_job()
    s.emit("node1", EventType.ERROR_HW, "gpu-0", "XID_79", None, None)
    s.advance(5_000)
    s.victims(skip=("node1", s.pid(0)))
    s.heartbeat_all()
    exp = explain(s.cluster, Target(job=s.job))
    assert_root(exp, "node1", "gpu-0", "XID_79")
    assert exp.target.job == s.job and exp.target.pid is None


def test_healthy_process_is_running_with_no_root_cause() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    exp = why(s, "node0", s.pid(0))
    assert exp.root is None
    assert exp.verdict == "running"
