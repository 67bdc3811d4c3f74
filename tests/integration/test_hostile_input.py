"""Hostile input on every aggregator port: it is counted and dropped, and queries keep working."""

from __future__ import annotations

import os

import msgpack
import zmq
from conftest import Cluster, wait_for

from xctl.core.events import Event, EventType
from xctl.wire.framing import batch_frames, control_frames, read_control
from xctl.wire.messages import ErrorMessage, EventBatch, Hello
from xctl.wire.sockets import endpoints

GARBAGE: list[bytes] = [
    os.urandom(64),
    b"",
    msgpack.packb({"v": 1, "t": "batch", "node": "n"})[:-3],  # truncated
    b"\xdd\xff\xff\xff\xff",  # array32 declaring 4 billion items
    b"\xdb\x7f\xff\xff\xff" + b"x" * 10,  # str32 declaring 2 GiB
    b"\x91" * 20_000 + b"\xc0",  # 20,000 nested arrays
    msgpack.packb({"v": 1, "t": "batch", "node": 5, "epoch": [], "seq": "x", "sent_ts": -1, "events": {}}),
    msgpack.packb({"v": 99, "t": "batch", "node": "n", "epoch": "e", "seq": 1, "sent_ts": 1, "events": []}),
    msgpack.packb({"v": 1, "t": "hello", "node": "n"}),  # missing fields
    msgpack.packb({"v": 99, "t": "hello", "node": "n", "epoch": "e", "version": "9", "probes": [], "pid": 1}),
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"v": 1, "t": "query", "id": "x", "op": "why", "args": {"target": 12}}),
]


def _connected(ctx: zmq.Context[bytes], kind: int, endpoint: str, routing_id: bytes | None = None) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(endpoint)
    return sock


def dropped(cluster: Cluster) -> dict[str, int]:
    return cluster.query("health")["counters"]["dropped"]


def test_hostile_frames_on_every_port_are_counted_and_dropped(cluster: Cluster) -> None:
    agg = cluster.aggregator()
    eps = endpoints("127.0.0.1", cluster.port)
    ctx = zmq.Context()
    try:
        pub = _connected(ctx, zmq.PUB, eps.events)

        def events_counted() -> bool:
            for payload in GARBAGE:
                pub.send_multipart([b"ev", payload])
            pub.send_multipart([b"ev"])  # one frame only
            counts = dropped(cluster)
            return all(counts.get(k, 0) > 0 for k in ("events_bad_msgpack", "events_bad_schema", "events_version"))

        # PUB/SUB joins late: keep sending until the aggregator has seen (and counted) them.
        wait_for(events_counted, timeout=10, what="hostile event frames to be counted", interval=0.2)

        control = _connected(ctx, zmq.DEALER, eps.control, b"mallory/1")
        for payload in GARBAGE:
            control.send(payload)
        control.send_multipart([b"a", b"b", b"c"])
        # A peer that sent garbage is told so instead of being left waiting.
        assert control.poll(5000), "no error reply on the control channel"
        reply = msgpack.unpackb(control.recv())
        assert reply["t"] == "error"

        query = ctx.socket(zmq.DEALER)
        query.setsockopt(zmq.LINGER, 0)
        query.connect(eps.query)
        replies = 0
        for payload in GARBAGE:
            query.send_multipart([b"", payload])
        query.send_multipart([b"no-delimiter"])
        while query.poll(2000):
            frames = query.recv_multipart()
            answer = msgpack.unpackb(frames[-1])
            assert answer["ok"] is False
            assert answer["error"]["code"]
            replies += 1
        assert replies >= len(GARBAGE) - 2

        counts = dropped(cluster)
        assert any(k.startswith("control_") for k in counts), counts
        assert any(k.startswith("query_") for k in counts), counts
        assert counts.get("control_version", 0) >= 1
        # Still serving, and the log holds no traceback flood.
        assert cluster.query("health")["ok"] is True
        assert cluster.query("nodes")["items"] == []
        assert "Traceback" not in agg.output()
    finally:
        ctx.destroy(linger=0)


def test_invented_node_names_are_capped_and_known_nodes_keep_flowing(cluster: Cluster) -> None:
    """Without CURVE anyone can name nodes: past --max-nodes new names are refused and
    counted, while the nodes already known keep being updated."""
    cluster.aggregator("--max-nodes", "2")
    cluster.agent("real1", "sim:gpus=1,ranks=1,nodes=1,index=0,interval=200ms")
    wait_for(lambda: "real1" in {n["node"] for n in cluster.query("nodes")["items"]}, timeout=10, what="real1")
    eps = endpoints("127.0.0.1", cluster.port)
    ctx = zmq.Context()
    try:
        pub = _connected(ctx, zmq.PUB, eps.events)
        ev = Event(1_700_000_000_000, EventType.COMPUTE_UTIL, "gpu-0", "50")

        def flood_refused() -> bool:
            for i in range(50):
                pub.send_multipart(batch_frames(EventBatch(f"fake{i}", "e", 1, ev.ts, (ev,))))
            return dropped(cluster).get("node_limit", 0) > 0

        wait_for(flood_refused, timeout=10, what="invented nodes to be refused", interval=0.2)
        names = {n["node"] for n in cluster.query("nodes")["items"]}
        assert len(names) <= 2 and "real1" in names

        # A hello from yet another new node is answered with the reason, not left waiting.
        control = _connected(ctx, zmq.DEALER, eps.control, b"fake99/e")
        control.send_multipart(control_frames(Hello("fake99", "e", "0", (), 1)))
        assert control.poll(5000), "no reply to a hello past the node limit"
        reply = read_control(control.recv())
        assert isinstance(reply, ErrorMessage) and reply.code == "NODE_LIMIT"
        assert "--max-nodes 2" in reply.message

        # The known node still flows: its event count keeps growing.
        def real1_events() -> int:
            return next(n["events"] for n in cluster.query("nodes")["items"] if n["node"] == "real1")

        before = real1_events()
        wait_for(lambda: real1_events() > before, timeout=10, what="real1's events to keep arriving")
    finally:
        ctx.destroy(linger=0)
