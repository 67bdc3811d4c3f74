"""sim: spec parsing, the clock-driven SimNode model, every fault kind, and the probe loop."""

from __future__ import annotations

import threading
import time

import pytest
from waiting import wait_for

from xctl.core.clock import ManualClock
from xctl.core.cluster import ClusterGraph, LivenessConfig
from xctl.core.errors import ProbeError
from xctl.core.events import Event, EventType
from xctl.core.graph import GraphLimits
from xctl.core.targets import Target
from xctl.core.why import explain
from xctl.probes.base import ProbeContext
from xctl.probes.registry import make_probe
from xctl.probes.sim import GPU_TOTAL_MIB, Fault, SimConfig, SimNode, SimProbe, parse_sim_spec

T0 = 1_732_350_000_000
JOB = "job-42"


def timeline(sim: SimNode, until_s: float, step_ms: int = 500) -> list[Event]:
    """Sample every ``step_ms`` from the start up to and including ``until_s``."""
    out: list[Event] = []
    for t in range(0, round(until_s * 1000) + 1, step_ms):
        out.extend(sim.sample(T0 + t))
    return out


def node(spec: str, name: str = "node-1") -> SimNode:
    return SimNode(parse_sim_spec(spec), name, T0)


def of(events: list[Event], etype: EventType, value: str | None = None, entity: str | None = None) -> list[Event]:
    return [
        e
        for e in events
        if e.type == etype and (value is None or e.value == value) and (entity is None or e.entity == entity)
    ]


def rel(e: Event) -> int:
    return e.ts - T0


# -- spec ---------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = parse_sim_spec(None)
    assert cfg == SimConfig()
    assert (cfg.gpus, cfg.job, cfg.ranks, cfg.nodes, cfg.index, cfg.interval_s, cfg.seed) == (
        8,
        JOB,
        32,
        4,
        0,
        1.0,
        0,
    )
    assert parse_sim_spec("") == cfg
    assert cfg.ranks_per_node == 8
    assert list(cfg.local_ranks) == list(range(8))


def test_full_spec() -> None:
    cfg = parse_sim_spec(
        "gpus=4, job=train-7,ranks=16,nodes=4,index=2,interval=500ms,seed=9,"
        "fault=xid79@gpu-3:node=node-2:after=10s,fault=hang@rank-9:after=2m,FAULT=thermal@gpu-0"
    )
    assert (cfg.gpus, cfg.job, cfg.ranks, cfg.nodes, cfg.index, cfg.interval_s, cfg.seed) == (
        4,
        "train-7",
        16,
        4,
        2,
        0.5,
        9,
    )
    assert cfg.faults == (
        Fault("xid79", "gpu-3", 3, "node-2", 10.0),
        Fault("hang", "rank-9", 9, None, 120.0),
        Fault("thermal", "gpu-0", 0, None, 0.0),
    )
    assert list(cfg.local_ranks) == [8, 9, 10, 11]


def test_fault_options_in_any_order() -> None:
    (fault,) = parse_sim_spec("fault=oom@rank-3:after=1.5s:node=gpu-node-7").faults
    assert fault == Fault("oom", "rank-3", 3, "gpu-node-7", 1.5)


