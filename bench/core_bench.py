"""Core benchmark: the pure graph and `why`, in-process, on a manual clock.

Builds a cluster of N nodes × 8 GPUs × 8 ranks (jobs of 4 nodes × 8 ranks; every node uses
the same pids 4800–4807, so pids collide across nodes), then

- feeds a realistic 1 Hz sample stream for a few simulated seconds — per GPU util + mem
  without a pid, per rank util + mem + transport.bw with its pid, occasional errors — and
  measures ``ClusterGraph.apply()`` (one event at a time) and ``apply_all()`` (one batch per
  node per second, as the aggregator ingests) in events/s;
- injects a few XID 79s (the GPU's rank hangs, its peers stall and report NCCL_TIMEOUT) and a
  few node-downs (nodes go silent while the rest heartbeat), then measures ``explain()``
  latency over ~2,000 targets (healthy ranks and victims) and checks the victims' verdicts.

Prints ONE JSON object. Event generation is outside the timed sections.

    .venv/bin/python bench/core_bench.py [--nodes 1000] [--seconds 5] [--targets 2000]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import resource
import statistics
import sys
import time
from typing import Any

from xctl.core.clock import ManualClock
from xctl.core.cluster import ClusterGraph, LivenessConfig
from xctl.core.events import AttrValue, Event, EventType
from xctl.core.graph import GraphLimits
from xctl.core.targets import Target
from xctl.core.why import explain

T0 = 1_732_350_000_000
GPUS = 8
NODES_PER_JOB = 4
PID0 = 4800
ST, U, M, BW = EventType.PROCESS_STATE, EventType.COMPUTE_UTIL, EventType.COMPUTE_MEM, EventType.TRANSPORT_BW
HW, NET = EventType.ERROR_HW, EventType.ERROR_NET
#: Benign errors sprinkled into the stream (blips that expire, not conditions).
NOISE = ("XID_92", "CLOCK_EVENT_SW_POWER_CAP", "PCIE_AER_CORRECTED", "TEMP_HIGH")


def node_name(i: int) -> str:
    return f"gpu-node-{i:04d}"


def job_of(i: int) -> str:
    return f"job-{i // NODES_PER_JOB:04d}"


def start_events(i: int, now: int) -> list[Event]:
    job, world = job_of(i), NODES_PER_JOB * GPUS
    out = []
    for local in range(GPUS):
        rank = (i % NODES_PER_JOB) * GPUS + local
        attrs: dict[str, AttrValue] = {
            "name": "python3",
            "cmdline": f"python3 train.py --rank {rank}",
            "create_time": T0 / 1000 - 3600 + local,
            "rank": rank,
            "local_rank": local,
            "world_size": world,
            "ppid": 4700,
        }
        out.append(Event(now, ST, "python3", "start", PID0 + local, job, attrs))
    out.append(Event(now, EventType.INTENT_RUN, job, "JOB_START", None, job, {"world_size": world}))
    return out


def sample_events(i: int, now: int, rng: random.Random, noise_rate: float) -> list[Event]:
    """One second of one node's samples: 16 per-GPU + 24 per-rank events (+ rare noise)."""
    job = job_of(i)
    out = []
    for g in range(GPUS):
        gpu = f"gpu-{g}"
        util = str(90 + rng.randrange(10))
        out.append(Event(now, U, gpu, util))
        out.append(Event(now, M, gpu, "78", None, None, {"used_mib": 64000, "total_mib": 81559}))
        pid = PID0 + g
        out.append(Event(now, U, gpu, util, pid, job))
        out.append(Event(now, M, gpu, "78", pid, job, {"used_mib": 63000}))
        out.append(Event(now, BW, f"mlx5_{g}", str(180 + rng.randrange(20)), pid, job))
    if rng.random() < noise_rate:
        out.append(Event(now, HW, f"gpu-{rng.randrange(GPUS)}", rng.choice(NOISE)))
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def graph_sizes(cluster: ClusterGraph) -> dict[str, int]:
    totals: dict[str, int] = {}
    for graph in cluster.nodes.values():
        for key, n in graph.counts().items():
            totals[key] = totals.get(key, 0) + n
    totals["nodes"] = len(cluster.nodes)
    totals["jobs"] = len(cluster.jobs())
    totals["history_gpus"] = sum(len(g.history) for g in cluster.nodes.values())
    return totals


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    n_nodes = args.nodes - args.nodes % NODES_PER_JOB or NODES_PER_JOB
    clock = ManualClock(T0)
    cluster = ClusterGraph(clock, GraphLimits(), LivenessConfig(suspect_ms=3_000, dead_ms=30_000))
    names = [node_name(i) for i in range(n_nodes)]
    n_jobs = n_nodes // NODES_PER_JOB
    # Faulty jobs are chosen up front and get no benign noise, so their root cause is known.
    fault_jobs = rng.sample(range(n_jobs), min(args.xid_jobs + args.down_jobs, n_jobs))
    xid_jobs, down_jobs = fault_jobs[: args.xid_jobs], fault_jobs[args.xid_jobs :]
    quiet = {i for j in fault_jobs for i in range(j * NODES_PER_JOB, (j + 1) * NODES_PER_JOB)}

    # ---- build: every rank starts, then one second of samples
    t = time.perf_counter()
    for i, node in enumerate(names):
        cluster.apply_all(node, start_events(i, clock.now))
        cluster.apply_all(node, sample_events(i, clock.now, rng, 0.0))
    build_s = time.perf_counter() - t

    # ---- the 1 Hz stream: apply() one event at a time, then apply_all() per node batch
    def stream(seconds: int, batched: bool) -> tuple[int, float, float]:
        events = 0
        busy = cpu = 0.0
        for _ in range(seconds):
            clock.advance(1_000)
            now = clock.now
            per_node = [sample_events(i, now, rng, 0.0 if i in quiet else args.noise) for i in range(n_nodes)]
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            if batched:
                for node, batch in zip(names, per_node, strict=True):
                    cluster.apply_all(node, batch)
            else:
                apply = cluster.apply
                for node, batch in zip(names, per_node, strict=True):
                    for ev in batch:
                        apply(node, ev)
            busy += time.perf_counter() - t0
            cpu += time.process_time() - c0
            events += sum(len(b) for b in per_node)
        return events, busy, cpu

    single_events, single_s, single_cpu = stream(args.seconds, batched=False)
    batch_events, batch_s, batch_cpu = stream(args.seconds, batched=True)
    sizes_steady = graph_sizes(cluster)

    # ---- faults: XID 79 on one GPU of a few jobs, and a few nodes that go silent
    expected: dict[str, tuple[str, str, str]] = {}  # job -> (node, entity, code)
    clock.advance(1_000)
    for j in xid_jobs:
        i = j * NODES_PER_JOB + rng.randrange(NODES_PER_JOB)
        g = rng.randrange(GPUS)
        node, job = names[i], job_of(i)
        raw = f"NVRM: Xid (PCI:0000:{0x18 + g:02x}:00): 79, pid='<unknown>', GPU has fallen off the bus."
        cluster.apply(node, Event(clock.now, HW, f"gpu-{g}", "XID_79", None, None, {"xid": 79, "raw": raw}))
        cluster.apply(node, Event(clock.now, ST, "python3", "hung", PID0 + g, job))
        expected[job] = (node, f"gpu-{g}", "XID_79")
    down_nodes = set()
    for j in down_jobs:
        i = j * NODES_PER_JOB + rng.randrange(NODES_PER_JOB)
        down_nodes.add(names[i])
        expected[job_of(i)] = (names[i], "node", "NODE_DOWN")
    # 31 s pass: everyone but the silent nodes heartbeats; the victims stall and time out
    clock.advance(31_000)
    for node in names:
        if node not in down_nodes:
            cluster.seen(node)
    for j in fault_jobs:
        for i in range(j * NODES_PER_JOB, (j + 1) * NODES_PER_JOB):
            node, job = names[i], job_of(i)
            if node in down_nodes:
                continue
            for g in range(GPUS):
                pid = PID0 + g
                if expected[job] == (node, f"gpu-{g}", "XID_79"):
                    continue
                cluster.apply(node, Event(clock.now, U, f"gpu-{g}", "0", pid, job))
                cluster.apply(node, Event(clock.now, BW, f"mlx5_{g}", "0", pid, job))
                cluster.apply(node, Event(clock.now, NET, job, "NCCL_TIMEOUT", pid, job, {"raw": "NCCL WARN Timeout"}))

    # ---- explain(): healthy ranks and victims
    victims = [
        (names[i], PID0 + g, job_of(i))
        for j in fault_jobs
        for i in range(j * NODES_PER_JOB, (j + 1) * NODES_PER_JOB)
        for g in range(GPUS)
        if names[i] not in down_nodes
    ]
    healthy_jobs = [j for j in range(n_jobs) if j not in set(fault_jobs)]
    n_victims = min(len(victims), args.targets // 5)
    targets: list[tuple[Target, str | None]] = [
        (Target(node=n, pid=p), job) for n, p, job in rng.sample(victims, n_victims)
    ]
    while len(targets) < args.targets and healthy_jobs:
        j = rng.choice(healthy_jobs)
        i = j * NODES_PER_JOB + rng.randrange(NODES_PER_JOB)
        targets.append((Target(node=names[i], pid=PID0 + rng.randrange(GPUS)), None))
    rng.shuffle(targets)

    latencies: list[float] = []
    cpu_latencies: list[float] = []
    victim_latencies: list[float] = []
    full_gcs = [0]

    def count_full_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info.get("generation") == 2:
            full_gcs[0] += 1

    correct = wrong = 0
    healthy_verdicts: dict[str, int] = {}
    gc.collect()
    gc.callbacks.append(count_full_gc)
    for target, want in targets:
        c0, t0 = time.process_time_ns(), time.perf_counter_ns()
        exp = explain(cluster, target)
        us = (time.perf_counter_ns() - t0) / 1_000
        cpu_latencies.append((time.process_time_ns() - c0) / 1_000)
        latencies.append(us)
        if want is None:
            healthy_verdicts[exp.verdict] = healthy_verdicts.get(exp.verdict, 0) + 1
            continue
        victim_latencies.append(us)
        root = exp.root
        if root is not None and (root.node, root.entity, root.code) == expected[want]:
            correct += 1
        else:
            wrong += 1
    gc.callbacks.remove(count_full_gc)
    cpu_latencies.sort()
    latencies.sort()
    victim_latencies.sort()

    total_events = single_events + batch_events
    return {
        "bench": "core",
        "python": platform.python_version(),
        "nodes": n_nodes,
        "gpus_per_node": GPUS,
        "ranks": n_nodes * GPUS,
        "jobs": n_jobs,
        "simulated_seconds": 2 * args.seconds,
        "events_per_node_per_s": round(total_events / (2 * args.seconds) / n_nodes, 1),
        "build_s": round(build_s, 3),
        "apply": {
            "events": single_events,
            "seconds": round(single_s, 3),
            "events_per_s": round(single_events / single_s),
            "events_per_cpu_s": round(single_events / single_cpu) if single_cpu else None,
        },
        "apply_all": {
            "events": batch_events,
            "seconds": round(batch_s, 3),
            "events_per_s": round(batch_events / batch_s),
            "events_per_cpu_s": round(batch_events / batch_cpu) if batch_cpu else None,
            "batch": "one per node per simulated second",
        },
        "realtime_headroom_x": round((batch_events / batch_s) / (total_events / (2 * args.seconds)), 1),
        "explain_us": {
            "targets": len(latencies),
            "p50": round(percentile(latencies, 0.50), 1),
            "p99": round(percentile(latencies, 0.99), 1),
            "mean": round(statistics.fmean(latencies), 1) if latencies else 0.0,
            "max": round(latencies[-1], 1) if latencies else 0.0,
            "victims": len(victim_latencies),
            "victims_p50": round(percentile(victim_latencies, 0.50), 1),
            "victims_p99": round(percentile(victim_latencies, 0.99), 1),
            # CPU time of this process per explain: robust to other load on the machine
            "cpu_p50": round(percentile(cpu_latencies, 0.50), 1),
            "cpu_p99": round(percentile(cpu_latencies, 0.99), 1),
            "full_gc_during": full_gcs[0],
        },
        "faults": {"xid79_jobs": len(xid_jobs), "node_down_jobs": len(down_jobs)},
        "verdicts": {
            "victims_root_cause_correct": correct,
            "victims_root_cause_wrong": wrong,
            # healthy ranks of jobs where a peer GPU had a benign blip (noise) are not all "running"
            "healthy": dict(sorted(healthy_verdicts.items())),
        },
        "graph_steady": sizes_steady,
        "graph_final": graph_sizes(cluster),
        "rss_max_mib": rss_mib(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000, help="nodes (rounded down to a multiple of 4)")
    parser.add_argument("--seconds", type=int, default=5, help="simulated seconds per ingest mode")
    parser.add_argument("--targets", type=int, default=2000, help="explain() targets")
    parser.add_argument("--xid-jobs", type=int, default=5, help="jobs that lose a GPU to XID 79")
    parser.add_argument("--down-jobs", type=int, default=3, help="jobs with a node that goes silent")
    parser.add_argument("--noise", type=float, default=0.01, help="chance per node-second of a benign error")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
