"""Prometheus ``/metrics`` of the aggregator (default port 9445; 9400 is dcgm-exporter's).

A custom collector builds fresh metric families from the cluster graph on every scrape, so
there are no long-lived gauges to keep in step or to clean up when a node, GPU or error goes
away: what is not in the graph is not exported. Names are prefixed ``xctl_``, values are in
base units (ratios 0–1, bytes, seconds), counters end in ``_total``, and per-GPU series use
dcgm-exporter's label names (``gpu``, ``UUID``, ``pci_bus_id``, ``device``, ``modelName``,
``Hostname``, and ``pod``/``namespace``/``container`` when known) so dashboards can join
both exporters. Every per-node series carries the node as ``Hostname`` (dcgm-exporter's
name for it). The full list is in docs/operations.md.

Threads: the scrape runs in prometheus_client's HTTP server threads while the aggregator's
socket thread mutates the graph; the graph is deliberately not locked (locking the hot
ingest path for a scrape every 15 s is the wrong trade). Instead a scrape copies every
dict/set it walks (``list(...)`` of a dict view is a single C-level step, so it cannot see
a mutation half-way) and, should a mutation still land between a copy and a nested walk
(``RuntimeError: … changed size during iteration``), builds the whole scrape once more.
A second failure fails that scrape (HTTP 500; Prometheus records ``up`` 0 for it) rather
than serve half a picture. Values within one scrape may be a few microseconds apart —
fine for monitoring, and never torn within one histogram (its count is derived from the
same copy as its buckets). Concurrent scrapes are serialised by a lock.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from xctl import __version__
from xctl.aggregator.queries import QUERY_BUCKETS_S, OpTimings
from xctl.core.catalog import code_info
from xctl.core.cluster import ClusterGraph, Liveness
from xctl.core.events import EventType
from xctl.core.graph import ErrorVertex, NodeGraph, Process, Resource, as_float
from xctl.core.views import quick_verdict
from xctl.metrics_http import MetricsServer, start_server

log = logging.getLogger(__name__)

#: The default port (DESIGN §6); ``--metrics-port 0`` disables the endpoint.
DEFAULT_METRICS_PORT: Final = 9445
#: dcgm-exporter's label for the machine; xctl puts its node name there.
NODE: Final = "Hostname"
#: dcgm-exporter's per-GPU labels, in its order, then the workload labels it adds on k8s.
GPU_LABELS: Final = (NODE, "gpu", "UUID", "pci_bus_id", "device", "modelName", "pod", "namespace", "container")
#: Every verdict ``quick_verdict`` gives (always exported, zeros included, so panels have data).
VERDICTS: Final = ("blocked", "waiting", "degraded", "running", "exited")
VERTEX_KINDS: Final = ("process", "tombstone", "resource", "error")
EDGE_KINDS: Final = ("consumes", "waits_on", "blocked_by")
MIB: Final = 1024 * 1024
_GPU_RE: Final = re.compile(r"^gpu-(\d+)$")
_WORKLOAD_ATTRS: Final = ("pod", "namespace", "container")
#: NodeGraph.evicted's keys → the vertex kinds of xctl_graph_vertices.
_SINGULAR: Final = {"processes": "process", "tombstones": "tombstone", "resources": "resource", "errors": "error"}


def mutated_during_iteration(exc: BaseException) -> bool:
    """``dictionary changed size…``, ``Set changed size…``, ``OrderedDict mutated…``."""
    return isinstance(exc, RuntimeError) and "during iteration" in str(exc)


class AggregatorCollector(Collector):
    """Builds every ``xctl_*`` family of the aggregator from its live state, per scrape."""

    def __init__(self, aggregator: Any) -> None:
        self._agg = aggregator
        self._lock = threading.Lock()
        #: (node, gpu entity) → (UUID, pci_bus_id, modelName). The NVML probe sends identity
        #: attrs only every N samples, so the latest sample may lack them; remembered here
        #: (pruned to the GPUs of the current scrape) so labels do not flap.
        self._identity: dict[tuple[str, str], tuple[str, str, str]] = {}
        self.retries = 0

    def describe(self) -> list[Metric]:
        # Nothing to pre-declare: the families depend on the graph. (An empty describe keeps
        # registry.register() from running a whole collect() at registration.)
        return []

    def collect(self) -> list[Metric]:
        with self._lock:
            try:
                families = self._build()
            except RuntimeError as exc:
                if not mutated_during_iteration(exc):
                    raise
                self.retries += 1
                log.debug("metrics: graph changed during the scrape (%s); building it again", exc)
                families = self._build()
            retries = CounterMetricFamily(
                "xctl_metrics_collect_retries",
                "Scrapes built twice because the graph changed under them (see xctl/aggregator/metrics.py).",
            )
            retries.add_metric([], self.retries)
            families.append(retries)
            return families

    # ------------------------------------------------------------------ the families
    def _build(self) -> list[Metric]:
        agg = self._agg
        cluster: ClusterGraph = agg.cluster
        out: list[Metric] = []
        out.extend(self._aggregator_info(agg))
        out.extend(self._nodes(cluster))
        out.extend(self._ingest(agg))
        out.extend(self._graphs(cluster))
        out.extend(self._gpus(cluster))
        out.append(self._queries(agg))
        out.extend(self._optional_counters(agg))
        return out

    def _aggregator_info(self, agg: Any) -> list[Metric]:
        info = GaugeMetricFamily("xctl_build_info", "xctl version of this aggregator (always 1).", labels=["version"])
        info.add_metric([__version__], 1)
        started = GaugeMetricFamily(
            "xctl_aggregator_start_time_seconds", "When this aggregator started (seconds since the epoch)."
        )
        started.add_metric([], agg.queries.started_ms / 1000)
        return [info, started]

    def _nodes(self, cluster: ClusterGraph) -> list[Metric]:
        up = GaugeMetricFamily(
            "xctl_agent_up",
            "1 if the node's agent was heard from within the suspect window, else 0; state is "
            "alive, suspect (silent > 3 s) or dead (silent > 30 s).",
            labels=[NODE, "state"],
        )
        last = GaugeMetricFamily(
            "xctl_agent_last_seen_timestamp_seconds",
            "When the aggregator last heard from the node's agent (seconds since the epoch).",
            labels=[NODE],
        )
        info = GaugeMetricFamily(
            "xctl_agent_info",
            "Version and epoch (changes at every agent start) of each agent.",
            labels=[NODE, "version", "epoch"],
        )
        probes = GaugeMetricFamily(
            "xctl_agent_probe_up",
            "1 if the probe is running on the node (as its agent last reported), else 0.",
            labels=[NODE, "probe", "state"],
        )
        events = CounterMetricFamily(
            "xctl_events_received", "Events received from the node and applied to the graph.", labels=[NODE]
        )
        resyncs = CounterMetricFamily(
            "xctl_resyncs",
            "Times the node's subgraph was rebuilt from a snapshot (seq gap, new epoch, restart).",
            labels=[NODE],
        )
        for node, status in sorted(cluster.status.items()):
            state = cluster.liveness(node)
            up.add_metric([node, state.value], 1 if state is Liveness.ALIVE else 0)
            last.add_metric([node], status.last_seen / 1000)
            info.add_metric([node, status.version, status.epoch], 1)
            for probe in list(status.probes):
                name, pstate = str(probe.get("name", "")), str(probe.get("state", ""))
                probes.add_metric([node, name, pstate], 1 if pstate == "running" else 0)
            events.add_metric([node], status.events)
            resyncs.add_metric([node], status.resyncs)
        return [up, last, info, probes, events, resyncs]

    def _ingest(self, agg: Any) -> list[Metric]:
        batches = CounterMetricFamily("xctl_event_batches_received", "Event batches received (heartbeats included).")
        batches.add_metric([], agg.batches)
        dropped = CounterMetricFamily(
            "xctl_dropped",
            "Messages, events and replies the aggregator dropped or rejected, by reason (e.g. seq_gap, "
            "stale_batch, bad_event, events_too_large, control_unroutable, query_bad_schema).",
            labels=["reason"],
        )
        reasons: dict[str, int] = {}
        for counter in (agg.drops, agg.ingest.drops):
            for reason, n in counter.as_dict().items():
                reasons[reason] = reasons.get(reason, 0) + n
        for reason, n in sorted(reasons.items()):
            dropped.add_metric([reason], n)
        syncing = GaugeMetricFamily(
            "xctl_nodes_resyncing", "Nodes whose stream is buffered while a snapshot is awaited."
        )
        syncing.add_metric([], sum(1 for s in list(agg.ingest.streams.values()) if s.syncing))
        return [batches, dropped, syncing]

    def _graphs(self, cluster: ClusterGraph) -> list[Metric]:
        vertices = GaugeMetricFamily(
            "xctl_graph_vertices", "Vertices of the node's causal graph, by kind.", labels=[NODE, "kind"]
        )
        edges = GaugeMetricFamily(
            "xctl_graph_edges", "Edges of the node's causal graph, by kind.", labels=[NODE, "kind"]
        )
        evicted = CounterMetricFamily(
            "xctl_graph_evicted",
            "Vertices evicted by the node graph's caps, by kind (restarts at a resync).",
            labels=[NODE, "kind"],
        )
        ignored = CounterMetricFamily(
            "xctl_graph_events_ignored",
            "Events the node graph ignored, by reason (restarts at a resync).",
            labels=[NODE, "reason"],
        )
        states = GaugeMetricFamily(
            "xctl_processes",
            "Processes known on the node by state (running, hung, d_state, zombie; exit, killed and "
            "oom_killed are tombstones kept 10 minutes).",
            labels=[NODE, "state"],
        )
        verdicts = GaugeMetricFamily(
            "xctl_process_verdicts", "Live processes on the node by quick verdict.", labels=[NODE, "verdict"]
        )
        blocked = GaugeMetricFamily(
            "xctl_processes_blocked",
            "Live processes on the node blocked by an active error (their verdict is blocked).",
            labels=[NODE],
        )
        jobs = GaugeMetricFamily(
            "xctl_job_processes",
            "Live processes of each job, over all nodes, by quick verdict.",
            labels=["job", "verdict"],
        )
        errors = GaugeMetricFamily(
            "xctl_active_errors",
            "Active errors (1 per entity and code; conditions included), with the kind of fault.",
            labels=[NODE, "entity", "code", "kind"],
        )
        job_verdicts: dict[tuple[str, str], int] = {}
        for node, graph in sorted(cluster.nodes.items()):
            procs = list(graph.processes.values())
            tombs = list(graph.tombstones.values())
            active = _active_errors(graph)
            count = _counts(graph, procs, tombs, active)
            for kind in VERTEX_KINDS:
                vertices.add_metric([node, kind], count[kind])
            for kind in EDGE_KINDS:
                edges.add_metric([node, kind], count[kind])
            for kind, n in sorted(dict(graph.evicted).items()):
                evicted.add_metric([node, _SINGULAR.get(kind, kind)], n)
            for reason, n in sorted(dict(graph.ignored).items()):
                ignored.add_metric([node, reason], n)
            by_state: dict[str, int] = {}
            for proc in procs + tombs:
                by_state[proc.state] = by_state.get(proc.state, 0) + 1
            for state, n in sorted(by_state.items()):
                states.add_metric([node, state], n)
            by_verdict = dict.fromkeys(VERDICTS, 0)
            for proc in procs:
                verdict = quick_verdict(graph, proc)
                by_verdict[verdict] = by_verdict.get(verdict, 0) + 1
                if proc.job is not None:
                    job_verdicts[(proc.job, verdict)] = job_verdicts.get((proc.job, verdict), 0) + 1
            for verdict, n in by_verdict.items():
                verdicts.add_metric([node, verdict], n)
            blocked.add_metric([node], by_verdict["blocked"])
            for err in active:
                errors.add_metric([node, err.entity, err.code, code_info(err.code).kind.value], 1)
        for (job, verdict), n in sorted(job_verdicts.items()):
            jobs.add_metric([job, verdict], n)
        return [vertices, edges, evicted, ignored, states, verdicts, blocked, jobs, errors]

    def _gpus(self, cluster: ClusterGraph) -> list[Metric]:
        util = GaugeMetricFamily(
            "xctl_gpu_utilization_ratio", "GPU utilisation (0-1), the GPU's own latest sample.", labels=list(GPU_LABELS)
        )
        used = GaugeMetricFamily(
            "xctl_gpu_memory_used_bytes",
            "GPU memory in use (bytes), the GPU's own latest sample.",
            labels=list(GPU_LABELS),
        )
        total = GaugeMetricFamily("xctl_gpu_memory_total_bytes", "GPU memory size (bytes).", labels=list(GPU_LABELS))
        seen: set[tuple[str, str]] = set()
        for node, graph in sorted(cluster.nodes.items()):
            now = graph.clock()
            for res in list(graph.resources.values()):
                match = _GPU_RE.match(res.entity)
                if match is None or graph.is_stale(res, now):
                    continue  # MIG instances, NICs, disks; a GPU gone silent (e.g. XID 79) has no value
                key = (node, res.entity)
                seen.add(key)
                index = match.group(1)
                uuid, bus, model = self._gpu_identity(key, res)
                pod, namespace, container = _workload(graph, res)
                labels = [node, index, uuid, bus, f"nvidia{index}", model, pod, namespace, container]
                util_event = res.metrics.get(EventType.COMPUTE_UTIL)
                pct = None if util_event is None else as_float(util_event.value)
                if pct is not None:
                    util.add_metric(labels, min(max(pct / 100.0, 0.0), 1.0))
                mem = res.metrics.get(EventType.COMPUTE_MEM)
                if mem is not None:
                    used_mib, total_mib = _number(mem.attrs.get("used_mib")), _number(mem.attrs.get("total_mib"))
                    if used_mib is None and total_mib is not None and (pct_mem := as_float(mem.value)) is not None:
                        used_mib = total_mib * pct_mem / 100.0
                    if used_mib is not None:
                        used.add_metric(labels, used_mib * MIB)
                    if total_mib is not None:
                        total.add_metric(labels, total_mib * MIB)
        for key in [k for k in self._identity if k not in seen]:
            del self._identity[key]
        return [util, used, total]

    def _gpu_identity(self, key: tuple[str, str], res: Resource) -> tuple[str, str, str]:
        known = self._identity.get(key, ("", "", ""))
        uuid, bus, model = known
        for event in list(res.metrics.values()):
            attrs = event.attrs
            uuid = _text(attrs.get("uuid")) or uuid
            bus = _text(attrs.get("pci_bus_id")) or bus
            model = _text(attrs.get("name")) or model
        found = (uuid, bus, model)
        if found != known:
            self._identity[key] = found
        return found

    def _queries(self, agg: Any) -> Metric:
        hist = HistogramMetricFamily(
            "xctl_query_duration_seconds", "Time to answer a query (ps, why, nodes, …), by op.", labels=["op"]
        )
        timings: dict[str, OpTimings] = dict(agg.queries.query_timings)
        for op in sorted(set(agg.handlers) | set(timings)):
            counts = list(timings[op].counts) if op in timings else [0] * (len(QUERY_BUCKETS_S) + 1)
            sum_s = timings[op].sum_s if op in timings else 0.0
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, n in zip((*QUERY_BUCKETS_S, float("inf")), counts, strict=True):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            hist.add_metric([op], buckets, sum_s)
        return hist

    def _optional_counters(self, agg: Any) -> list[Metric]:
        """Zap results and diag runs, when the aggregator keeps them (see docs/operations.md)."""
        out: list[Metric] = []
        for attr, name, label, text in (
            ("zap_results", "xctl_zap_results", "result", "Zap commands by result (ok, failed, timeout, refused…)."),
            ("diag_runs", "xctl_diag_runs", "source", "Diagnoses run, by source (rules or llm)."),
        ):
            counts = _counter_map(getattr(agg, attr, None))
            if counts is None:
                continue
            family = CounterMetricFamily(name, text, labels=[label])
            for key, n in sorted(counts.items()):
                family.add_metric([key], n)
            out.append(family)
        return out


# ---------------------------------------------------------------------- helpers
def _active_errors(graph: NodeGraph) -> list[ErrorVertex]:
    return list(graph.conditions.values()) + list(graph.errors.values())


def _counts(graph: NodeGraph, procs: list[Process], tombs: list[Process], active: list[ErrorVertex]) -> dict[str, int]:
    """What :meth:`NodeGraph.counts` gives, computed from this scrape's copies."""
    return {
        "process": len(procs),
        "tombstone": len(tombs),
        "resource": len(graph.resources),
        "error": len(active),
        "consumes": sum(len(p.consumes) for p in procs),
        "waits_on": sum(len(p.waits) for p in procs),
        "blocked_by": sum(len(e.pids) + 1 for e in active),
    }