def test_ranks_per_node_is_capped_by_gpus() -> None:
    cfg = parse_sim_spec("ranks=64,nodes=4,gpus=8,index=3")
    assert cfg.ranks_per_node == 8
    assert list(cfg.local_ranks) == list(range(24, 32))


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("gpu=8", ["unknown key 'gpu'", "gpus"]),
        ("gpus", ["not key=value"]),
        ("gpus=eight", ["gpus", "'eight'", "gpus=8"]),
        ("gpus=0", ["gpus", "too small"]),
        ("gpus=65", ["gpus", "too large"]),
        ("gpus=2,gpus=4", ["gpus given twice"]),
        ("index=4", ["index", "too large"]),
        ("ranks=2,nodes=4", ["ranks=2", "nodes=4"]),
        ("interval=fast", ["interval", "'fast'", "10s"]),
        ("interval=1ms", ["interval", "10ms to 1h"]),
        ("job=has space", ["job", "job=job-42"]),
        ("seed=-1", ["seed", "too small"]),
        ("fault=xid79", ["KIND@ENTITY"]),
        ("fault=xid99@gpu-1", ["unknown kind 'xid99'", "xid79"]),
        ("fault=xid79@mlx5_1", ["gpu entity like gpu-3", "'mlx5_1'"]),
        ("fault=link_flap@gpu-1", ["nic entity like mlx5_3"]),
        ("fault=hang@gpu-1", ["rank entity like rank-9"]),
        ("fault=xid79@gpu-8", ["gpu-8 does not exist", "gpu-0 to gpu-7"]),
        ("fault=link_flap@mlx5_9", ["mlx5_9 does not exist", "mlx5_7"]),
        ("fault=hang@rank-32", ["rank-32 does not exist", "0 to 31"]),
        ("fault=xid79@gpu-1:after=soon", ["after", "'soon'", "500ms"]),
        ("fault=xid79@gpu-1:when=3s", ["unknown option 'when=3s'", ":after=DURATION"]),
        ("fault=xid79@gpu-1:node=", ["unknown option 'node='"]),
        ("gpus=1,fault=nvlink_down@gpu-0", ["nvlink_down needs a peer GPU", "gpus=2"]),
    ],
)
def test_bad_specs_name_the_problem(spec: str, words: list[str]) -> None:
    with pytest.raises(ProbeError) as info:
        parse_sim_spec(spec)
    message = str(info.value)
    assert message.startswith("sim")
    for word in words:
        assert word in message


def test_registry_builds_sim() -> None:
    probe = make_probe("sim:gpus=2,ranks=4,nodes=2,index=1")
    assert isinstance(probe, SimProbe)
    assert probe.name == "sim"
    assert probe.heartbeat_s is not None
    assert isinstance(make_probe("sim"), SimProbe)


def test_describe() -> None:
    text = parse_sim_spec("index=1,fault=xid79@gpu-3:node=node-2:after=10s").describe()
    assert "8 GPUs" in text
    assert "ranks 8\u201315 of job-42 (32)" in text
    assert "xid79@gpu-3 on node-2 after 10s" in text
    assert "faults: none" in parse_sim_spec(None).describe()


# -- healthy node -------------------------------------------------------------------------


def test_ranks_and_pids_per_index() -> None:
    sim = node("index=1")
    events = sim.sample(T0)
    starts = of(events, EventType.PROCESS_STATE, "start")
    assert [e.attrs["rank"] for e in starts] == list(range(8, 16))
    assert [e.pid for e in starts] == list(range(4800, 4808))
    first = starts[0]
    assert first.entity == "python3"
    assert first.job == JOB
    assert first.ts == T0
    assert dict(first.attrs) == {
        "name": "python3",
        "cmdline": "python3 train.py --rank 8",
        "create_time": T0 / 1000,
        "ppid": 4700,
        "rank": 8,
        "local_rank": 0,
        "world_size": 32,
        "gpu": "gpu-0",
    }
    # process.state is emitted at start and on changes only.
    assert not of(sim.sample(T0 + 1000), EventType.PROCESS_STATE)


def test_pids_collide_across_nodes_like_real_nodes() -> None:
    a = of(node("index=0").sample(T0), EventType.PROCESS_STATE)
    b = of(node("index=1", "node-2").sample(T0), EventType.PROCESS_STATE)
    assert [e.pid for e in a] == [e.pid for e in b]
    assert [e.attrs["rank"] for e in a] != [e.attrs["rank"] for e in b]


