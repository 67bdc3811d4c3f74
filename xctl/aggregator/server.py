"""The aggregator: one thread owns all sockets (a poller loop) and the cluster graph.

- SUB (events): batches → :class:`~xctl.aggregator.ingest.Ingest` → ClusterGraph.
- ROUTER (control): hello, heartbeats both ways (ours carry our start id so agents notice a
  restart), snapshot requests and replies, commands.
- ROUTER (queries): ps, why, nodes, jobs, events, health, zap. A handler may answer later:
  ``zap`` returns :class:`~xctl.aggregator.commands.Deferred` and the REQ envelope is kept
  until the agent's result (or the deadline) completes it.

Every receiving socket has MAXMSGSIZE and every message is unpacked with limits and
validated; a malformed one is counted by reason and dropped (with an error message back
to control and query peers, so they are told instead of left waiting).
"""

from __future__ import annotations

import logging
import resource
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import zmq

from xctl.aggregator.commands import CommandRouter, Deferred
from xctl.aggregator.ingest import Ingest
from xctl.aggregator.queries import HANDLERS, Enricher, Handler, QueryState, handle
from xctl.core.clock import Clock
from xctl.core.cluster import ClusterGraph, LivenessConfig
from xctl.core.errors import ProtocolError, XctlError
from xctl.core.graph import GraphLimits
from xctl.sysclock import mono_s, wall_ms
from xctl.wire.codec import DropCounter
from xctl.wire.framing import (
    control_frames,
    read_batch,
    read_control,
    read_query,
    reply_frames,
    split_envelope,
)
from xctl.wire.messages import (
    Ack,
    Command,
    ErrorMessage,
    Heartbeat,
    Hello,
    Result,
    Snapshot,
    SnapshotReq,
    error_reply,
    ok_reply,
)
from xctl.wire.sockets import SocketSetup, control_router, endpoints, events_sub, query_router

log = logging.getLogger(__name__)

TICK_S: Final = 0.1
HEARTBEAT_S: Final = 1.0
MAX_PER_SOCKET_PER_TURN: Final = 500
#: REQ envelopes kept per deferred reply (a Lazy Pirate client retries with the same id).
MAX_WAITERS_PER_KEY: Final = 8


@dataclass
class AggregatorConfig:
    bind: str = "127.0.0.1"
    port: int = 7400
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    limits: GraphLimits = field(default_factory=GraphLimits)
    socket_setup: SocketSetup | None = None
    #: Prometheus /metrics port (0 disables); 9400 is dcgm-exporter's, so xctl uses 9445.
    metrics_port: int = 0
    metrics_bind: str = "0.0.0.0"
    #: Append every command and its outcome here (JSON lines); None: no audit log.
    audit_log: str | None = None


@dataclass
class ControlPeer:
    node: str
    routing_id: bytes
    epoch: str
    version: str = ""