def _workload(graph: NodeGraph, res: Resource) -> tuple[str, str, str]:
    """pod/namespace/container of the GPU's consumer, when a probe reported them as attrs."""
    for pid in sorted(res.consumers):
        proc = graph.processes.get(pid)
        if proc is None:
            continue
        found = tuple(_text(proc.attrs.get(key)) for key in _WORKLOAD_ATTRS)
        if any(found):
            return found[0], found[1], found[2]
    return "", "", ""


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _counter_map(obj: object) -> Mapping[str, int] | None:
    """A ``Mapping[str, int]`` or anything with ``as_dict()`` (a DropCounter); else None."""
    if obj is None:
        return None
    as_dict = getattr(obj, "as_dict", None)
    raw = as_dict() if callable(as_dict) else obj
    if not isinstance(raw, Mapping):
        return None
    return {str(k): int(v) for k, v in list(raw.items()) if isinstance(v, int | float) and not isinstance(v, bool)}


# ---------------------------------------------------------------------- serving
def make_registry(aggregator: Any) -> CollectorRegistry:
    """A registry of its own (not the global one): only the aggregator's families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AggregatorCollector(aggregator))
    return registry


def serve_metrics(aggregator: Any, bind: str, port: int) -> MetricsServer:
    """Called by :meth:`Aggregator.run` when ``metrics_port`` is set; ``.shutdown()`` at stop."""
    return start_server(make_registry(aggregator), bind, port, what="aggregator")