def test_healthy_metrics() -> None:
    sim = node("gpus=8,ranks=8,nodes=2")  # 4 ranks on 8 GPUs: gpu-4..7 idle
    events = timeline(sim, 10)
    util = of(events, EventType.COMPUTE_UTIL)
    dev_util = [e for e in util if e.pid is None]
    proc_util = [e for e in util if e.pid is not None]
    assert {e.entity for e in dev_util} == {f"gpu-{i}" for i in range(8)}
    assert all(92 <= int(e.value) <= 100 for e in proc_util)
    assert len({e.value for e in proc_util}) > 3  # a noisy series, not a constant
    assert all(e.job == JOB for e in proc_util)
    assert all(e.value == "0" for e in dev_util if e.entity in ("gpu-4", "gpu-7"))
    assert {e.entity for e in proc_util} == {"gpu-0", "gpu-1", "gpu-2", "gpu-3"}

    mem = of(events, EventType.COMPUTE_MEM)
    dev_mem = [e for e in mem if e.pid is None]
    assert all(e.attrs["total_mib"] == GPU_TOTAL_MIB for e in mem)
    assert all(str(e.attrs["uuid"]).startswith("GPU-") for e in dev_mem)
    assert {e.attrs["pci_bus_id"] for e in dev_mem if e.entity == "gpu-0"} == {"00000000:18:00.0"}
    proc_mem = [e for e in mem if e.pid is not None]
    assert all(60_000 <= int(e.attrs["used_mib"]) <= 70_000 for e in proc_mem)
    pct = float(proc_mem[0].value)
    assert pct == pytest.approx(100 * int(proc_mem[0].attrs["used_mib"]) / GPU_TOTAL_MIB, abs=0.06)

    bw = of(events, EventType.TRANSPORT_BW)
    assert {e.entity for e in bw} == {"mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"}
    assert all(180 <= float(e.value) <= 195 and len(e.value.split(".")[1]) == 2 for e in bw)
    assert {e.pid for e in bw} == {4800, 4801, 4802, 4803}
    assert not of(events, EventType.ERROR_HW) + of(events, EventType.ERROR_NET) + of(events, EventType.TOPO_LINK_DOWN)


def test_same_seed_same_story_other_seed_other_numbers() -> None:
    spec = "gpus=4,ranks=8,nodes=2,fault=thermal@gpu-1:after=3s"
    a = timeline(node(spec + ",seed=5"), 8)
    b = timeline(node(spec + ",seed=5"), 8)
    c = timeline(node(spec + ",seed=6"), 8)
    assert a == b
    assert [e.value for e in a] != [e.value for e in c]


def test_gpu_uuids_are_deterministic_per_node() -> None:
    def uuids(name: str) -> list[object]:
        return [e.attrs["uuid"] for e in node("gpus=2,ranks=2,nodes=1", name).sample(T0) if "uuid" in e.attrs]

    assert uuids("node-1") == uuids("node-1")
    assert uuids("node-1") != uuids("node-2")


# -- faults on this node ------------------------------------------------------------------


def test_xid79_on_this_node() -> None:
    sim = node("gpus=4,ranks=8,nodes=2,fault=xid79@gpu-3:after=10s")
    before = timeline(sim, 9.5)
    assert not of(before, EventType.ERROR_HW)
    assert not of(sim.sample(T0 + 9999), EventType.ERROR_HW)
    after = sim.sample(T0 + 10_000)
    (xid,) = of(after, EventType.ERROR_HW)
    assert (xid.entity, xid.value, xid.pid, rel(xid)) == ("gpu-3", "XID_79", 4803, 10_000)
    assert xid.attrs["xid"] == 79
    assert xid.attrs["pci_bus_id"] == "00000000:5d:00.0"
    assert xid.attrs["raw"] == (
        "NVRM: Xid (PCI:0000:5d:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."
    )
    (hung,) = of(after, EventType.PROCESS_STATE)
    assert (hung.value, hung.pid, hung.attrs["rank"]) == ("hung", 4803, 3)
    # gpu-3 is gone: no metrics for it or its rank from now on.
    later = timeline(sim, 20)
    assert not [e for e in later if e.ts >= T0 + 10_000 and e.entity == "gpu-3"]
    assert not [e for e in later if e.ts >= T0 + 10_000 and e.pid == 4803]
    # The other local ranks are victims: idle after +2 s, NCCL timeout once at +5 s.
    assert_victims(later, pids=[4800, 4801, 4802], fault_ms=10_000)


