"""Projections of the cluster view into the JSON shapes of DESIGN §7 (ps, nodes, jobs).

Pure functions over a ClusterGraph; the aggregator serves them, the CLI renders them.
"""

from __future__ import annotations

from typing import Any, Final

from xctl.core.catalog import code_info
from xctl.core.cluster import ClusterGraph, Liveness
from xctl.core.graph import ENDED_STATES, NodeGraph, Process, base_entity
from xctl.core.why import API_VERSION, iso

_BLOCKING_STATES: Final = frozenset({"hung", "d_state"})


def quick_verdict(graph: NodeGraph, proc: Process) -> str:
    """A cheap, local verdict for listings (``why`` gives the full, cross-node one)."""
    if proc.state in ENDED_STATES or proc.state == "zombie":
        return "exited"
    degraded = False
    errors = graph.errors_of(proc.pid, created=proc.create_time)
    for entity in proc.consumes:
        errors.extend(graph.errors_on(entity))
    for err in errors:
        info = code_info(err.code)
        if info.sympathetic:
            continue
        if not info.degrading:
            return "blocked"
        degraded = True
    if proc.waits or proc.state in _BLOCKING_STATES:
        return "waiting"
    return "degraded" if degraded else "running"


def process_row(node: str, graph: NodeGraph, proc: Process) -> dict[str, Any]:
    gpus = []
    for usage in proc.gpus():
        util = usage.util_pct
        gpus.append({"gpu": usage.entity, "util": util, "mem_used_mib": usage.mem_used_mib})
    gpus.sort(key=lambda g: str(g["gpu"]))
    return {
        "node": node,
        "pid": proc.pid,
        "name": proc.name,
        "job": proc.job,
        "rank": proc.rank,
        "state": "running" if proc.state == "start" else proc.state,
        "gpus": gpus,
        "verdict": quick_verdict(graph, proc),
        "create_time": proc.create_time,
        "cmdline": proc.attrs.get("cmdline"),
        "ppid": proc.attrs.get("ppid"),
    }


def process_list(
    cluster: ClusterGraph, *, node: str | None = None, job: str | None = None, include_exited: bool = True
) -> dict[str, Any]:
    items = []
    for name in sorted(cluster.nodes) if node is None else [node]:
        graph = cluster.nodes.get(name)
        if graph is None:
            continue
        procs = list(graph.processes.values())
        if include_exited:
            procs.extend(graph.tombstones.values())
        for proc in procs:
            if job is not None and proc.job != job:
                continue
            items.append(process_row(name, graph, proc))
    items.sort(key=lambda r: (r["node"], r["job"] or "", r["rank"] if r["rank"] is not None else -1, r["pid"]))
    return {"apiVersion": API_VERSION, "kind": "ProcessList", "items": items}


def node_list(cluster: ClusterGraph) -> dict[str, Any]:
    items = []
    for name in sorted(cluster.status):
        status = cluster.status[name]
        graph = cluster.nodes.get(name)
        counts = graph.counts() if graph is not None else {}
        items.append(
            {
                "node": name,
                "state": cluster.liveness(name).value,
                "last_seen": iso(status.last_seen),
                "last_seen_ms": status.last_seen,
                "epoch": status.epoch,
                "events": status.events,
                "resyncs": status.resyncs,
                "version": status.version,
                "probes": list(status.probes),
                "processes": counts.get("processes", 0),
                "errors": counts.get("errors", 0),
            }
        )
    return {"apiVersion": API_VERSION, "kind": "NodeList", "items": items}


def job_list(cluster: ClusterGraph) -> dict[str, Any]:
    items = []
    for job in cluster.jobs():
        ranks = cluster.ranks(job)
        nodes = sorted({r.node for r in ranks})
        verdicts = {quick_verdict(cluster.nodes[r.node], r.process) for r in ranks}
        dead = [n for n in nodes if cluster.liveness(n) is not Liveness.ALIVE]
        if dead:
            state = "degraded"
        elif verdicts <= {"running"}:
            state = "running"
        elif verdicts == {"exited"}:
            state = "ended"
        else:
            state = next(v for v in ("blocked", "waiting", "degraded", "exited", "running") if v in verdicts)
        world = max((_int(r.process.attrs.get("world_size")) for r in ranks), default=0)
        items.append(
            {
                "job": job,
                "ranks": len(ranks),
                "world_size": world or None,
                "nodes": nodes,
                "state": state,
                "unreachable_nodes": dead,
            }
        )
    return {"apiVersion": API_VERSION, "kind": "JobList", "items": items}


def error_list(cluster: ClusterGraph) -> list[dict[str, Any]]:
    out = []
    for name in sorted(cluster.nodes):
        for err in cluster.nodes[name].active_errors():
            info = code_info(err.code)
            out.append(
                {
                    "node": name,
                    "entity": err.entity,
                    "gpu": base_entity(err.entity) if err.entity.startswith("gpu-") else None,
                    "code": err.code,
                    "kind": info.kind.value,
                    "count": err.count,
                    "first_seen": iso(err.first.ts),
                    "condition": err.condition,
                }
            )
    return out


def _int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return 0
