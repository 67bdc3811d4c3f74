"""The node agent: probes → local graph → batched events over PUB, control over DEALER.

One thread (the one that calls :meth:`Agent.run`) owns both sockets and the local graph;
probes run in their own threads and hand events over through the supervisor's bounded
queue. Batches are flushed every ≤ 50 ms or ≤ 1000 events; an empty batch carrying the
last seq goes out every second as a heartbeat, so the aggregator notices a lost final batch.

With ``keys`` (:mod:`xctl.wire.curve`) both sockets are CURVE clients that check the
aggregator's server key. A socket monitor on each tells a refused handshake (our key not
listed, a wrong server.key, CURVE on one side only) from a silent aggregator: it is logged
as such, and since libzmq does not retry a connection refused by the aggregator's ZAP
handler, the agent reconnects that socket itself (2 s, backing off to 30 s), so adding the
key and reloading the aggregator lets it in without restarting the agent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import zmq
from zmq.utils.monitor import recv_monitor_message

from xctl import __version__
from xctl.agent.actuator import CTIME_TOLERANCE_S, Actuator, requester
from xctl.agent.sdnotify import Notifier
from xctl.agent.supervisor import Supervisor
from xctl.agent.wiring import GpuView, link
from xctl.core.clock import Clock
from xctl.core.errors import ProtocolError, XctlError
from xctl.core.events import Event, EventType
from xctl.core.graph import NodeGraph
from xctl.probes.base import Probe
from xctl.probes.registry import make_probe
from xctl.sysclock import mono_s, wall_ms
from xctl.wire.codec import CONTROL_MAX, EVENTS_MAX, DropCounter, pack
from xctl.wire.curve import HANDSHAKE_EVENTS, ClientKeys, chain, client_setup, handshake_failure, load_client_keys
from xctl.wire.framing import batch_frames, control_frames, read_control
from xctl.wire.messages import (
    Ack,
    Command,
    ErrorMessage,
    EventBatch,
    Heartbeat,
    Hello,
    Result,
    Snapshot,
    SnapshotReq,
)
from xctl.wire.sockets import Socket, SocketSetup, control_dealer, endpoints, events_pub

log = logging.getLogger(__name__)

FLUSH_MS: Final = 50
FLUSH_MAX: Final = 1000
HEARTBEAT_S: Final = 1.0
#: The aggregator is presumed gone (and hello is repeated) after this much control silence.
AGGREGATOR_SILENT_S: Final = 5.0
#: Commands executing at once; more are refused (each holds a worker thread for its grace period).
MAX_INFLIGHT_COMMANDS: Final = 32
COMMAND_POLL_MS: Final = 5
#: How long after a zap a probe's "exit" for one of its processes is recorded as "killed"
#: (a probe notices an exit up to one sample interval late), and how many pids are remembered.
ZAPPED_MEMORY_S: Final = 60.0
MAX_ZAPPED: Final = 8192
#: Reconnecting a socket whose handshake the aggregator refused: first wait, longest wait.
REFUSED_RETRY_S: Final = 2.0
REFUSED_RETRY_MAX_S: Final = 30.0

CommandHandler = Callable[[Command], Result]


@dataclass
class AgentConfig:
    node: str
    aggregator_host: str = "127.0.0.1"
    port: int = 7400
    probes: list[str] = field(default_factory=list)
    #: Probes that cannot run here (name → why), reported as disabled by `xctl nodes`.
    disabled_probes: dict[str, str] = field(default_factory=dict)
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
    #: CURVE keys: a directory with this node's key pair and the aggregator's server.key (or
    #: the NAME.key_secret file itself); None, or a directory with no key files: plaintext.
    keys: str | None = None


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
        #: Commands run on worker threads; their results come back here for the socket thread.
        self._results: queue.SimpleQueue[tuple[str, Command, Any]] = queue.SimpleQueue()
        self._inflight: dict[str, Command] = {}
        #: pid → (create_time, requested_by, command id, forget after (monotonic s)) of zapped processes.
        self._zapped: dict[int, tuple[float, str, str, float]] = {}
        self._context = context
        self._aggregator_start: str | None = None
        self._last_control_rx = 0.0
        self._control_generation = 0
        self._control_endpoint = ""
        self._events_endpoint = ""
        #: Secret part of our routing ids: nobody else can guess one to take it over.
        self._routing_token = secrets.token_hex(12)
        self.client_keys: ClientKeys | None = load_client_keys(config.keys, node=config.node) if config.keys else None
        if config.keys and self.client_keys is None:
            log.warning("--keys %s holds no key files: connecting to the aggregator in plaintext", config.keys)
        self._setup = chain(client_setup(self.client_keys) if self.client_keys else None, config.socket_setup)
        #: Socket monitors ("events", "control") and when a refused socket is reconnected.
        self._monitors: dict[str, Socket] = {}
        self._retry_at: dict[str, float] = {}
        self._retry_wait: dict[str, float] = {}
        self._refusal_logged: dict[str, float] = {}
        #: Control messages received (before any check), for the fuzz accounting in /metrics.
        self.control_received = 0
        self._notifier = Notifier() if config.systemd_notify else Notifier({})
        self.gpus = GpuView()
        for name, reason in config.disabled_probes.items():
            self.supervisor.add_disabled(name, reason)
        names: dict[str, int] = {}
        for spec in config.probes:
            probe = make_probe(spec)  # fail fast on a bad SPEC, before any thread starts
            name = probe.name
            names[name] = names.get(name, 0) + 1
            if names[name] > 1:
                name = f"{name}#{names[name]}"
            self.supervisor.add(name, _factory(spec, link(probe, self.gpus), self.gpus))

    # ---------------------------------------------------------------- lifecycle
    def request_stop(self) -> None:
        self.stop_event.set()
        self.supervisor.wake()

    def run(self) -> None:
        """Run until :meth:`request_stop`. Creates its sockets in this thread (after any fork)."""
        ctx = self._context or zmq.Context()
        eps = endpoints(self.config.aggregator_host, self.config.port)
        self._events_endpoint = eps.events
        pub = events_pub(ctx, eps.events, setup=self._watched("events"))
        self._control_endpoint = eps.control
        dealer = self._control_socket(ctx)
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
            dealer = self._loop(ctx, pub, dealer)
        finally:
            self._notifier.stopping()
            self._notifier.close()
            if metrics is not None:
                metrics.shutdown()
            self.supervisor.stop()
            self.supervisor.close()
            pub.close()
            dealer.close()
            for monitor in self._monitors.values():
                monitor.close(linger=0)
            self._monitors.clear()
            if self._context is None:
                ctx.term()
            log.info("agent %s stopped", self.node)

    def _control_socket(self, ctx: zmq.Context[Any]) -> zmq.Socket[bytes]:
        """A DEALER with a fresh routing id ``node/epoch/N/TOKEN`` (the aggregator routes by
        node; the secret token keeps anyone else from presenting a routing id of ours)."""
        self._control_generation += 1
        identity = f"{self.node}/{self.epoch}/{self._control_generation}/{self._routing_token}".encode()[:255]
        old = self._monitors.pop("control", None)
        if old is not None:
            old.close(linger=0)
        return control_dealer(ctx, self._control_endpoint, identity, setup=self._watched("control"))

    def _watched(self, name: str) -> SocketSetup:
        """The socket setup: CURVE keys, then a handshake monitor (before connect: none missed)."""

        def setup(sock: Socket) -> None:
            if self._setup is not None:
                self._setup(sock)
            self._monitors[name] = sock.get_monitor_socket(HANDSHAKE_EVENTS | zmq.EVENT_HANDSHAKE_SUCCEEDED)

        return setup

    def _on_monitor(self, name: str, monitor: Socket) -> None:
        """Handshake outcomes of socket ``name``: log a refusal clearly and schedule a retry."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, value = int(event["event"]), int(event["value"])
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._retry_wait.pop(name, None)
                continue
            why = handshake_failure(kind, value, curve=self.client_keys is not None)
            if why is None:
                continue
            self.drops.count("handshake_refused")
            now = mono_s()
            if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                continue  # libzmq retries these itself
            wait = min(self._retry_wait.get(name, REFUSED_RETRY_S / 2) * 2, REFUSED_RETRY_MAX_S)
            self._retry_wait[name] = wait
            self._retry_at.setdefault(name, now + wait)
            last = self._refusal_logged.get(name)
            if last is None or now - last >= REFUSED_RETRY_MAX_S:
                self._refusal_logged[name] = now
                keys = self.client_keys
                key = f" (key {keys.path}, public {keys.public_key})" if keys is not None else ""
                log.error(
                    "%s connection of node %s: %s%s; retrying in %.0f s", name, self.node, why, key, wait
                )

    def _retry_refused(self, pub: Socket) -> bool:
        """Reconnect the events socket if it is due; True when the control socket is due."""
        now = mono_s()
        due = self._retry_at.get("events")
        if due is not None and now >= due:
            del self._retry_at["events"]
            with contextlib.suppress(zmq.ZMQError):
                pub.disconnect(self._events_endpoint)
            with contextlib.suppress(zmq.ZMQError):
                pub.connect(self._events_endpoint)
        due = self._retry_at.get("control")
        if due is not None and now >= due:
            del self._retry_at["control"]
            return True
        return False

    def _loop(
        self, ctx: zmq.Context[Any], pub: zmq.Socket[bytes], dealer: zmq.Socket[bytes]
    ) -> zmq.Socket[bytes]:
        """Run until stopped; returns the control socket in use then (it may be replaced)."""
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        watched = dict(self._monitors)
        for monitor in watched.values():
            poller.register(monitor, zmq.POLLIN)
        wake = self.supervisor.wake_fd
        poller.register(wake, zmq.POLLIN)
        pending: list[Event] = []
        flush_s = self.config.flush_ms / 1000
        last_flush = last_beat = mono_s()
        while not self.stop_event.is_set():
            # Sleep until a probe has events, a control message comes, the pending batch is
            # due (≤ 50 ms) or the next heartbeat; running commands need a quick result poll.
            now = mono_s()
            due = last_beat + self.config.heartbeat_s
            if pending:
                due = min(due, last_flush + flush_s)
            wait_ms = max(1, int((due - now) * 1000))
            if self._inflight:
                wait_ms = min(wait_ms, COMMAND_POLL_MS)
            ready = dict(poller.poll(timeout=wait_ms))
            if wake in ready:
                self.supervisor.clear_wake()
            for name, monitor in watched.items():
                if monitor in ready:
                    self._on_monitor(name, monitor)
            if dealer in ready:
                self._drain_control(pub, dealer, pending)
            if self._inflight:
                self._drain_results(dealer, pending)
            for event in self._probe_events():
                self.graph.apply(event)
                pending.append(event)
            now = mono_s()
            if pending and (len(pending) >= self.config.flush_max or now - last_flush >= flush_s):
                self._flush(pub, pending)
                last_flush = now
            if now - last_beat >= self.config.heartbeat_s:
                last_beat = now
                silent = self._heartbeat(pub, dealer, idle=now - last_flush >= self.config.heartbeat_s)
                if self._retry_refused(pub) or silent:
                    # The aggregator went quiet (restarted, or a link that died without a FIN),
                    # or refused our handshake: a new connection under a new routing id.
                    poller.unregister(dealer)
                    old_monitor = watched.pop("control", None)
                    if old_monitor is not None:
                        poller.unregister(old_monitor)
                    dealer.close(linger=0)
                    dealer = self._control_socket(ctx)
                    poller.register(dealer, zmq.POLLIN)
                    watched["control"] = self._monitors["control"]
                    poller.register(watched["control"], zmq.POLLIN)
                    self._send_control(dealer, self._hello())
                self._notifier.watchdog()
                self.supervisor.check()
                self.graph.expire()
        for event in self._probe_events():
            self.graph.apply(event)
            pending.append(event)
        self._flush(pub, pending)
        return dealer

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

    def _heartbeat(self, pub: zmq.Socket[bytes], dealer: zmq.Socket[bytes], *, idle: bool) -> bool:
        """Send heartbeats; True when the control connection should be replaced."""
        if idle:
            try:
                pub.send_multipart(batch_frames(EventBatch(self.node, self.epoch, self.seq, self.clock())), zmq.NOBLOCK)
            except zmq.Again:
                self.drops.count("pub_hwm")
        self._send_control(
            dealer, Heartbeat(ts=self.clock(), node=self.node, epoch=self.epoch, seq=self.seq, probes=self._probes())
        )
        if self._last_control_rx and mono_s() - self._last_control_rx > AGGREGATOR_SILENT_S:
            log.info("aggregator silent for %.0f s: reconnecting the control channel", AGGREGATOR_SILENT_S)
            self._last_control_rx = mono_s()  # at most one reconnect per silence period
            return True
        return False

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
            self.control_received += 1
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
            for event in self._probe_events():
                self.graph.apply(event)
                pending.append(event)
            self._flush(pub, pending)
            snapshot = Snapshot(self.node, self.epoch, self.seq, message.req_id, tuple(self.graph.snapshot_events()))
            if len(pack(snapshot.to_dict())) > CONTROL_MAX:
                log.error("snapshot of %s exceeds %d bytes; aggregator view will be partial", self.node, CONTROL_MAX)
            self._send_control(dealer, snapshot)
        elif isinstance(message, Command):
            self._on_command(dealer, message)
        elif isinstance(message, ErrorMessage):
            now = mono_s()
            last = self._refusal_logged.get("error_message")
            if last is None or now - last >= 10.0:  # a flood of them must not flood the log
                self._refusal_logged["error_message"] = now
                log.warning("aggregator says: %s (%s)", message.message[:500], message.code[:40])

    # ---------------------------------------------------------------- commands
    def _on_command(self, dealer: zmq.Socket[bytes], command: Command) -> None:
        """Answer at once what needs no execution (a repeat, an expired command); else ack and
        run it on a worker thread: a zap waits out its grace period, the socket thread must not."""
        handler = self.command_handler
        if handler is None:
            self._send_control(
                dealer, Result(command.id, self.node, False, {}, f"this agent does not support {command.op!r}")
            )
            return
        if command.id in self._inflight:
            self._send_control(dealer, Ack(command.id, self.node))  # a repeat while it runs: still running
            return
        if isinstance(handler, Actuator):
            early = handler.precheck(command)
            if early is not None:
                self._send_control(dealer, early)
                return
        if len(self._inflight) >= MAX_INFLIGHT_COMMANDS:
            busy = f"{len(self._inflight)} commands already running on {self.node}: try again later"
            self._send_control(dealer, Result(command.id, self.node, False, {"outcome": "BUSY"}, busy))
            return
        self._send_control(dealer, Ack(command.id, self.node))
        self._inflight[command.id] = command
        gpu_held = self._gpu_held() if isinstance(handler, Actuator) else {}
        worker = threading.Thread(
            target=self._run_command, args=(handler, command, gpu_held), name=f"command-{command.id[:12]}", daemon=True
        )
        worker.start()

    def _run_command(self, handler: CommandHandler, command: Command, gpu_held: dict[int, Any]) -> None:
        """Worker thread: no socket, no graph here; the result goes back through the queue."""

        def on_signal(pids: list[tuple[int, float]]) -> None:
            self._results.put(("signalling", command, pids))

        try:
            if isinstance(handler, Actuator):
                result = handler.execute(command, gpu_held=gpu_held, on_signal=on_signal)
            else:
                result = handler(command)
        except XctlError as exc:
            result = Result(command.id, self.node, False, {}, str(exc))
        except Exception as exc:  # a broken handler must still answer
            log.exception("command %s failed", command.id)
            result = Result(command.id, self.node, False, {}, f"internal error: {type(exc).__name__}: {exc}")
        self._results.put(("result", command, result))

    def _drain_results(self, dealer: zmq.Socket[bytes], pending: list[Event]) -> None:
        """Socket thread: send the results the workers finished; apply their events to the graph.

        Runs before the probes' events are drained, so a process marked "signalling" here is
        known as zapped before any probe's report of its exit is applied."""
        while True:
            try:
                kind, command, payload = self._results.get_nowait()
            except queue.Empty:
                return
            if kind == "signalling":
                self._mark_zapped(command, payload, forget_after=float("inf"))
                continue
            result: Result = payload
            self._inflight.pop(command.id, None)
            self._send_control(dealer, result)
            handler = self.command_handler
            if not isinstance(handler, Actuator):
                continue
            members = [(r["pid"], r.get("create_time") or 0.0) for r in result.data.get("tree", []) if "pid" in r]
            self._mark_zapped(command, members, forget_after=mono_s() + ZAPPED_MEMORY_S)
            for event in handler.events(command, result):
                known = self._known_ctime(event)
                if known.type is EventType.PROCESS_STATE and self._already_ended(known):
                    continue  # a probe's exit for it was already recorded as killed
                self.graph.apply(known)
                pending.append(known)

    def _mark_zapped(self, command: Command, members: list[tuple[int, float]], *, forget_after: float) -> None:
        now = mono_s()
        for pid, ctime in members:
            if pid in self._zapped or len(self._zapped) < MAX_ZAPPED:
                self._zapped[pid] = (ctime, requester(command), command.id, forget_after)
        if len(self._zapped) >= MAX_ZAPPED:
            for pid in [p for p, v in self._zapped.items() if v[3] < now]:
                del self._zapped[pid]

    def _probe_events(self) -> list[Event]:
        """The probes' events; a probe's "exit" of a zapped process becomes "killed" (by whom)."""
        events = self.supervisor.drain()
        if not self._zapped:
            return events
        out = []
        for event in events:
            zapped = self._zapped.get(event.pid) if event.pid is not None else None
            if zapped is not None and event.type is EventType.PROCESS_STATE and event.value == "exit":
                ctime, by, command_id, forget_after = zapped
                seen = event.attrs.get("create_time")
                same = not isinstance(seen, int | float) or abs(seen - ctime) <= CTIME_TOLERANCE_S
                if same and mono_s() <= forget_after:
                    attrs = {**event.attrs, "by": by, "command_id": command_id}
                    out.append(Event(event.ts, event.type, event.entity, "killed", event.pid, event.job, attrs))
                    continue
            out.append(event)
        return out

    def _already_ended(self, event: Event) -> bool:
        """Whether the graph already holds ``event``'s process as ended (same create time)."""
        if event.pid is None or event.pid in self.graph.processes:
            return False
        proc = self.graph.find(event.pid)
        ctime = event.attrs.get("create_time")
        return (
            proc is not None
            and proc.create_time is not None
            and isinstance(ctime, int | float)
            and abs(proc.create_time - ctime) <= CTIME_TOLERANCE_S
        )

    def _gpu_held(self) -> dict[int, Any]:
        """pid → [(gpu, MiB)] of live processes the local graph sees using a GPU."""
        out: dict[int, Any] = {}
        for pid, proc in self.graph.processes.items():
            held = [(usage.entity, usage.mem_used_mib) for usage in proc.gpus()]
            if held:
                out[pid] = held
        return out

    def _known_ctime(self, event: Event) -> Event:
        """Use the create time the graph already has for this pid (the same process, within the
        tolerance), so a ``killed`` event ends that process instead of looking like a new one."""
        ctime = event.attrs.get("create_time")
        proc = self.graph.processes.get(event.pid) if event.pid is not None else None
        if (
            proc is None
            or proc.create_time is None
            or not isinstance(ctime, int | float)
            or abs(proc.create_time - ctime) > CTIME_TOLERANCE_S
        ):
            return event
        attrs = {**event.attrs, "create_time": proc.create_time}
        return Event(event.ts, event.type, event.entity, event.value, event.pid, event.job, attrs)


def _factory(spec: str, first: Probe, gpus: GpuView) -> Callable[[], Probe]:
    """The first instance is the validated one; restarts get fresh, linked instances."""
    handed: list[bool] = []

    def make() -> Probe:
        if not handed:
            handed.append(True)
            return first
        return link(make_probe(spec), gpus)

    return make