def assert_victims(events: list[Event], pids: list[int], fault_ms: int, ranks: list[int] | None = None) -> None:
    for pid in pids:
        mine = [e for e in events if e.pid == pid]
        util = [e for e in mine if e.type == EventType.COMPUTE_UTIL]
        assert all(int(e.value) > 50 for e in util if rel(e) < fault_ms + 2000), pid
        assert all(e.value == "0" for e in util if rel(e) >= fault_ms + 2000), pid
        bw = [e for e in mine if e.type == EventType.TRANSPORT_BW]
        assert all(e.value != "0" for e in bw if rel(e) < fault_ms + 2000), pid
        assert [e.value for e in bw if rel(e) >= fault_ms + 2000] and all(
            e.value == "0" for e in bw if rel(e) >= fault_ms + 2000
        ), pid
        gpu = f"gpu-{pid - 4800}"
        dev = [e for e in events if e.entity == gpu and e.pid is None and e.type == EventType.COMPUTE_UTIL]
        assert all(e.value == "0" for e in dev if rel(e) >= fault_ms + 2000), pid
        (nccl,) = [e for e in mine if e.type == EventType.ERROR_NET]
        assert (nccl.entity, nccl.value, nccl.job, rel(nccl)) == (JOB, "NCCL_TIMEOUT", JOB, fault_ms + 5000)
        assert "NCCL WARN Timeout" in str(nccl.attrs["raw"])
        if ranks is not None:
            assert nccl.attrs["rank"] == ranks[pids.index(pid)]


def test_xid48_then_row_remap_and_exit() -> None:
    sim = node("gpus=4,ranks=8,nodes=2,fault=xid48@gpu-1:after=3s")
    events = timeline(sim, 12)
    errors = of(events, EventType.ERROR_HW)
    assert [(e.value, e.entity, e.pid, rel(e)) for e in errors] == [
        ("XID_48", "gpu-1", 4801, 3000),
        ("XID_63", "gpu-1", 4801, 4000),
    ]
    assert "48, pid=4801, name=python3, An uncorrectable double bit error (DBE)" in str(errors[0].attrs["raw"])
    assert "63, pid=4801, name=python3, Row Remapper: New row marked for remapping" in str(errors[1].attrs["raw"])
    (exited,) = of(events, EventType.PROCESS_STATE, "exit")
    assert (exited.pid, exited.attrs["exit_code"], rel(exited)) == (4801, 1, 3000)
    # The dead rank has no more per-process samples; its GPU reports idle.
    assert not [
        e
        for e in events
        if e.pid == 4801 and rel(e) >= 3000 and e.type not in (EventType.ERROR_HW, EventType.PROCESS_STATE)
    ]
    dev = [e for e in of(events, EventType.COMPUTE_UTIL, entity="gpu-1") if rel(e) >= 3000]
    assert dev
    assert all(e.value == "0" for e in dev)
    assert_victims(events, pids=[4800, 4802, 4803], fault_ms=3000, ranks=[0, 2, 3])


@pytest.mark.parametrize(("kind", "needle"), [("xid13", "Graphics SM Warp Exception"), ("xid31", "MMU Fault")])
def test_application_xids_exit_the_rank(kind: str, needle: str) -> None:
    sim = node(f"gpus=2,ranks=4,nodes=2,fault={kind}@gpu-0:after=1s")
    events = timeline(sim, 8)
    (xid,) = of(events, EventType.ERROR_HW)
    code = kind[3:]
    assert (xid.value, xid.entity, xid.pid, xid.job, rel(xid)) == (f"XID_{code}", "gpu-0", 4800, JOB, 1000)
    assert f"NVRM: Xid (PCI:0000:18:00): {code}, pid=4800, name=python3, " in str(xid.attrs["raw"])
    assert needle in str(xid.attrs["raw"])
    (exited,) = of(events, EventType.PROCESS_STATE, "exit")
    assert (exited.pid, exited.attrs["exit_code"]) == (4800, 1)
    assert_victims(events, pids=[4801], fault_ms=1000)


def test_nvlink_down_then_xid74_on_the_peer() -> None:
    sim = node("gpus=4,ranks=8,nodes=2,fault=nvlink_down@gpu-3:after=2s")
    assert not of(timeline(sim, 1.5), EventType.TOPO_LINK_DOWN)
    events = timeline(sim, 10)
    (down,) = of(events, EventType.TOPO_LINK_DOWN)
    assert (down.entity, down.value, rel(down)) == ("gpu-3/nvlink-0", "NVLINK_DOWN", 2000)
    (xid,) = of(events, EventType.ERROR_HW)
    assert (xid.entity, xid.value, xid.pid, rel(xid)) == ("gpu-0", "XID_74", None, 3000)  # (3+1) % 4
    assert "74, pid='<unknown>', name=<unknown>, NVLink" in str(xid.attrs["raw"])
    slowed = [e for e in of(events, EventType.COMPUTE_UTIL) if e.pid == 4803 and rel(e) >= 2000]
    assert slowed
    assert all(20 <= int(e.value) <= 50 for e in slowed)
    assert not [e for e in events if e.pid == 4803 and e.type == EventType.ERROR_NET]
    assert_victims(events, pids=[4800, 4801, 4802], fault_ms=2000)


