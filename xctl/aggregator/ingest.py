"""Per-node stream tracking and resync (DESIGN §6).

PUB/SUB drops silently, and after an aggregator restart a reconnecting PUB delivers a stale
backlog and then loses messages. So every node's stream is checked: a seq gap, a new epoch
or the aggregator's own restart (a node it has no state for) means "this node's view may be
wrong". The node's stream is then buffered, a snapshot tagged with seq S is requested over
the control channel, the node's subgraph is replaced atomically, and buffered batches with
seq > S are applied. Snapshot requests are paced (bounded concurrency, retried after a
timeout) so a thousand agents do not all answer at once.

Pure bookkeeping: the server owns the sockets and calls in; this module never does I/O.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Final

from xctl.core.cluster import ClusterGraph
from xctl.wire.codec import DropCounter
from xctl.wire.messages import EventBatch, Snapshot

log = logging.getLogger(__name__)

MAX_BUFFERED_BATCHES: Final = 2_000
SNAPSHOT_TIMEOUT_MS: Final = 5_000
MAX_SNAPSHOTS_IN_FLIGHT: Final = 16
LAG_SAMPLES: Final = 4_096
_TS: Final = attrgetter("ts")


@dataclass
class NodeStream:
    node: str
    epoch: str
    seq: int = -1
    syncing: bool = False
    buffer: list[EventBatch] = field(default_factory=list)
    req_id: str | None = None
    requested_at: int = 0
    reason: str = ""


class Ingest:
    """Applies batches to the cluster graph in order, resyncing nodes whose view is suspect."""

    def __init__(
        self,
        cluster: ClusterGraph,
        send_snapshot_req: Callable[[str, str], bool],
        *,
        max_in_flight: int = MAX_SNAPSHOTS_IN_FLIGHT,
        snapshot_timeout_ms: int = SNAPSHOT_TIMEOUT_MS,
    ) -> None:
        self.cluster = cluster
        self.streams: dict[str, NodeStream] = {}
        self._send = send_snapshot_req
        self._waiting: deque[str] = deque()
        self.max_in_flight = max_in_flight
        self.snapshot_timeout_ms = snapshot_timeout_ms
        self.drops = DropCounter()
        self.applied_events = 0
        self.resyncs_total = 0
        self.lag_ms: deque[int] = deque(maxlen=LAG_SAMPLES)

    # ---------------------------------------------------------------- batches
    def on_batch(self, batch: EventBatch) -> None:
        node = batch.node
        status = self.cluster.seen(node)
        stream = self.streams.get(node)
        if stream is None or stream.epoch != batch.epoch:
            reason = "first contact" if stream is None else "new epoch"
            stream = self.streams[node] = NodeStream(node, batch.epoch, seq=batch.seq)
            status.epoch = batch.epoch
            self._resync(stream, reason, batch)
            return
        if stream.syncing:
            self._buffer(stream, batch)
            return
        if batch.is_heartbeat:
            if batch.seq > stream.seq:
                self.drops.count("seq_gap")  # the batches before this heartbeat were lost
                self._resync(stream, f"heartbeat says seq {batch.seq}, last applied {stream.seq}", None)
            return
        if batch.seq <= stream.seq:
            self.drops.count("stale_batch")
            return
        if batch.seq != stream.seq + 1:
            self.drops.count("seq_gap")
            self._resync(stream, f"seq gap {stream.seq} -> {batch.seq}", batch)
            return
        self._apply(stream, batch)

    def _apply(self, stream: NodeStream, batch: EventBatch) -> None:
        if batch.events:
            self.cluster.apply_all(stream.node, batch.events)
            self.applied_events += len(batch.events)
            # Visibility lag: from the newest event's timestamp to "applied, answerable by why".
            self.lag_ms.append(self.cluster.clock() - max(map(_TS, batch.events)))
        stream.seq = batch.seq

    def lag_percentiles(self) -> dict[str, float | None]:
        """p50/p99 of the recent visibility lags (sender clock to our clock, so skew counts)."""
        lags = sorted(self.lag_ms)
        if not lags:
            return {"p50_ms": None, "p99_ms": None, "samples": 0}
        return {
            "p50_ms": float(lags[len(lags) // 2]),
            "p99_ms": float(lags[min(len(lags) - 1, (len(lags) * 99) // 100)]),
            "samples": len(lags),
        }

    def _buffer(self, stream: NodeStream, batch: EventBatch) -> None:
        if len(stream.buffer) >= MAX_BUFFERED_BATCHES:
            # The snapshot will be newer than what we dropped; keep the newest batches.
            del stream.buffer[: len(stream.buffer) // 2]
            self.drops.count("resync_buffer_overflow")
        stream.buffer.append(batch)

    def _resync(self, stream: NodeStream, reason: str, batch: EventBatch | None) -> None:
        log.info("resync %s: %s", stream.node, reason)
        stream.syncing = True
        stream.reason = reason
        stream.req_id = None
        stream.buffer = [] if batch is None else [batch]
        if stream.node not in self._waiting:
            self._waiting.append(stream.node)
        self.pump()

    def request_resync(self, node: str, reason: str) -> None:
        """Resync a node on the control channel's word (e.g. hello from a new epoch)."""
        stream = self.streams.get(node)
        if stream is not None and not stream.syncing:
            self._resync(stream, reason, None)

    # ---------------------------------------------------------------- snapshots
    def pump(self) -> None:
        """Send waiting snapshot requests within the in-flight bound; retry timed-out ones."""
        now = self.cluster.clock()
        in_flight = 0
        for stream in self.streams.values():
            if stream.syncing and stream.req_id is not None:
                if now - stream.requested_at > self.snapshot_timeout_ms:
                    stream.req_id = None
                    self.drops.count("snapshot_timeout")
                    if stream.node not in self._waiting:
                        self._waiting.append(stream.node)
                else:
                    in_flight += 1
        skipped: list[str] = []
        while self._waiting and in_flight < self.max_in_flight:
            node = self._waiting.popleft()
            waiting = self.streams.get(node)
            if waiting is None or not waiting.syncing or waiting.req_id is not None:
                continue
            req_id = uuid.uuid4().hex[:16]
            if self._send(node, req_id):
                waiting.req_id = req_id
                waiting.requested_at = now
                in_flight += 1
            else:
                skipped.append(node)  # no control route yet: try again on the next pump
        self._waiting.extend(skipped)

    def on_snapshot(self, snapshot: Snapshot) -> bool:
        stream = self.streams.get(snapshot.node)
        if stream is None or not stream.syncing or snapshot.req_id != stream.req_id:
            self.drops.count("unexpected_snapshot")
            return False
        if snapshot.epoch != stream.epoch:
            self.drops.count("snapshot_wrong_epoch")
            stream.req_id = None
            self._waiting.append(stream.node)
            return False
        self.cluster.replace_node(snapshot.node, snapshot.events)
        status = self.cluster.status[snapshot.node]
        status.resyncs += 1
        status.epoch = stream.epoch
        self.resyncs_total += 1
        stream.seq = snapshot.seq
        stream.syncing = False
        stream.req_id = None
        buffered, stream.buffer = sorted(stream.buffer, key=lambda b: b.seq), []
        for batch in buffered:
            if batch.epoch != stream.epoch or batch.seq <= stream.seq:
                continue
            if batch.seq != stream.seq + 1:
                self._resync(stream, f"gap in buffered batches {stream.seq} -> {batch.seq}", None)
                return True
            self._apply(stream, batch)
        log.info("resync %s done at seq %d (%d events)", snapshot.node, snapshot.seq, len(snapshot.events))
        return True

    def forget(self, node: str) -> None:
        self.streams.pop(node, None)

    def syncing(self) -> list[str]:
        return sorted(n for n, s in self.streams.items() if s.syncing)
