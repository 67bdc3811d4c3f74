"""The node agent: probes → local graph → batched events over PUB, control over DEALER.

One thread (the one that calls :meth:`Agent.run`) owns both sockets and the local graph;
probes run in their own threads and hand events over through the supervisor's bounded
queue. Batches are flushed every ≤ 50 ms or ≤ 1000 events; an empty batch carrying the
last seq goes out every second as a heartbeat, so the aggregator notices a lost final batch.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import zmq

from xctl import __version__
from xctl.agent.sdnotify import Notifier
from xctl.agent.supervisor import Supervisor
from xctl.core.clock import Clock
from xctl.core.errors import ProtocolError, XctlError
from xctl.core.events import Event
from xctl.core.graph import NodeGraph
from xctl.probes.base import Probe
from xctl.probes.registry import make_probe
from xctl.sysclock import mono_s, wall_ms
from xctl.wire.codec import CONTROL_MAX, EVENTS_MAX, DropCounter, pack
from xctl.wire.framing import batch_frames, control_frames, read_control
from xctl.wire.messages import (
    Command,
    ErrorMessage,
    EventBatch,
    Heartbeat,
    Hello,
    Result,
    Snapshot,
    SnapshotReq,
)
from xctl.wire.sockets import SocketSetup, control_dealer, endpoints, events_pub

log = logging.getLogger(__name__)

FLUSH_MS: Final = 50
FLUSH_MAX: Final = 1000
HEARTBEAT_S: Final = 1.0
#: The aggregator is presumed gone (and hello is repeated) after this much control silence.
AGGREGATOR_SILENT_S: Final = 5.0

CommandHandler = Callable[[Command], Result]


@dataclass
class AgentConfig:
    node: str
    aggregator_host: str = "127.0.0.1"
    port: int = 7400
    probes: list[str] = field(default_factory=list)
    flush_ms: int = FLUSH_MS
    flush_max: int = FLUSH_MAX
    heartbeat_s: float = HEARTBEAT_S
    #: Applied to every socket before connect (the CURVE layer sets keys here).
    socket_setup: SocketSetup | None = None
    #: The agent's own Prometheus /metrics port (0: off; the documented port is 9446).
    metrics_port: int = 0
    metrics_bind: str = "0.0.0.0"
    #: Tell systemd READY=1 / WATCHDOG=1 / STOPPING=1 over $NOTIFY_SOCKET (the CLI daemons do).
    systemd_notify: bool = False


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Clock = wall_ms,
        context: zmq.Context[Any] | None = None,
        command_handler: CommandHandler | None = None,
    ) -> None:
        self.config = config
        self.node = config.node
        self.clock = clock
        self.epoch = f"{self.clock():x}-{uuid.uuid4().hex[:8]}"
        self.graph = NodeGraph(config.node, clock)
        self.supervisor = Supervisor(config.node, clock)
        self.seq = 0
        self.sent_events = 0
        self.drops = DropCounter()
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.command_handler = command_handler
        self._context = context
        self._aggregator_start: str | None = None
        self._last_control_rx = 0.0
        self._notifier = Notifier() if config.systemd_notify else Notifier({})
        names: dict[str, int] = {}
        for spec in config.probes:
            probe = make_probe(spec)  # fail fast on a bad SPEC, before any thread starts
            name = probe.name
            names[name] = names.get(name, 0) + 1
            if names[name] > 1:
                name = f"{name}#{names[name]}"
            self.supervisor.add(name, _factory(spec, probe))

    # ---------------------------------------------------------------- lifecycle
    def request_stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        """Run until :meth:`request_stop`. Creates its sockets in this thread (after any fork)."""
        ctx = self._context or zmq.Context()
        eps = endpoints(self.config.aggregator_host, self.config.port)
        pub = events_pub(ctx, eps.events, setup=self.config.socket_setup)
        identity = f"{self.node}/{self.epoch}".encode()[:255]
        dealer = control_dealer(ctx, eps.control, identity, setup=self.config.socket_setup)
        log.info("agent %s (epoch %s) publishing to %s", self.node, self.epoch, eps.events)
        metrics: Any = None
        try:
            if self.config.metrics_port:
                from xctl.agent.metrics import serve_agent_metrics

                metrics = serve_agent_metrics(self, self.config.metrics_bind, self.config.metrics_port)
            self._send_control(dealer, self._hello())
            self.supervisor.start()
            self.ready.set()
            self._notifier.ready()
            self._loop(pub, dealer)
        finally:
            self._notifier.stopping()
            self._notifier.close()
            if metrics is not None:
                metrics.shutdown()
            self.supervisor.stop()
            pub.close()
            dealer.close()
            if self._context is None:
                ctx.term()
            log.info("agent %s stopped", self.node)

    def _loop(self, pub: zmq.Socket[bytes], dealer: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        pending: list[Event] = []
        flush_s = self.config.flush_ms / 1000
        last_flush = last_beat = mono_s()
        while not self.stop_event.is_set():
            ready = dict(poller.poll(timeout=max(1, int(flush_s * 1000))))
            if dealer in ready:
                self._drain_control(pub, dealer, pending)
            for event in self.supervisor.drain():
                self.graph.apply(event)
                pending.append(event)
            now = mono_s()
            if pending and (len(pending) >= self.config.flush_max or now - last_flush >= flush_s):
                self._flush(pub, pending)
                last_flush = now
            if now - last_beat >= self.config.heartbeat_s:
                last_beat = now
                self._heartbeat(pub, dealer, idle=now - last_flush >= self.config.heartbeat_s)
                self._notifier.watchdog()
                self.supervisor.check()
                self.graph.expire()
        for event in self.supervisor.drain():
            self.graph.apply(event)
            pending.append(event)
        self._flush(pub, pending)

    # ---------------------------------------------------------------- events
    def _flush(self, pub: zmq.Socket[bytes], pending: list[Event]) -> None:
        limit = self.config.flush_max
        for start in range(0, len(pending), limit):
            self._send_batch(pub, tuple(pending[start : start + limit]))
        pending.clear()

    def _send_batch(self, pub: zmq.Socket[bytes], events: tuple[Event, ...]) -> None:
        self.seq += 1
        batch = EventBatch(self.node, self.epoch, self.seq, self.clock(), events)
        frames = batch_frames(batch)
        if len(frames[1]) > EVENTS_MAX and len(events) > 1:
            # Too big for the aggregator's MAXMSGSIZE: split (the seq already taken is reused).
            self.seq -= 1
            half = len(events) // 2
            self._send_batch(pub, events[:half])
            self._send_batch(pub, events[half:])
            return
        if len(frames[1]) > EVENTS_MAX:
            self.drops.count("event_too_large")
            self.seq -= 1
            return
        try:
            pub.send_multipart(frames, flags=zmq.NOBLOCK)
            self.sent_events += len(events)
        except zmq.Again:
            self.drops.count("pub_hwm")

    def _heartbeat(self, pub: zmq.Socket[bytes], dealer: zmq.Socket[bytes], *, idle: bool) -> None:
        if idle:
            try:
                pub.send_multipart(batch_frames(EventBatch(self.node, self.epoch, self.seq, self.clock())), zmq.NOBLOCK)
            except zmq.Again:
                self.drops.count("pub_hwm")
        self._send_control(
            dealer, Heartbeat(ts=self.clock(), node=self.node, epoch=self.epoch, seq=self.seq, probes=self._probes())
        )
        if self._last_control_rx and mono_s() - self._last_control_rx > AGGREGATOR_SILENT_S:
            # The aggregator went quiet: say hello again so a restarted one learns about us.
            self._last_control_rx = 0.0
            self._send_control(dealer, self._hello())

    # ---------------------------------------------------------------- control
    def _hello(self) -> Hello:
        return Hello(self.node, self.epoch, __version__, tuple(s.name for s in self.supervisor.slots), os.getpid())

    def _probes(self) -> tuple[dict[str, str], ...]:
        return tuple(self.supervisor.states())

    def _send_control(self, dealer: zmq.Socket[bytes], message: Any) -> None:
        try:
            dealer.send_multipart(control_frames(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.drops.count("control_hwm")

    def _drain_control(self, pub: zmq.Socket[bytes], dealer: zmq.Socket[bytes], pending: list[Event]) -> None:
        for _ in range(100):
            try:
                frames = dealer.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_control_rx = mono_s()
            try:
                message = read_control(frames[-1])
            except ProtocolError as exc:
                self.drops.count(exc.reason)
                log.debug("bad control message: %s", exc)
                continue
            self._on_control(pub, dealer, message, pending)

    def _on_control(
        self, pub: zmq.Socket[bytes], dealer: zmq.Socket[bytes], message: Any, pending: list[Event]
    ) -> None:
        if isinstance(message, Heartbeat):
            if message.start_id and message.start_id != self._aggregator_start:
                if self._aggregator_start is not None:
                    log.info("aggregator restarted (start id %s): saying hello again", message.start_id)
                    self._send_control(dealer, self._hello())
                self._aggregator_start = message.start_id
        elif isinstance(message, SnapshotReq):
            # Everything applied to the graph must be in batches <= seq: flush first.
            for event in self.supervisor.drain():
                self.graph.apply(event)
                pending.append(event)
            self._flush(pub, pending)
            snapshot = Snapshot(self.node, self.epoch, self.seq, message.req_id, tuple(self.graph.snapshot_events()))
            if len(pack(snapshot.to_dict())) > CONTROL_MAX:
                log.error("snapshot of %s exceeds %d bytes; aggregator view will be partial", self.node, CONTROL_MAX)
            self._send_control(dealer, snapshot)
        elif isinstance(message, Command):
            self._send_control(dealer, self._command(message))
        elif isinstance(message, ErrorMessage):
            log.warning("aggregator says: %s (%s)", message.message, message.code)

    def _command(self, command: Command) -> Result:
        if self.command_handler is None:
            return Result(command.id, self.node, False, {}, f"this agent does not support {command.op!r}")
        try:
            return self.command_handler(command)
        except XctlError as exc:
            return Result(command.id, self.node, False, {}, str(exc))


def _factory(spec: str, first: Probe) -> Callable[[], Probe]:
    """The first instance is the validated one; restarts get fresh instances."""
    handed: list[bool] = []

    def make() -> Probe:
        if not handed:
            handed.append(True)
            return first
        return make_probe(spec)

    return make