def test_thermal_straggler_slows_peers_without_timeouts() -> None:
    sim = node("gpus=4,ranks=8,nodes=2,fault=thermal@gpu-2:after=4s")
    events = timeline(sim, 12, step_ms=1000)
    thermal = of(events, EventType.ERROR_HW, "CLOCK_EVENT_HW_THERMAL")
    assert [rel(e) for e in thermal] == list(range(4000, 12_001, 1000))  # every interval while active
    assert all(e.entity == "gpu-2" and 90 <= int(e.attrs["temp_c"]) <= 94 for e in thermal)
    util = [e for e in of(events, EventType.COMPUTE_UTIL) if e.pid is not None]
    assert all(int(e.value) >= 98 for e in util if e.pid == 4802 and rel(e) >= 4000)
    peers = [e for e in util if e.pid != 4802 and rel(e) >= 5000]
    assert peers
    assert all(5 <= int(e.value) <= 15 for e in peers)
    assert all(int(e.value) >= 92 for e in util if rel(e) < 4000)
    assert not of(events, EventType.ERROR_NET)  # a straggler, not a hang
    assert all(e.value not in ("0", "IO_WAIT") for e in of(events, EventType.TRANSPORT_BW))


def test_pcie_degraded() -> None:
    sim = node("gpus=4,ranks=8,nodes=2,fault=pcie_x4@gpu-1:after=1s")
    events = timeline(sim, 6)
    (link,) = of(events, EventType.TOPO_LINK_DOWN)
    assert (link.entity, link.value, rel(link)) == ("gpu-1/pcie", "PCIE_DEGRADED", 1000)
    assert {k: link.attrs[k] for k in ("width", "max_width", "gen", "max_gen")} == {
        "width": 4,
        "max_width": 16,
        "gen": 5,
        "max_gen": 5,
    }
    peers = [e for e in of(events, EventType.COMPUTE_UTIL) if e.pid not in (None, 4801) and rel(e) >= 2000]
    assert all(5 <= int(e.value) <= 15 for e in peers)
    assert not of(events, EventType.ERROR_NET)


def test_link_flap_stalls_its_rank() -> None:
    sim = node("gpus=4,ranks=8,nodes=2,fault=link_flap@mlx5_2:after=3s")
    events = timeline(sim, 10)
    (flap,) = of(events, EventType.ERROR_NET, "LINK_FLAP")
    assert (flap.entity, rel(flap), flap.attrs["count"]) == ("mlx5_2", 3000, 1)
    stalled = [e for e in of(events, EventType.TRANSPORT_BW) if e.pid == 4802]
    assert all(e.value == "IO_WAIT" and e.entity == "mlx5_2" for e in stalled if rel(e) >= 3000)
    assert all(e.value != "IO_WAIT" for e in stalled if rel(e) < 3000)
    assert not [e for e in of(events, EventType.ERROR_NET, "NCCL_TIMEOUT") if e.pid == 4802]
    assert_victims(events, pids=[4800, 4801, 4803], fault_ms=3000)


def test_hang_of_a_rank() -> None:
    sim = node("gpus=4,ranks=8,nodes=2,index=1,fault=hang@rank-5:after=2s")
    events = timeline(sim, 10)
    (hung,) = of(events, EventType.PROCESS_STATE, "hung")
    assert (hung.pid, hung.attrs["rank"], rel(hung)) == (4801, 5, 2000)
    util = [e for e in of(events, EventType.COMPUTE_UTIL) if e.pid == 4801]
    assert all(e.value == "0" for e in util if rel(e) >= 2000)
    assert all(int(e.value) >= 92 for e in util if rel(e) < 2000)
    assert_victims(events, pids=[4800, 4802, 4803], fault_ms=2000, ranks=[4, 6, 7])


