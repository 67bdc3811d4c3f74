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

Security (DESIGN §6, docs/security.md): with ``keys`` the three sockets are CURVE servers
and a :class:`~xctl.wire.curve.ZapHandler` admits agent keys on events and control, operator
and admin keys on queries. Every message's User-Id (``role:name:key``, set by the ZAP
handler) is checked against the current allow-lists: an agent may publish and speak on the
control channel only for the node its key names, a removed key's messages are dropped, and
only an admin may zap. Control messages go to a node only through the routing id of a peer
whose authenticated identity is that node. Without keys the sockets bind loopback only,
unless ``insecure`` (then a warning is logged at start and every hour).
"""

from __future__ import annotations

import ipaddress
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
from xctl.core.errors import NotAuthorisedError, ProtocolError, UsageError, XctlError
from xctl.core.graph import GraphLimits
from xctl.gcpolicy import GcPolicy
from xctl.sysclock import mono_s, wall_ms
from xctl.wire.codec import DropCounter
from xctl.wire.curve import (
    ADMIN,
    AGENT,
    OPERATOR,
    Identity,
    ServerKeys,
    ZapHandler,
    chain,
    load_server_keys,
    server_setup,
)
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
#: How often plaintext on a non-loopback address is warned about again.
INSECURE_WARNING_S: Final = 3600.0
#: Refused messages of one kind are logged at most this often (a flood must not flood the log).
REFUSAL_LOG_S: Final = 10.0


DEFAULT_MAX_NODES: Final = 10_000


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
    #: CURVE keys: the server pair and the agents/ operators/ admins/ allow-lists (see
    #: :mod:`xctl.wire.curve`). None (or a directory with no key files): plaintext.
    keys: str | None = None
    #: Allow plaintext on an address other than loopback (warned about every hour).
    insecure: bool = False
    #: Distinct node names kept at most. Without CURVE anyone who reaches the ports can name
    #: nodes, so beyond this new names are refused (counted as ``node_limit``) rather than
    #: growing memory without bound; known nodes are never refused.
    max_nodes: int = DEFAULT_MAX_NODES
    #: Run the garbage collector on the daemon's schedule (xctl.gcpolicy): on for the real
    #: daemons, off for aggregators embedded in other processes (tests).
    gc_policy: bool = False


@dataclass
class ControlPeer:
    node: str
    routing_id: bytes
    epoch: str
    version: str = ""
    #: The authenticated User-Id the peer was recorded under (CURVE only).
    user_id: str | None = None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the sockets to this machine (``*`` and 0.0.0.0 do not)."""
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext_bind(bind: str, insecure: bool) -> None:
    """Plaintext (no keys) is for loopback; elsewhere only with an explicit ``--insecure``."""
    if not insecure and not is_loopback(bind):
        raise UsageError(
            f"refusing to listen on {bind} in plaintext: anyone who can reach it could publish events and kill "
            "processes. Give --keys DIR (CURVE; see docs/security.md), bind 127.0.0.1, or pass --insecure "
            "on a network you trust"
        )


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
        self.server_keys: ServerKeys | None = load_server_keys(config.keys) if config.keys else None
        if config.keys and self.server_keys is None:
            log.warning("--keys %s holds no key files: the aggregator runs without CURVE (plaintext)", config.keys)
        if self.server_keys is None:
            check_plaintext_bind(config.bind, config.insecure)
        #: CURVE in use: every message's User-Id is checked (see the module doc).
        self.secure = self.server_keys is not None
        self._zap: ZapHandler | None = None
        self._reload = threading.Event()
        #: Routing id → the node whose peer entry uses it (CURVE: who owns a connection).
        self._rid_owner: dict[bytes, str] = {}
        self._logged: dict[str, float] = {}
        #: Messages received per port (before any check), for the fuzz accounting in health.
        self.received = {"events": 0, "control": 0, "query": 0}
        self.start_id = uuid.uuid4().hex[:12]
        self.cluster = ClusterGraph(clock, config.limits, config.liveness)
        self.ingest = Ingest(self.cluster, self._request_snapshot)
        self.drops = DropCounter()
        self.gc = GcPolicy() if config.gc_policy else None
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
        self.commands.secure = self.secure
        self.handlers.setdefault("zap", self.commands.op_zap)
        #: Zap commands by result, for /metrics (xctl_zap_results_total).
        self.zap_results = self.commands.results

    def request_stop(self) -> None:
        self.stop_event.set()

    def request_reload(self) -> None:
        """Read the allow-lists again (SIGHUP); done by the socket thread at its next turn."""
        self._reload.set()

    # ---------------------------------------------------------------- run
    def run(self) -> None:
        _raise_fd_limit()
        if self.gc is not None:
            self.gc.start()
        ctx = self._context or zmq.Context()
        eps = endpoints(self.config.bind, self.config.port)
        sockets: list[zmq.Socket[bytes]] = []
        try:
            keys = self.server_keys
            if keys is not None:
                # Before any bind: with ZAP_ENFORCE_DOMAIN no client gets in without it.
                self._zap = ZapHandler(ctx, keys.keyring)
                self._zap.start()
                self._log_keyring("loaded")

            def setup(domain: str) -> Any:
                own = server_setup(keys, domain) if keys is not None else None
                return chain(own, self.config.socket_setup)

            sub = events_sub(ctx, eps.events, setup=setup("events"))
            sockets.append(sub)
            control = control_router(ctx, eps.control, setup=setup("control"))
            sockets.append(control)
            query = query_router(ctx, eps.query, setup=setup("query"))
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
            if keys is None and not is_loopback(self.config.bind):
                self._warn_insecure()
            self.ready.set()
            self._loop(sub, control, query)
        finally:
            for sock in sockets:
                sock.close()
            if self._zap is not None:
                self._zap.stop()
                self._zap = None
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
        last_insecure_warning = mono_s()
        plaintext_off_loopback = not self.secure and not is_loopback(self.config.bind)
        while not self.stop_event.is_set():
            ready = dict(poller.poll(timeout=int(TICK_S * 1000)))
            # Queries and control first: they must never queue behind the event firehose.
            if query in ready:
                self._drain(query, self._on_query_frames, "query")
            if control in ready:
                self._drain(control, self._on_control_frames, "control")
            if sub in ready:
                self._drain(sub, self._on_event_frames, "events")
            now = mono_s()
            if now - last_tick >= TICK_S:
                last_tick = now
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload_keys()
                if plaintext_off_loopback and now - last_insecure_warning >= INSECURE_WARNING_S:
                    last_insecure_warning = now
                    self._warn_insecure()
                self.ingest.pump()
                self.commands.tick()
                if self.gc is not None:
                    self.gc.tick()
            if now - last_beat >= HEARTBEAT_S:
                last_beat = now
                self._heartbeat_agents()
                self.cluster.expire()

    def _drain(self, sock: zmq.Socket[bytes], on_frames: Any, port: str) -> None:
        secure = self.secure
        for _ in range(MAX_PER_SOCKET_PER_TURN):
            user_id: str | None = None
            try:
                if secure:
                    # copy=False: the frames carry the connection's properties (the User-Id).
                    raw = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    user_id = _user_id(raw[-1])
                    frames = [f.bytes for f in raw]
                else:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self.received[port] += 1
            on_frames(sock, frames, user_id)

    def _identity(self, user_id: str | None) -> Identity | None:
        """The identity behind a User-Id while its key is still listed (CURVE only)."""
        keys = self.server_keys
        return keys.keyring.identity(user_id) if keys is not None else None

    def _refusal(self, what: str, detail: str) -> None:
        """Log a refused message, at most once per REFUSAL_LOG_S for each kind and sender."""
        now = mono_s()
        key = f"{what}|{detail}"
        last = self._logged.get(key)
        if last is not None and now - last < REFUSAL_LOG_S:
            return
        if len(self._logged) > 1024:
            self._logged.clear()
        self._logged[key] = now
        log.warning("%s: %s", what, detail)

    # ---------------------------------------------------------------- events
    def _on_event_frames(self, _sock: zmq.Socket[bytes], frames: list[bytes], user_id: str | None = None) -> None:
        who = None
        if self.secure:
            who = self._identity(user_id)
            if who is None:
                self.drops.count("events_revoked")
                self._refusal("event batch refused", f"its key is no longer authorised ({user_id})")
                return
        try:
            batch, rejects = read_batch(frames)
        except ProtocolError as exc:
            self.drops.count(f"events_{exc.reason}")
            log.debug("dropped event message: %s", exc)
            return
        if who is not None and (who.role != AGENT or who.name != batch.node):
            self.drops.count("events_identity_mismatch")
            self._refusal("event batch refused", f"{who.label} may not publish for node {batch.node!r}")
            return
        if not self._admit(batch.node):
            return
        if rejects:
            self.drops.count("bad_event", rejects.count)
        self.batches += 1
        self.ingest.on_batch(batch)
        if batch.events:
            self.queries.remember(batch.node, batch.events)

    # ---------------------------------------------------------------- control
    def _on_control_frames(self, sock: zmq.Socket[bytes], frames: list[bytes], user_id: str | None = None) -> None:
        if len(frames) != 2:
            self.drops.count("control_bad_frame")
            return
        routing_id, payload = frames
        who = None
        if self.secure:
            who = self._identity(user_id)
            owner = self._rid_owner.get(routing_id)
            if owner is not None and (who is None or who.role != AGENT or who.name != owner):
                # That routing id now reaches another key: nothing for `owner` may go there.
                self._drop_peer(owner)
                self.drops.count("control_routing_id_taken")
            if who is None:
                self.drops.count("control_revoked")
                self._refusal("control message refused", f"its key is no longer authorised ({user_id})")
                return
        try:
            message = read_control(payload)
        except ProtocolError as exc:
            self.drops.count(f"control_{exc.reason}")
            self._send(sock, routing_id, ErrorMessage.from_exception(exc))
            return
        node = getattr(message, "node", None)
        if isinstance(message, Hello | Heartbeat | Snapshot | Ack | Result):
            if not node:  # an agent's heartbeat names its node; only ours go without
                self.drops.count("control_unexpected")
                return
            if not self._identity_ok(routing_id, node, who):
                self.drops.count("control_identity_mismatch")
                claimed = f"{who.label} may not speak for node {node!r}" if who else "routing id does not match node"
                self._refusal("control message refused", claimed)
                self._send(sock, routing_id, ErrorMessage("NOT_AUTHORISED", claimed))
                return
            if not self._admit(node):
                self._send(sock, routing_id, ErrorMessage("NODE_LIMIT", self._node_limit_detail(node)))
                return
            self.cluster.seen(node)
        if isinstance(message, Hello):
            self._on_hello(routing_id, message, who)
        elif isinstance(message, Heartbeat):
            self._on_heartbeat(routing_id, message, who)
        elif isinstance(message, Snapshot):
            if self.ingest.on_snapshot(message) and message.rejected:
                self.drops.count("bad_event", message.rejected.count)
        elif isinstance(message, Result):
            self.on_result(message)
        elif isinstance(message, Ack):
            self.commands.on_ack(message)
        else:
            self.drops.count("control_unexpected")

    def _admit(self, node: str) -> bool:
        """A known node always; a new one while fewer than ``max_nodes`` are known."""
        status = self.cluster.status
        if node in status or len(status) < self.config.max_nodes:
            return True
        self.drops.count("node_limit")
        # One log line per REFUSAL_LOG_S however many names a flood invents.
        self._refusal("message from a new node refused", self._node_limit_detail())
        log.debug("node limit: refused new node %.64r", node)
        return False

    def _node_limit_detail(self, node: str | None = None) -> str:
        which = "a new node" if node is None else f"node {node[:64]!r}"
        return (
            f"{which} would exceed --max-nodes {self.config.max_nodes}; raise it if the cluster "
            "is that large, or use --keys so that only enrolled agents can name nodes"
        )

    def _identity_ok(self, routing_id: bytes, node: str, who: Identity | None = None) -> bool:
        """With CURVE: the authenticated key is the agent key of ``node``. Without: the routing
        id (``node/epoch/…``) must at least name the node."""
        if self.secure:
            return who is not None and who.role == AGENT and who.name == node
        return routing_id.split(b"/", 1)[0] == node.encode()

    def _set_peer(self, peer: ControlPeer) -> None:
        old = self.peers.get(peer.node)
        if old is not None and self._rid_owner.get(old.routing_id) == peer.node:
            del self._rid_owner[old.routing_id]
        previous = self._rid_owner.get(peer.routing_id)
        if previous is not None and previous != peer.node:
            self._drop_peer(previous)
        self.peers[peer.node] = peer
        self._rid_owner[peer.routing_id] = peer.node

    def _drop_peer(self, node: str) -> None:
        peer = self.peers.pop(node, None)
        if peer is not None and self._rid_owner.get(peer.routing_id) == node:
            del self._rid_owner[peer.routing_id]

    def _on_hello(self, routing_id: bytes, hello: Hello, who: Identity | None = None) -> None:
        user_id = who.user_id if who is not None else None
        self._set_peer(ControlPeer(hello.node, routing_id, hello.epoch, hello.version, user_id))
        status = self.cluster.seen(hello.node)
        status.version = hello.version
        if not status.probes:
            status.probes = [{"name": p, "state": "starting", "detail": ""} for p in hello.probes]
        log.info("hello from %s (epoch %s, version %s)", hello.node, hello.epoch, hello.version)
        self.ingest.pump()

    def _on_heartbeat(self, routing_id: bytes, beat: Heartbeat, who: Identity | None = None) -> None:
        if beat.node is None:
            return
        peer = self.peers.get(beat.node)
        if peer is None or peer.routing_id != routing_id:
            user_id = who.user_id if who is not None else None
            self._set_peer(ControlPeer(beat.node, routing_id, beat.epoch or "", user_id=user_id))
        if beat.probes:
            self.cluster.seen(beat.node).probes = [dict(p) for p in beat.probes]

    def _heartbeat_agents(self) -> None:
        if self._control is None:
            return
        beat = Heartbeat(ts=self.clock(), start_id=self.start_id)
        for node, peer in list(self.peers.items()):
            if not self._send(self._control, peer.routing_id, beat):
                self._drop_peer(node)

    def _request_snapshot(self, node: str, req_id: str) -> bool:
        peer = self.peers.get(node)
        if peer is None or self._control is None or not self._peer_ok(peer):
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

    def _peer_ok(self, peer: ControlPeer) -> bool:
        """Whether ``peer``'s connection still proves it is its node (CURVE: its key is still
        listed for that node; without CURVE: its routing id names the node)."""
        if self.secure:
            who = self._identity(peer.user_id)
            return who is not None and who.role == AGENT and who.name == peer.node
        return self._identity_ok(peer.routing_id, peer.node)

    def _route_command(self, node: str, command: Command) -> str | None:
        """Send ``command`` to ``node``'s agent; None when sent, else why not.

        The peer was recorded from a hello/heartbeat that passed :meth:`_identity_ok` (with
        CURVE: the authenticated User-Id is the agent key of that node), over a routing id no
        other key has used since (see :meth:`_on_control_frames`).
        """
        peer = self.peers.get(node)
        if peer is None or self._control is None:
            return f"node {node} is not connected to this aggregator"
        if not self._peer_ok(peer):
            self._drop_peer(node)
            return f"node {node}: its control connection does not prove its identity (key removed?)"
        if not self._send(self._control, peer.routing_id, command):
            self._drop_peer(node)
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
    def _on_query_frames(self, sock: zmq.Socket[bytes], frames: list[bytes], user_id: str | None = None) -> None:
        try:
            envelope, payload = split_envelope(frames)
        except ProtocolError as exc:
            self.drops.count(f"query_{exc.reason}")
            return
        who = None
        if self.secure:
            who = self._identity(user_id)
            if who is None or who.role not in (OPERATOR, ADMIN):
                self.drops.count("query_revoked")
                self._refusal("query refused", f"its key is no longer authorised ({user_id})")
                refused = NotAuthorisedError("key not authorised by the aggregator (it was removed from its lists)")
                self._reply(sock, envelope, error_reply("", refused))
                return
        try:
            request = read_query(payload)
        except ProtocolError as exc:
            self.drops.count(f"query_{exc.reason}")
            self._reply(sock, envelope, error_reply("", exc))
            return
        self.commands.requester = who
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
        finally:
            self.commands.requester = None
        self._reply(sock, envelope, reply)

    def _reply(self, sock: zmq.Socket[bytes], envelope: list[bytes], reply: Any) -> None:
        try:
            sock.send_multipart(reply_frames(envelope, reply), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.drops.count("query_reply_dropped")

    def _start_metrics(self) -> None:
        from xctl.aggregator.metrics import serve_metrics

        self._metrics_server = serve_metrics(self, self.config.metrics_bind, self.config.metrics_port)

    # ---------------------------------------------------------------- keys
    def reload_keys(self) -> None:
        """Read the allow-lists again (SIGHUP). New connections see the new lists at once; on
        open ones every message is checked against them, so a removed key's are dropped."""
        if self.server_keys is None:
            log.info("reload: no CURVE keys in use, nothing to reload")
            return
        try:
            fresh = self.server_keys.reload()
        except XctlError as exc:
            where = self.server_keys.directory
            log.error("reload of the keys in %s failed, the old lists stay in force: %s", where, exc)
            return
        self.server_keys = fresh
        if self._zap is not None:
            self._zap.set_keyring(fresh.keyring)
        for node, peer in list(self.peers.items()):
            if not self._peer_ok(peer):
                log.warning("node %s: its agent key is no longer listed: no commands go to it", node)
                self._drop_peer(node)
        self._log_keyring("reloaded")

    def _log_keyring(self, what: str) -> None:
        keys = self.server_keys
        if keys is None:
            return
        counts = keys.keyring.counts()
        log.info(
            "CURVE keys %s from %s: %d agents, %d operators, %d admins",
            what,
            keys.directory,
            counts["agent"],
            counts["operator"],
            counts["admin"],
        )
        for problem in keys.keyring.problems:
            log.warning("keys: %s", problem)

    def _warn_insecure(self) -> None:
        log.warning(
            "INSECURE: listening on %s without CURVE keys (--insecure): anyone who can reach ports %d-%d can "
            "publish events, read the cluster and zap processes (see docs/security.md)",
            self.config.bind,
            self.config.port,
            self.config.port + 2,
        )

    def security(self) -> dict[str, Any]:
        """For health: the mode, the allow-lists' sizes and the handshakes accepted/refused."""
        keys = self.server_keys
        if keys is None:
            mode = "plaintext" if is_loopback(self.config.bind) else "insecure"
            return {"mode": mode}
        zap = self._zap
        return {"mode": "curve", "keys": keys.keyring.counts(), "handshakes": zap.stats() if zap else {}}

    # ---------------------------------------------------------------- counters
    def counters(self) -> dict[str, Any]:
        return {
            "received": dict(self.received),
            "security": self.security(),
            "batches": self.batches,
            "events_applied": self.ingest.applied_events,
            "resyncs": self.ingest.resyncs_total,
            "visibility_lag": self.ingest.lag_percentiles(),
            "syncing": self.ingest.syncing(),
            "dropped": {**self.drops.as_dict(), **self.ingest.drops.as_dict()},
            "commands": dict(self.commands.counts),
            **({"gc": self.gc.stats()} if self.gc is not None else {}),
        }


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) else None


def _raise_fd_limit() -> None:
    """Every agent holds two TCP connections: 1,000 agents need more than the usual 1,024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
