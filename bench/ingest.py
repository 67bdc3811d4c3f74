"""Ingest benchmark (issue 4): simulated agents in separate processes → one real aggregator.

Prints one JSON object:
- raw_events_per_s: plain pyzmq SUB + msgpack.unpackb of the same batches (the physical limit)
- ingest_events_per_s: the aggregator (decode, validate, seq tracking, graph update)
- ratio = ingest / raw
- rate run: N nodes × 8 GPUs × 8 ranks at 1 Hz; visibility lag p50/p99 (event timestamp →
  applied to the graph), aggregator RSS, and a 1 s SIGSTOP of the aggregator mid-run: loss
  detected (seq gaps, resyncs) and repaired (final state equals what the generators sent).

Each generator process hosts many virtual nodes, each with its own PUB and DEALER sockets,
answering hello/heartbeat/snapshot like a real agent — the aggregator cannot tell them apart.

--curve: the throughput section runs a second time with CURVE (keys generated into a temp
dir: a server pair, one agent key per blast node, an operator key for the health queries;
the raw receiver is a CURVE server too) and reports ``curve_ratio`` = CURVE ingest rate /
plaintext ingest rate. --no-rate skips the (slow) rate section.

    .venv/bin/python bench/ingest.py [--nodes 1000] [--procs 2] [--duration 10] [--curve] [--no-rate]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

from xctl.cli.daemons import free_port_base
from xctl.core.events import Event, EventType
from xctl.wire.client import QueryClient
from xctl.wire.codec import pack
from xctl.wire.curve import ClientKeys, client_setup, load_client_keys, load_server_keys, write_key_pair
from xctl.wire.framing import batch_frames, control_frames, read_control
from xctl.wire.messages import EventBatch, Heartbeat, Hello, Snapshot, SnapshotReq
from xctl.wire.sockets import control_dealer, endpoints, events_pub

GPUS = 8


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class VirtualNode:
    """One simulated agent: 8 GPUs, 8 ranks of a job, its latest events as its state."""

    def __init__(self, ctx: zmq.Context[Any], name: str, host: str, port: int, job: str, first_rank: int) -> None:
        eps = endpoints(host, port)
        self.name = name
        self.epoch = f"bench-{os.getpid()}-{name}"
        self.pub = events_pub(ctx, eps.events)
        self.dealer = control_dealer(ctx, eps.control, f"{name}/{self.epoch}".encode())
        self.seq = 0
        self.job = job
        self.first_rank = first_rank
        self.state: dict[tuple[str, str, int | None], Event] = {}
        self.dealer.send_multipart(control_frames(Hello(name, self.epoch, "bench", ("sim",), os.getpid())))
        now = int(time.time() * 1000)
        for i in range(GPUS):
            ev = Event(now, EventType.PROCESS_STATE, "python3", "start", 4800 + i, job,
                       {"name": "python3", "rank": first_rank + i, "create_time": 1.0})
            self._remember(ev)

    def _remember(self, ev: Event) -> None:
        self.state[(ev.type.value, ev.entity, ev.pid)] = ev

    def tick(self, now_ms: int, k: int) -> int:
        events = []
        for i in range(GPUS):
            gpu, pid = f"gpu-{i}", 4800 + i
            util = str(90 + (k + i) % 10)
            events += [
                Event(now_ms, EventType.COMPUTE_UTIL, gpu, util),
                Event(now_ms, EventType.COMPUTE_MEM, gpu, "78.5", None, None, {"used_mib": 64000, "total_mib": 81559}),
                Event(now_ms, EventType.COMPUTE_UTIL, gpu, util, pid, self.job),
                Event(now_ms, EventType.COMPUTE_MEM, gpu, "78.5", pid, self.job, {"used_mib": 64000}),
                Event(now_ms, EventType.TRANSPORT_BW, f"mlx5_{i}", "190.25", pid, self.job),
            ]
        for ev in events:
            self._remember(ev)
        self.seq += 1
        self.pub.send_multipart(batch_frames(EventBatch(self.name, self.epoch, self.seq, now_ms, tuple(events))),
                                zmq.NOBLOCK)
        return len(events)

    def control(self, now_ms: int, beat: bool) -> None:
        while self.dealer.poll(0):
            message = read_control(self.dealer.recv_multipart()[-1])
            if isinstance(message, SnapshotReq):
                snap = Snapshot(self.name, self.epoch, self.seq, message.req_id, tuple(self.state.values()))
                self.dealer.send_multipart(control_frames(snap), zmq.NOBLOCK)
        if beat:
            self.dealer.send_multipart(control_frames(Heartbeat(now_ms, self.name, self.epoch, self.seq)), zmq.NOBLOCK)
            self.pub.send_multipart(batch_frames(EventBatch(self.name, self.epoch, self.seq, now_ms)), zmq.NOBLOCK)

    def final_utils(self) -> dict[str, float]:
        return {f"{self.name}:{pid}": float(ev.value) for (t, _e, pid), ev in self.state.items()
                if t == "compute.util" and pid is not None}


def rate_generator(names: list[str], port: int, duration: float, out: str) -> None:
    """1 Hz per node for ``duration`` seconds, then keep answering control for 10 s."""
    _raise_nofile()
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, 8192) if hasattr(zmq, "MAX_SOCKETS") else None
    nodes = [VirtualNode(ctx, n, "127.0.0.1", port, f"job-{i // 4}", (i % 4) * GPUS) for i, n in enumerate(names)]
    poller = zmq.Poller()
    by_socket = {}
    for node in nodes:
        poller.register(node.dealer, zmq.POLLIN)
        by_socket[node.dealer] = node
    start = time.monotonic()
    k, sent = 0, 0
    while time.monotonic() - start < duration:
        tick_start = time.monotonic()
        # Independent agents sample at their own phase within the second, not all at once.
        for idx, node in enumerate(nodes):
            slot = tick_start + idx / len(nodes)
            wait = slot - time.monotonic()
            if wait > 0:
                # Like a real agent, answer control (snapshot requests) as soon as it arrives.
                for sock, _ in poller.poll(int(wait * 1000)):
                    by_socket[sock].control(int(time.time() * 1000), beat=False)
            now = int(time.time() * 1000)
            sent += node.tick(now, k)
            node.control(now, beat=True)  # control heartbeat every second, as an agent does
        k += 1
        while time.monotonic() - tick_start < 1.0:
            now = int(time.time() * 1000)
            for node in nodes:
                node.control(now, beat=False)
            time.sleep(0.02)
    final: dict[str, float] = {}
    for node in nodes:
        final.update(node.final_utils())
    Path(out + ".tmp").write_text(json.dumps({"sent": sent, "final": final}))
    os.replace(out + ".tmp", out)
    end = time.monotonic() + 15
    last_beat = 0.0
    while time.monotonic() < end:
        beat = time.monotonic() - last_beat >= 1.0
        last_beat = time.monotonic() if beat else last_beat
        now = int(time.time() * 1000)
        for node in nodes:
            node.control(now, beat=beat)
        time.sleep(0.02)
    ctx.destroy(linger=0)


def make_keys(tmp: Path, nodes: int) -> Path:
    """CURVE keys for a blast: server pair + agents/ (blast0…) + operators/ (bench); one dir each."""
    agg = tmp / "keys"
    write_key_pair(agg, "server", "server")
    for role, names in (("agent", [f"blast{n}" for n in range(nodes)]), ("operator", ["bench"])):
        (agg / f"{role}s").mkdir(exist_ok=True)
        for name in names:
            where = tmp / f"keys-{name}"
            public, _ = write_key_pair(where, name, role)
            (where / "server.key").write_bytes((agg / "server.key").read_bytes())
            (agg / f"{role}s" / public.name).write_bytes(public.read_bytes())
    return agg


def client_keys(keys: Path | None, name: str) -> ClientKeys | None:
    if keys is None:
        return None
    found = load_client_keys(keys.parent / f"keys-{name}")
    assert found is not None
    return found


def blast_generator(
    port: int, nodes: int, batches: int, batch_events: int, out: str, keys: Path | None = None
) -> None:
    """Pre-packed batches sent as fast as possible (seq in order per node)."""
    ctx: zmq.Context[Any] = zmq.Context()
    eps = endpoints("127.0.0.1", port)
    now = int(time.time() * 1000)
    payloads = []
    pubs = []
    for n in range(nodes):
        name = f"blast{n}"
        epoch = f"blast-{os.getpid()}-{n}"
        own = client_keys(keys, name)
        setup = client_setup(own) if own is not None else None
        pub = events_pub(ctx, eps.events, setup=setup)
        pub.setsockopt(zmq.SNDHWM, 0)
        pubs.append(pub)
        dealer = control_dealer(ctx, eps.control, f"{name}/{epoch}".encode(), setup=setup)
        dealer.send_multipart(control_frames(Hello(name, epoch, "bench", (), os.getpid())))
        events = tuple(Event(now, EventType.COMPUTE_UTIL, f"gpu-{i % 8}", "95", 4800 + i % 8, "job-b")
                       for i in range(batch_events))
        payloads.append([pack(EventBatch(name, epoch, s, now, events).to_dict()) for s in range(1, batches + 1)])
        # First contact triggers a resync; answer it with an empty snapshot at seq 0.
        pubs[-1].send_multipart([b"ev", pack(EventBatch(name, epoch, 0, now, ()).to_dict())])
        time.sleep(0.01)
        while dealer.poll(200):
            msg = read_control(dealer.recv_multipart()[-1])
            if isinstance(msg, SnapshotReq):
                dealer.send_multipart(control_frames(Snapshot(name, epoch, 0, msg.req_id, ())))
    time.sleep(1.0)
    started = time.perf_counter()
    for s in range(batches):
        for n in range(nodes):
            pubs[n].send_multipart([b"ev", payloads[n][s]])
    Path(out).write_text(json.dumps({"seconds": time.perf_counter() - started,
                                     "events": nodes * batches * batch_events}))
    time.sleep(5)
    ctx.destroy(linger=2000)


def raw_receiver(port: int, expected: int, out: str, keys: Path | None = None) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"ev")
    sub.setsockopt(zmq.RCVHWM, 0)
    server = load_server_keys(keys) if keys is not None else None
    if server is not None:  # CURVE without ZAP: every client key is accepted (the crypto cost only)
        sub.setsockopt(zmq.CURVE_SERVER, 1)
        sub.setsockopt(zmq.CURVE_PUBLICKEY, server.public_key.encode())
        sub.setsockopt(zmq.CURVE_SECRETKEY, server.secret_key.encode())
    sub.bind(f"tcp://127.0.0.1:{port}")
    received, first = 0, None
    deadline = time.monotonic() + 120
    while received < expected and time.monotonic() < deadline:
        if not sub.poll(1000):
            continue
        frames = sub.recv_multipart()
        batch = msgpack.unpackb(frames[1], raw=False)
        if batch["events"] and first is None:
            first = time.perf_counter()  # the blast starts; set-up messages before it don't count
        received += len(batch["events"])
    seconds = time.perf_counter() - (first or time.perf_counter())
    Path(out).write_text(json.dumps({"events": received, "seconds": seconds}))
    ctx.destroy(linger=0)


def rss_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mib": round(fields.get("VmRSS", 0), 1), "peak_rss_mib": round(fields.get("VmHWM", 0), 1)}


def start_aggregator(port: int, keys: Path | None = None) -> subprocess.Popen[bytes]:
    extra = ["--keys", str(keys)] if keys is not None else []
    proc = subprocess.Popen([sys.executable, "-m", "xctl.cli.main", "aggregator", "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with QueryClient(endpoints("127.0.0.1", port).query, timeout_s=2, keys=client_keys(keys, "bench")) as client:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client.request("health")
                return proc
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
    raise SystemExit("aggregator did not start")


def measure_throughput(
    tmp: Path, nodes: int, batches: int, batch_events: int, keys: Path | None = None
) -> dict[str, Any]:
    total = nodes * batches * batch_events
    raw_port = free_port_base()
    recv = mp.Process(target=raw_receiver, args=(raw_port, total, str(tmp / "raw.json"), keys))
    recv.start()
    time.sleep(0.5)
    gen = mp.Process(target=blast_generator,
                     args=(raw_port, nodes, batches, batch_events, str(tmp / "rawgen.json"), keys))
    gen.start()
    recv.join(150)
    gen.terminate()
    raw = json.loads((tmp / "raw.json").read_text())

    port = free_port_base()
    agg = start_aggregator(port, keys)
    client = QueryClient(endpoints("127.0.0.1", port).query, timeout_s=10, keys=client_keys(keys, "bench"))
    gen = mp.Process(target=blast_generator, args=(port, nodes, batches, batch_events, str(tmp / "gen.json"), keys))
    gen.start()
    base = client.request("health")["counters"]["events_applied"]
    start = None
    applied = base
    deadline = time.monotonic() + 150
    while applied - base < total * 0.999 and time.monotonic() < deadline:
        applied = client.request("health")["counters"]["events_applied"]
        if start is None and applied > base:
            start = (time.perf_counter(), applied)
        time.sleep(0.05)
    end = (time.perf_counter(), applied)
    gen.join(30)
    agg_counters = client.request("health")["counters"]
    client.close()
    agg.send_signal(signal.SIGTERM)
    agg.wait(10)
    raw_rate = raw["events"] / raw["seconds"] if raw["seconds"] else None
    ingest_rate = (end[1] - start[1]) / (end[0] - start[0]) if start and end[0] > start[0] else None
    return {
        "raw_events_per_s": round(raw_rate or 0),
        "raw_events_received": raw["events"],
        "ingest_events_per_s": round(ingest_rate or 0),
        "ingest_events_applied": applied - base,
        "events_sent": total,
        "ratio": round(ingest_rate / raw_rate, 3) if raw_rate and ingest_rate else None,
        "dropped": agg_counters["dropped"],
    }


def measure_rate(tmp: Path, nodes: int, procs: int, duration: float) -> dict[str, Any]:
    _raise_nofile()
    port = free_port_base()
    agg = start_aggregator(port)
    names = [f"node{i:04d}" for i in range(nodes)]
    shares = [names[i::procs] for i in range(procs)]
    gens = [mp.Process(target=rate_generator, args=(share, port, duration, str(tmp / f"rate{i}.json")))
            for i, share in enumerate(shares)]
    for g in gens:
        g.start()
    client = QueryClient(endpoints("127.0.0.1", port).query, timeout_s=10)
    time.sleep(duration * 0.5)
    steady = client.request("health")["counters"]
    rss_steady = rss_mib(agg.pid)
    client.close()
    # The aggregator dies mid-run (kill -9) and is back 1 s later: the reconnecting PUBs
    # deliver a stale backlog and lose messages, the new aggregator has no state at all.
    agg.send_signal(signal.SIGKILL)
    agg.wait()
    time.sleep(1.0)
    agg = start_aggregator(port)
    restarted = time.monotonic()
    with QueryClient(endpoints("127.0.0.1", port).query, timeout_s=10) as probe_client:
        resynced_after = None
        while time.monotonic() - restarted < duration:
            counters = probe_client.request("health")["counters"]
            if counters["resyncs"] >= nodes and not counters["syncing"]:
                resynced_after = round(time.monotonic() - restarted, 2)
                break
            time.sleep(0.1)
    for g in gens:
        while g.is_alive() and not (tmp / f"rate{gens.index(g)}.json").exists():
            time.sleep(0.1)
    expected: dict[str, float] = {}
    sent = 0
    for i in range(procs):
        data = json.loads((tmp / f"rate{i}.json").read_text())
        expected.update(data["final"])
        sent += data["sent"]
    client = QueryClient(endpoints("127.0.0.1", port).query, timeout_s=20)
    repaired_after = None
    t0 = time.monotonic()
    got: dict[str, float] = {}
    while time.monotonic() - t0 < 12:
        rows = client.request("ps")["items"]
        got = {f"{r['node']}:{r['pid']}": r["gpus"][0]["util"] for r in rows if r["gpus"]}
        if got == expected and not client.request("health")["counters"]["syncing"]:
            repaired_after = round(time.monotonic() - t0, 2)
            break
        time.sleep(0.5)
    final = client.request("health")["counters"]
    nodes_info = client.request("nodes")["items"]
    rss_end = rss_mib(agg.pid)
    client.close()
    for g in gens:
        g.join(30)
    agg.send_signal(signal.SIGTERM)
    agg.wait(10)
    mismatched = sum(1 for k, v in expected.items() if got.get(k) != v)
    return {
        "nodes": nodes,
        "gpus_per_node": GPUS,
        "events_per_s_offered": nodes * GPUS * 5,
        "events_sent": sent,
        "visibility_lag_steady": steady["visibility_lag"],
        "aggregator_rss_steady": rss_steady,
        "aggregator_rss_end": rss_end,
        "outage_kill9_restart_1s": {
            "all_nodes_resynced_within_s_of_restart": resynced_after,
            "seq_gaps_detected": final["dropped"].get("seq_gap", 0),
            "resyncs_total": final["resyncs"],
            "nodes_resynced_more_than_once": sum(1 for n in nodes_info if n["resyncs"] > 1),
            "repaired": repaired_after is not None,
            "repaired_within_s_after_generators_stopped": repaired_after,
            "processes_mismatched": mismatched,
            "processes_expected": len(expected),
        },
        "dropped": final["dropped"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--blast-nodes", type=int, default=20)
    parser.add_argument("--blast-batches", type=int, default=300)
    parser.add_argument("--blast-batch-events", type=int, default=100)
    parser.add_argument("--curve", action="store_true", help="also measure the throughput with CURVE keys")
    parser.add_argument("--no-rate", action="store_true", help="skip the rate section")
    args = parser.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"xctl-bench-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "ingest", "cpus": os.cpu_count()}
    result["throughput"] = measure_throughput(tmp, args.blast_nodes, args.blast_batches, args.blast_batch_events)
    if args.curve:
        keys = make_keys(tmp, args.blast_nodes)
        curve = measure_throughput(tmp, args.blast_nodes, args.blast_batches, args.blast_batch_events, keys)
        result["throughput_curve"] = curve
        plain = result["throughput"]
        result["curve_ratio"] = {
            "ingest": round(curve["ingest_events_per_s"] / plain["ingest_events_per_s"], 3)
            if plain["ingest_events_per_s"] else None,
            "raw": round(curve["raw_events_per_s"] / plain["raw_events_per_s"], 3)
            if plain["raw_events_per_s"] else None,
        }
    if not args.no_rate:
        result["rate"] = measure_rate(tmp, args.nodes, args.procs, args.duration)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