def test_oom_kills_the_rank_and_shows_the_real_hog() -> None:
    sim = node("gpus=4,ranks=8,nodes=2,fault=oom@rank-2:after=5s")
    events = timeline(sim, 12)
    loader = [e for e in of(events, EventType.PROCESS_STATE) if e.entity == "data_loader"]
    assert [(e.value, e.pid, rel(e)) for e in loader] == [("start", 4900, 0)]
    (killed,) = of(events, EventType.PROCESS_STATE, "oom_killed")
    assert (killed.pid, killed.attrs["rank"], killed.attrs["exit_code"], rel(killed)) == (4802, 2, 137, 5000)
    hog = [e for e in of(events, EventType.COMPUTE_MEM, entity="sysmem") if e.pid == 4900]
    assert hog
    assert all(e.job == JOB for e in hog)
    at_kill = [e for e in hog if rel(e) >= 5000]
    assert all(68 <= float(e.value) <= 72 for e in at_kill)
    assert float(hog[0].value) < float(at_kill[0].value)  # it grew towards the kill
    assert all("used_mib" in e.attrs for e in hog)
    host = {rel(e): float(e.value) for e in of(events, EventType.COMPUTE_MEM, entity="sysmem") if e.pid is None}
    assert host[0] < 65 < 94 < host[4500]  # fills up towards the kill
    assert 90 < host[5000] < host[4500]
    assert_victims(events, pids=[4800, 4801, 4803], fault_ms=5000)


def test_no_oom_no_data_loader() -> None:
    events = timeline(node("gpus=2,ranks=4,nodes=2"), 3)
    assert not [e for e in events if e.entity in ("data_loader", "sysmem")]


# -- faults on another node ---------------------------------------------------------------


def test_victim_symptoms_on_another_nodes_sim() -> None:
    spec = "gpus=4,ranks=16,nodes=4,index={i},fault=xid79@gpu-3:node=node-2:after=10s"
    here = SimNode(parse_sim_spec(spec.format(i=0)), "node-1", T0)
    there = SimNode(parse_sim_spec(spec.format(i=1)), "node-2", T0)
    mine = timeline(here, 20)
    theirs = timeline(there, 20)
    # The root cause only on node-2 ...
    assert not of(mine, EventType.ERROR_HW)
    assert [(e.value, e.pid, e.attrs["rank"]) for e in of(theirs, EventType.PROCESS_STATE, "hung")] == [
        ("hung", 4803, 7)
    ]
    assert [e.value for e in of(theirs, EventType.ERROR_HW)] == ["XID_79"]
    # ... and the same victim story on both nodes.
    assert_victims(mine, pids=[4800, 4801, 4802, 4803], fault_ms=10_000, ranks=[0, 1, 2, 3])
    assert_victims(theirs, pids=[4800, 4801, 4802], fault_ms=10_000, ranks=[4, 5, 6])


def test_rank_faults_find_their_node_by_index() -> None:
    spec = "gpus=4,ranks=16,nodes=4,index={i},fault=hang@rank-9:after=1s"
    owner = SimNode(parse_sim_spec(spec.format(i=2)), "node-3", T0)
    other = SimNode(parse_sim_spec(spec.format(i=0)), "node-1", T0)
    assert [e.attrs["rank"] for e in of(timeline(owner, 8), EventType.PROCESS_STATE, "hung")] == [9]
    other_events = timeline(other, 8)
    assert not of(other_events, EventType.PROCESS_STATE, "hung")
    assert_victims(other_events, pids=[4800, 4801, 4802, 4803], fault_ms=1000)


def test_remote_straggler_slows_this_node() -> None:
    sim = node("gpus=2,ranks=4,nodes=2,fault=thermal@gpu-0:node=node-9:after=1s")
    events = timeline(sim, 5)
    assert not of(events, EventType.ERROR_HW)
    util = [e for e in of(events, EventType.COMPUTE_UTIL) if e.pid is not None and rel(e) >= 2000]
    assert util
    assert all(5 <= int(e.value) <= 15 for e in util)
    assert not of(events, EventType.ERROR_NET)


