"""The Prometheus collectors, on a real Aggregator (and Agent) fed through their real paths.

Every assertion reads the exposition text that Prometheus would scrape (``generate_latest``
parsed back by prometheus_client's own parser), so names, types and labels are checked as
a scraper sees them.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from xctl.agent.daemon import Agent, AgentConfig
from xctl.agent.metrics import make_registry as agent_registry
from xctl.aggregator import metrics as agg_metrics
from xctl.aggregator.ingest import Ingest
from xctl.aggregator.metrics import AggregatorCollector, make_registry
from xctl.aggregator.queries import QUERY_BUCKETS_S, handle
from xctl.aggregator.server import Aggregator, AggregatorConfig
from xctl.core.catalog import code_info
from xctl.core.events import Event, EventType
from xctl.probes.sim import SimNode, parse_sim_spec
from xctl.wire.messages import EventBatch, Snapshot

T0 = 1_700_000_000_000
GPU0_UUID = "GPU-11111111-2222-3333-4444-555555555555"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class Control:
    """Stands in for the control channel: records snapshot requests, answers on demand."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    def send(self, node: str, req_id: str) -> bool:
        self.requests.append((node, req_id))
        return True


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry) -> tuple[dict[str, str], Samples]:
    """(family name → type, (sample name, labels) → value) as a scraper parses them."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return types, samples


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def lbl(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def agg(clock: Clock) -> tuple[Aggregator, Control]:
    a = Aggregator(AggregatorConfig(), clock=clock)
    control = Control()
    a.ingest = Ingest(a.cluster, control.send)  # the real ingest, with a recording control channel
    return a, control


def deliver(a: Aggregator, control: Control, node: str, epoch: str, seq: int, events: tuple[Event, ...] = ()) -> None:
    """Answer the node's pending snapshot request (the agent's side of a resync)."""
    req = next(r for n, r in reversed(control.requests) if n == node)
    assert a.ingest.on_snapshot(Snapshot(node, epoch, seq, req, events))


def gpu_events(ts: int, *, util: str = "85", used_mib: int = 1024, ident: bool = True) -> tuple[Event, ...]:
    ids = {"uuid": GPU0_UUID, "pci_bus_id": "00000000:18:00.0", "name": "NVIDIA H100 80GB HBM3"} if ident else {}
    return (
        Event(ts, EventType.COMPUTE_UTIL, "gpu-0", util, attrs=ids),
        Event(ts, EventType.COMPUTE_MEM, "gpu-0", "1.3", attrs={"used_mib": used_mib, "total_mib": 81559}),
        Event(ts, EventType.PROCESS_STATE, "python", "running", pid=100, job="job-7", attrs={"rank": 0}),
        Event(ts, EventType.COMPUTE_UTIL, "gpu-0", "80", pid=100, job="job-7"),
    )


@pytest.fixture
def fed(agg: tuple[Aggregator, Control], clock: Clock) -> Aggregator:
    """node-a: a GPU, a rank, an XID 79 on its GPU (so the rank is blocked); a resync after a gap.
    node-b: one probe crash error, then silence (suspect)."""
    a, control = agg
    a.ingest.on_batch(EventBatch("node-a", "e1", 1, T0, gpu_events(T0)))  # first contact: resync
    deliver(a, control, "node-a", "e1", 0)  # empty snapshot at seq 0; the buffered batch 1 applies
    xid = Event(T0, EventType.ERROR_HW, "gpu-0", "XID_79", attrs={"uuid": GPU0_UUID})
    a.ingest.on_batch(EventBatch("node-a", "e1", 2, T0, (xid,)))
    a.ingest.on_batch(EventBatch("node-a", "e1", 5, T0, gpu_events(T0)))  # seq gap: dropped + resync
    deliver(a, control, "node-a", "e1", 5, (*gpu_events(T0), xid))
    a.ingest.on_batch(EventBatch("node-b", "f1", 1, T0, ()))
    crash = Event(T0, EventType.ERROR_HW, "probe:nvml", "PROBE_CRASHED", attrs={"detail": "boom"})
    deliver(a, control, "node-b", "f1", 1, (crash,))
    a.cluster.seen("node-b").probes = [
        {"name": "nvml", "state": "restarting", "detail": "boom"},
        {"name": "procfs", "state": "running", "detail": ""},
    ]
    a.drops.count("bad_event", 3)
    clock.now = T0 + 5_000  # node-b last heard 5 s ago → suspect; node-a reports again:
    a.ingest.on_batch(EventBatch("node-a", "e1", 6, clock.now, gpu_events(clock.now)))
    return a


def test_agent_up_and_liveness_states(fed: Aggregator, clock: Clock) -> None:
    types, samples = scrape(make_registry(fed))
    assert types["xctl_agent_up"] == "gauge"
    assert series(samples, "xctl_agent_up") == {
        lbl(Hostname="node-a", state="alive"): 1.0,
        lbl(Hostname="node-b", state="suspect"): 0.0,
    }
    clock.now = T0 + 40_000
    _, samples = scrape(make_registry(fed))
    assert series(samples, "xctl_agent_up") == {
        lbl(Hostname="node-a", state="dead"): 0.0,
        lbl(Hostname="node-b", state="dead"): 0.0,
    }
    assert series(samples, "xctl_agent_last_seen_timestamp_seconds")[lbl(Hostname="node-a")] == (T0 + 5_000) / 1000


def test_ingest_counters(fed: Aggregator) -> None:
    types, samples = scrape(make_registry(fed))
    assert types["xctl_resyncs"] == "counter"
    assert series(samples, "xctl_resyncs_total") == {lbl(Hostname="node-a"): 2.0, lbl(Hostname="node-b"): 1.0}
    # Batches 1 (4 events), 2 (1) and 6 (4) were applied; batch 5 came after a gap and was replaced
    # by the snapshot, and snapshots are not counted as received events.
    assert series(samples, "xctl_events_received_total") == {lbl(Hostname="node-a"): 9.0, lbl(Hostname="node-b"): 0.0}
    assert series(samples, "xctl_dropped_total") == {lbl(reason="seq_gap"): 1.0, lbl(reason="bad_event"): 3.0}
    assert series(samples, "xctl_nodes_resyncing") == {lbl(): 0.0}
    assert series(samples, "xctl_agent_probe_up") == {
        lbl(Hostname="node-b", probe="nvml", state="restarting"): 0.0,
        lbl(Hostname="node-b", probe="procfs", state="running"): 1.0,
    }


def test_graph_shape_matches_node_graph_counts(fed: Aggregator) -> None:
    _, samples = scrape(make_registry(fed))
    vertices = series(samples, "xctl_graph_vertices")
    edges = series(samples, "xctl_graph_edges")
    for node, graph in fed.cluster.nodes.items():
        counts = graph.counts()
        for kind, key in (("process", "processes"), ("tombstone", "tombstones"), ("resource", "resources")):
            assert vertices[lbl(Hostname=node, kind=kind)] == counts[key]
        assert vertices[lbl(Hostname=node, kind="error")] == counts["errors"]
        for kind in ("consumes", "waits_on", "blocked_by"):
            assert edges[lbl(Hostname=node, kind=kind)] == counts[kind]
    assert vertices[lbl(Hostname="node-a", kind="process")] == 1
    assert edges[lbl(Hostname="node-a", kind="consumes")] == 1


def test_processes_verdicts_and_errors(fed: Aggregator) -> None:
    _, samples = scrape(make_registry(fed))
    assert series(samples, "xctl_processes") == {lbl(Hostname="node-a", state="running"): 1.0}
    assert series(samples, "xctl_processes_blocked") == {lbl(Hostname="node-a"): 1.0, lbl(Hostname="node-b"): 0.0}
    verdicts = series(samples, "xctl_process_verdicts")
    assert verdicts[lbl(Hostname="node-a", verdict="blocked")] == 1.0
    assert sum(v for k, v in verdicts.items() if ("Hostname", "node-b") in k) == 0
    assert len(verdicts) == 10  # every verdict for every node, zeros included
    assert series(samples, "xctl_job_processes") == {lbl(job="job-7", verdict="blocked"): 1.0}
    assert series(samples, "xctl_active_errors") == {
        lbl(Hostname="node-a", entity="gpu-0", code="XID_79", kind="hardware"): 1.0,
        lbl(
            Hostname="node-b", entity="probe:nvml", code="PROBE_CRASHED", kind=code_info("PROBE_CRASHED").kind.value
        ): 1.0,
    }


def test_gpu_series_use_dcgm_labels_and_base_units(fed: Aggregator) -> None:
    types, samples = scrape(make_registry(fed))
    gpu = lbl(
        Hostname="node-a",
        gpu="0",
        UUID=GPU0_UUID,
        pci_bus_id="00000000:18:00.0",
        device="nvidia0",
        modelName="NVIDIA H100 80GB HBM3",
        pod="",  # unknown: empty, which Prometheus stores as absent (dcgm-exporter does the same)
        namespace="",
        container="",
    )
    assert types["xctl_gpu_utilization_ratio"] == "gauge"
    assert series(samples, "xctl_gpu_utilization_ratio") == {gpu: 0.85}
    assert series(samples, "xctl_gpu_memory_used_bytes") == {gpu: 1024 * 1024 * 1024}
    assert series(samples, "xctl_gpu_memory_total_bytes") == {gpu: 81559 * 1024 * 1024}


def test_gpu_identity_is_remembered_when_later_samples_lack_it(fed: Aggregator, clock: Clock) -> None:
    registry = make_registry(fed)
    scrape(registry)
    fed.cluster.apply_all("node-a", gpu_events(clock.now, util="40", ident=False))
    _, samples = scrape(registry)
    (labels,) = series(samples, "xctl_gpu_utilization_ratio")
    assert dict(labels)["UUID"] == GPU0_UUID
    assert dict(labels)["modelName"] == "NVIDIA H100 80GB HBM3"


def test_stale_gpu_leaves_the_gpu_series(fed: Aggregator, clock: Clock) -> None:
    clock.now = T0 + 60_000  # no sample for 60 s: 3 intervals are long gone
    _, samples = scrape(make_registry(fed))
    assert series(samples, "xctl_gpu_utilization_ratio") == {}


def test_workload_labels_when_the_consumer_process_has_them(agg: tuple[Aggregator, Control]) -> None:
    a, _ = agg
    a.cluster.apply_all(
        "k1",
        (
            Event(T0, EventType.PROCESS_STATE, "python", "running", pid=7),
            Event(T0, EventType.COMPUTE_UTIL, "gpu-1", "50", pid=7),
            Event(T0, EventType.COMPUTE_UTIL, "gpu-1", "50"),
        ),
    )
    # The graph keeps only the process attrs it knows today (no pod/namespace/container yet);
    # the collector reads them from the process that consumes the GPU whenever they are there.
    a.cluster.nodes["k1"].processes[7].attrs.update({"pod": "train-0", "namespace": "ml", "container": "trainer"})
    _, samples = scrape(make_registry(a))
    (labels,) = series(samples, "xctl_gpu_utilization_ratio")
    got = dict(labels)
    assert (got["pod"], got["namespace"], got["container"], got["gpu"], got["device"]) == (
        "train-0",
        "ml",
        "trainer",
        "1",
        "nvidia1",
    )


def test_query_duration_histogram_is_cumulative_per_op(fed: Aggregator) -> None:
    for _ in range(3):
        handle(fed.queries, "ps", {}, fed.handlers)
    handle(fed.queries, "nodes", {}, fed.handlers)
    fed.queries.query_timings["why"] = t = type(fed.queries.query_timings["ps"])()
    t.observe(0.003)  # in the 0.005 bucket
    t.observe(99.0)  # +Inf only
    types, samples = scrape(make_registry(fed))
    assert types["xctl_query_duration_seconds"] == "histogram"
    assert series(samples, "xctl_query_duration_seconds_count")[lbl(op="ps")] == 3
    assert series(samples, "xctl_query_duration_seconds_count")[lbl(op="nodes")] == 1
    assert series(samples, "xctl_query_duration_seconds_count")[lbl(op="jobs")] == 0  # known ops start at 0
    buckets = series(samples, "xctl_query_duration_seconds_bucket")
    why = {dict(k)["le"]: v for k, v in buckets.items() if dict(k)["op"] == "why"}
    assert len(why) == len(QUERY_BUCKETS_S) + 1
    assert (why["0.0025"], why["0.005"], why["2.5"], why["+Inf"]) == (0, 1, 1, 2)
    assert series(samples, "xctl_query_duration_seconds_sum")[lbl(op="why")] == pytest.approx(99.003)


def test_zap_and_diag_counters_only_when_the_aggregator_keeps_them(fed: Aggregator) -> None:
    types, samples = scrape(make_registry(fed))
    assert "xctl_diag_runs" not in types
    # The command router keeps zap results from the start: an empty family until a zap ends.
    assert types["xctl_zap_results"] == "counter"
    assert series(samples, "xctl_zap_results_total") == {}
    fed.zap_results = {"ok": 2, "timeout": 1}  # type: ignore[attr-defined]
    fed.diag_runs = {"rules": 4, "llm": 1}  # type: ignore[attr-defined]
    types, samples = scrape(make_registry(fed))
    assert types["xctl_zap_results"] == "counter"
    assert series(samples, "xctl_zap_results_total") == {lbl(result="ok"): 2, lbl(result="timeout"): 1}
    assert series(samples, "xctl_diag_runs_total") == {lbl(source="rules"): 4, lbl(source="llm"): 1}


def test_metric_names_follow_conventions(fed: Aggregator) -> None:
    types, _ = scrape(make_registry(fed))
    assert types, "nothing exported"
    for name, kind in types.items():
        assert name.startswith("xctl_"), name
        if kind == "counter":  # the parser strips _total from a counter family's name
            assert not name.endswith("_total"), name
        if kind == "gauge" and name.startswith("xctl_gpu_memory"):
            assert name.endswith("_bytes")


def test_a_scrape_retries_once_when_the_graph_changes_under_it(
    fed: Aggregator, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector = AggregatorCollector(fed)
    real = AggregatorCollector._gpus
    calls = {"n": 0}

    def flaky(self: AggregatorCollector, cluster: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return real(self, cluster)

    monkeypatch.setattr(AggregatorCollector, "_gpus", flaky)
    names = {f.name for f in collector.collect()}
    assert "xctl_gpu_utilization_ratio" in names
    assert collector.retries == 1
    retry = next(f for f in collector.collect() if f.name == "xctl_metrics_collect_retries")
    assert retry.samples[0].value == 1

    def broken(self: AggregatorCollector, cluster: Any) -> Any:
        raise RuntimeError("something else")

    monkeypatch.setattr(AggregatorCollector, "_gpus", broken)
    with pytest.raises(RuntimeError, match="something else"):
        collector.collect()


def test_scrapes_survive_a_graph_mutating_in_another_thread(agg: tuple[Aggregator, Control]) -> None:
    """The real situation: the aggregator thread applies events while HTTP threads scrape.

    (A collector walking the graph's dicts directly failed 4 of 500 scrapes in this setting.)"""
    a, _ = agg
    sims = [SimNode(parse_sim_spec(f"gpus=4,ranks=12,nodes=3,index={i}"), f"n{i}", T0) for i in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def mutate() -> None:
        t = T0
        while not stop.is_set():
            t += 100
            for i, sim in enumerate(sims):
                a.cluster.apply_all(f"n{i}", sim.sample(t))
            for i in range(3):  # churn: processes and errors come and go
                a.cluster.apply(f"n{i}", Event(t, EventType.PROCESS_STATE, "x", "start", pid=10_000 + t % 50))
                a.cluster.apply(f"n{i}", Event(t, EventType.PROCESS_STATE, "x", "exit", pid=10_000 + (t - 200) % 50))
                a.cluster.apply(f"n{i}", Event(t, EventType.ERROR_NET, f"eth{t % 7}", "LINK_FLAP"))

    registry = make_registry(a)
    worker = threading.Thread(target=mutate, daemon=True)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the most interleavings
    worker.start()
    try:
        for _ in range(150):
            try:
                generate_latest(registry)
            except BaseException as exc:  # noqa: BLE001 - collected and reported below
                errors.append(exc)
    finally:
        stop.set()
        worker.join(5)
        sys.setswitchinterval(switch)
    assert errors == []


# ------------------------------------------------------------------------------ agent
@pytest.fixture
def agent() -> Agent:
    return Agent(AgentConfig(node="n7", probes=["sim:gpus=1,ranks=1,nodes=1"]))


def test_agent_collector_series(agent: Agent) -> None:
    slot = agent.supervisor.slots[0]
    slot.state, slot.restarts, slot.crashes, slot.hangs = "restarting", 2, 1, 1
    slot.bad["bad_json"] = 4
    agent.supervisor.dropped = 9
    agent.drops.count("pub_hwm", 5)
    agent.sent_events = 123
    slot.record_cycle(0.002)
    slot.record_cycle(0.004)
    types, samples = scrape(agent_registry(agent))
    assert series(samples, "xctl_probe_cycles_total") == {lbl(Hostname="n7", probe="sim"): 2.0}
    assert series(samples, "xctl_probe_cycle_seconds_total") == {lbl(Hostname="n7", probe="sim"): 0.006}
    assert series(samples, "xctl_probe_up") == {lbl(Hostname="n7", probe="sim", state="restarting"): 0.0}
    assert series(samples, "xctl_probe_restarts_total") == {lbl(Hostname="n7", probe="sim"): 2.0}
    assert series(samples, "xctl_probe_crashes_total") == {lbl(Hostname="n7", probe="sim"): 1.0}
    assert series(samples, "xctl_probe_hangs_total") == {lbl(Hostname="n7", probe="sim"): 1.0}
    assert series(samples, "xctl_probe_bad_input_total") == {lbl(Hostname="n7", probe="sim", reason="bad_json"): 4.0}
    assert series(samples, "xctl_agent_queue_dropped_total") == {lbl(Hostname="n7"): 9.0}
    assert series(samples, "xctl_agent_queue_length") == {lbl(Hostname="n7"): 0.0}
    assert series(samples, "xctl_agent_events_sent_total") == {lbl(Hostname="n7"): 123.0}
    assert series(samples, "xctl_agent_dropped_total") == {lbl(Hostname="n7", reason="pub_hwm"): 5.0}
    assert types["xctl_probe_restarts"] == "counter"
    assert all(name.startswith("xctl_") for name in types)


def test_default_ports_are_the_documented_ones() -> None:
    from xctl.agent.metrics import DEFAULT_AGENT_METRICS_PORT

    assert agg_metrics.DEFAULT_METRICS_PORT == 9445
    assert DEFAULT_AGENT_METRICS_PORT == 9446