class Aggregator:
    def __init__(
        self,
        config: AggregatorConfig,
        *,
        clock: Clock = wall_ms,
        context: zmq.Context[Any] | None = None,
        enrich: Enricher | None = None,
        handlers: Mapping[str, Handler] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.start_id = uuid.uuid4().hex[:12]
        self.cluster = ClusterGraph(clock, config.limits, config.liveness)
        self.ingest = Ingest(self.cluster, self._request_snapshot)
        self.drops = DropCounter()
        self.peers: dict[str, ControlPeer] = {}
        self.queries = QueryState(self.cluster, self.start_id, clock(), self.counters, enrich=enrich)
        self.handlers = dict(handlers or HANDLERS)
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.batches = 0
        self._context = context
        self._control: zmq.Socket[bytes] | None = None
        self._query: zmq.Socket[bytes] | None = None
        self._metrics_server: Any = None
        #: Deferred replies: key → the (REQ envelope, request id) waiting for it.
        self._waiting: dict[str, list[tuple[list[bytes], str]]] = {}
        self.commands = CommandRouter(
            self.cluster,
            self._route_command,
            self._complete,
            clock=clock,
            audit_log=config.audit_log,
            connected=lambda node: node in self.peers,
        )
        self.handlers.setdefault("zap", self.commands.op_zap)
        #: Zap commands by result, for /metrics (xctl_zap_results_total).
        self.zap_results = self.commands.results

    def request_stop(self) -> None:
        self.stop_event.set()

    # ---------------------------------------------------------------- run
    def run(self) -> None:
        _raise_fd_limit()
        ctx = self._context or zmq.Context()
        eps = endpoints(self.config.bind, self.config.port)
        setup = self.config.socket_setup
        sockets: list[zmq.Socket[bytes]] = []
        try:
            sub = events_sub(ctx, eps.events, setup=setup)
            sockets.append(sub)
            control = control_router(ctx, eps.control, setup=setup)
            sockets.append(control)
            query = query_router(ctx, eps.query, setup=setup)
            sockets.append(query)
            self._control = control
            self._query = query
            if self.config.metrics_port:
                self._start_metrics()
            log.info(
                "aggregator %s listening on %s (events), %s (control), %s (queries)",
                self.start_id,
                eps.events,
                eps.control,
                eps.query,
            )
            self.ready.set()
            self._loop(sub, control, query)
        finally:
            for sock in sockets:
                sock.close()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
            self._control = None
            self._query = None
            if self._context is None:
                ctx.term()
            log.info("aggregator stopped")

    def _loop(self, sub: zmq.Socket[bytes], control: zmq.Socket[bytes], query: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        for sock in (sub, control, query):
            poller.register(sock, zmq.POLLIN)
        last_beat = last_tick = 0.0
        while not self.stop_event.is_set():
            ready = dict(poller.poll(timeout=int(TICK_S * 1000)))
            # Queries and control first: they must never queue behind the event firehose.
            if query in ready:
                self._drain(query, self._on_query_frames)
            if control in ready:
                self._drain(control, self._on_control_frames)
            if sub in ready:
                self._drain(sub, self._on_event_frames)
            now = mono_s()
            if now - last_tick >= TICK_S:
                last_tick = now
                self.ingest.pump()
                self.commands.tick()
            if now - last_beat >= HEARTBEAT_S:
                last_beat = now
                self._heartbeat_agents()
                self.cluster.expire()

    def _drain(self, sock: zmq.Socket[bytes], on_frames: Any) -> None:
        for _ in range(MAX_PER_SOCKET_PER_TURN):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            on_frames(sock, frames)

    # ---------------------------------------------------------------- events
    def _on_event_frames(self, _sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        try:
            batch, rejects = read_batch(frames)
        except ProtocolError as exc:
            self.drops.count(f"events_{exc.reason}")
            log.debug("dropped event message: %s", exc)
            return
        if rejects:
            self.drops.count("bad_event", rejects.count)
        self.batches += 1
        self.ingest.on_batch(batch)
        if batch.events:
            self.queries.remember(batch.node, batch.events)

    # ---------------------------------------------------------------- control
    def _on_control_frames(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.drops.count("control_bad_frame")
            return
        routing_id, payload = frames
        try:
            message = read_control(payload)
        except ProtocolError as exc:
            self.drops.count(f"control_{exc.reason}")
            self._send(sock, routing_id, ErrorMessage.from_exception(exc))
            return
        node = getattr(message, "node", None)
        if isinstance(message, Hello | Heartbeat | Snapshot | Ack | Result) and node:
            if not self._identity_ok(routing_id, message.node or ""):
                self.drops.count("control_identity_mismatch")
                self._send(sock, routing_id, ErrorMessage("NOT_AUTHORISED", "routing id does not match node"))
                return
            self.cluster.seen(node)
        if isinstance(message, Hello):
            self._on_hello(routing_id, message)
        elif isinstance(message, Heartbeat):
            self._on_heartbeat(routing_id, message)
        elif isinstance(message, Snapshot):
            if self.ingest.on_snapshot(message) and message.rejected:
                self.drops.count("bad_event", message.rejected.count)
        elif isinstance(message, Result):
            self.on_result(message)
        elif isinstance(message, Ack):
            self.commands.on_ack(message)
        else:
            self.drops.count("control_unexpected")

    def _identity_ok(self, routing_id: bytes, node: str) -> bool:
        """Without CURVE the routing id (``node/epoch``) must at least name the node."""
        return routing_id.split(b"/", 1)[0] == node.encode()

    def _on_hello(self, routing_id: bytes, hello: Hello) -> None:
        self.peers[hello.node] = ControlPeer(hello.node, routing_id, hello.epoch, hello.version)
        status = self.cluster.seen(hello.node)
        status.version = hello.version
        if not status.probes:
            status.probes = [{"name": p, "state": "starting", "detail": ""} for p in hello.probes]
        log.info("hello from %s (epoch %s, version %s)", hello.node, hello.epoch, hello.version)
        self.ingest.pump()

    def _on_heartbeat(self, routing_id: bytes, beat: Heartbeat) -> None:
        assert beat.node is not None
        peer = self.peers.get(beat.node)
        if peer is None or peer.routing_id != routing_id:
            self.peers[beat.node] = ControlPeer(beat.node, routing_id, beat.epoch or "")
        if beat.probes:
            self.cluster.seen(beat.node).probes = [dict(p) for p in beat.probes]

    def _heartbeat_agents(self) -> None:
        if self._control is None:
            return
        beat = Heartbeat(ts=self.clock(), start_id=self.start_id)
        for node, peer in list(self.peers.items()):
            if not self._send(self._control, peer.routing_id, beat):
                del self.peers[node]

    def _request_snapshot(self, node: str, req_id: str) -> bool:
        peer = self.peers.get(node)
        if peer is None or self._control is None:
            return False
        return self._send(self._control, peer.routing_id, SnapshotReq(node, req_id))

    def _send(self, sock: zmq.Socket[bytes], routing_id: bytes, message: Any) -> bool:
        try:
            sock.send_multipart(control_frames(message, routing_id), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (ROUTER_MANDATORY) or EAGAIN
            self.drops.count("control_unroutable" if exc.errno == zmq.EHOSTUNREACH else "control_send_again")
            return False
        return True

    def on_result(self, result: Result) -> None:
        """Command results (zap), for the command router."""
        log.info("result %s from %s: ok=%s", result.id, result.node, result.ok)
        self.commands.on_result(result)

    def _route_command(self, node: str, command: Command) -> str | None:
        """Send ``command`` to ``node``'s agent; None when sent, else why not.

        The peer was recorded from its hello/heartbeat after :meth:`_identity_ok`; with CURVE
        that check becomes the authenticated User-Id (DESIGN §6) and needs no change here.
        """
        peer = self.peers.get(node)
        if peer is None or self._control is None:
            return f"node {node} is not connected to this aggregator"
        if not self._identity_ok(peer.routing_id, node):
            return f"node {node}: its control connection does not prove its identity"
        if not self._send(self._control, peer.routing_id, command):
            self.peers.pop(node, None)
            return f"node {node} is not connected to this aggregator (its control connection is gone)"
        return None

    def _complete(self, key: str, data: Any) -> None:
        """Reply to every query waiting on ``key`` (a deferred answer is ready)."""
        waiting = self._waiting.pop(key, [])
        if self._query is None:
            return
        for envelope, request_id in waiting:
            self._reply(self._query, envelope, ok_reply(request_id, data))

    # ---------------------------------------------------------------- queries
    def _on_query_frames(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        try:
            envelope, payload = split_envelope(frames)
        except ProtocolError as exc:
            self.drops.count(f"query_{exc.reason}")
            return
        try:
            request = read_query(payload)
        except ProtocolError as exc:
            self.drops.count(f"query_{exc.reason}")
            self._reply(sock, envelope, error_reply("", exc))
            return
        try:
            data = handle(self.queries, request.op, request.args, self.handlers)
            if isinstance(data, Deferred):
                waiting = self._waiting.setdefault(data.key, [])
                waiting.append((envelope, request.id))
                del waiting[: -MAX_WAITERS_PER_KEY]  # a retrying client: the newest REQs matter
                return
            reply = ok_reply(request.id, data)
        except XctlError as exc:
            reply = error_reply(request.id, exc)
        except Exception as exc:  # a bug in a handler must not take the aggregator down
            log.exception("query %s failed", request.op)
            reply = error_reply(request.id, XctlError(f"internal error in {request.op}: {exc}"))
        self._reply(sock, envelope, reply)

    def _reply(self, sock: zmq.Socket[bytes], envelope: list[bytes], reply: Any) -> None:
        try:
            sock.send_multipart(reply_frames(envelope, reply), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.drops.count("query_reply_dropped")

    def _start_metrics(self) -> None:
        from xctl.aggregator.metrics import serve_metrics

        self._metrics_server = serve_metrics(self, self.config.metrics_bind, self.config.metrics_port)

    # ---------------------------------------------------------------- counters
    def counters(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "events_applied": self.ingest.applied_events,
            "resyncs": self.ingest.resyncs_total,
            "visibility_lag": self.ingest.lag_percentiles(),
            "syncing": self.ingest.syncing(),
            "dropped": {**self.drops.as_dict(), **self.ingest.drops.as_dict()},
            "commands": dict(self.commands.counts),
        }


def _raise_fd_limit() -> None:
    """Every agent holds two TCP connections: 1,000 agents need more than the usual 1,024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