def test_fault_on_a_gpu_without_a_rank_spares_the_job() -> None:
    sim = node("gpus=8,ranks=8,nodes=2,fault=xid79@gpu-6:after=1s")  # 4 ranks on gpu-0..3
    events = timeline(sim, 8)
    (xid,) = of(events, EventType.ERROR_HW)
    assert (xid.entity, xid.pid, xid.job) == ("gpu-6", None, None)
    assert not of(events, EventType.ERROR_NET)
    assert all(e.value != "0" for e in of(events, EventType.TRANSPORT_BW))


def test_late_sample_catches_up_with_scheduled_times() -> None:
    sim = node("gpus=2,ranks=4,nodes=2,fault=xid79@gpu-1:after=1s")
    events = sim.sample(T0 + 30_000)  # the loop fell far behind
    assert [(e.value, rel(e)) for e in of(events, EventType.ERROR_HW)] == [("XID_79", 1000)]
    assert [rel(e) for e in of(events, EventType.ERROR_NET)] == [6000]


# -- the probe loop -----------------------------------------------------------------------


def test_probe_runs_and_stops() -> None:
    events: list[Event] = []
    beats: list[int] = []
    ctx = ProbeContext(
        node="node-1",
        clock=lambda: int(time.time() * 1000),
        emit=events.append,
        beat=lambda: beats.append(1),
        bad=lambda reason: None,
    )
    probe = SimProbe.from_spec("gpus=2,ranks=4,nodes=2,interval=20ms,fault=xid13@gpu-1:after=50ms")
    thread = threading.Thread(target=probe.run, args=(ctx,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: of(list(events), EventType.ERROR_HW), timeout=3, what="the xid13 fault", interval=0.01)
    finally:
        ctx.stop.set()
    thread.join(2)
    assert not thread.is_alive()
    assert len(of(events, EventType.PROCESS_STATE, "start")) == 2
    assert of(events, EventType.ERROR_HW, "XID_13")
    assert len(of(events, EventType.COMPUTE_UTIL)) >= 4
    assert beats


# -- the story the core reads -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "target", "verdict", "root"),
    [
        ("xid79@gpu-3:node=node-2", ("node-1", 4800), "waiting", ("node-2", "gpu-3", "XID_79")),
        ("xid79@gpu-3:node=node-2", ("node-2", 4803), "blocked", ("node-2", "gpu-3", "XID_79")),
        ("xid48@gpu-1:node=node-3", ("node-1", 4801), "waiting", ("node-3", "gpu-1", "XID_48")),
        ("nvlink_down@gpu-1:node=node-2", ("node-4", 4800), "waiting", ("node-2", "gpu-1/nvlink-0", "NVLINK_DOWN")),
        ("thermal@gpu-2:node=node-4", ("node-1", 4800), "waiting", ("node-4", "gpu-2", "CLOCK_EVENT_HW_THERMAL")),
        ("link_flap@mlx5_2:node=node-2", ("node-1", 4800), "waiting", ("node-2", "mlx5_2", "LINK_FLAP")),
        ("hang@rank-9", ("node-1", 4800), "waiting", ("node-3", None, None)),
        ("oom@rank-6", ("node-2", 4802), "exited", ("node-2", "sysmem", None)),
    ],
)
def test_four_sims_tell_a_story_the_core_explains(
    fault: str, target: tuple[str, int], verdict: str, root: tuple[str, str | None, str | None]
) -> None:
    """Four sim nodes with the same spec (but index) → `why` on any rank blames the one fault."""
    clock = ManualClock(T0)
    cluster = ClusterGraph(clock, GraphLimits(), LivenessConfig(3_000, 30_000))
    spec = f"gpus=4,ranks=16,nodes=4,index={{i}},fault={fault}:after=5s"
    sims = [SimNode(parse_sim_spec(spec.format(i=i)), f"node-{i + 1}", T0) for i in range(4)]
    for t in range(0, 15_001, 1000):
        clock.now = T0 + t
        for sim in sims:
            cluster.apply_all(sim.node, sim.sample(T0 + t))
            cluster.seen(sim.node)
    why = explain(cluster, Target(node=target[0], pid=target[1])).to_json()
    assert why["verdict"] == verdict
    found = why["root_cause"]
    assert found is not None
    assert found["node"] == root[0]
    if root[1] is not None:
        assert found["entity"] == root[1]
    if root[2] is not None:
        assert found["code"] == root[2]
