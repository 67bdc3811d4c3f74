"""ZeroMQ socket factory: every xctl socket is made here, with consistent options.

Ports from one base P (DESIGN §6): P events (aggregator SUB binds, agents PUB connect),
P+1 control (aggregator ROUTER binds, agent DEALER connects), P+2 queries (aggregator
ROUTER binds, CLI REQ connects).

Options, per role:

- LINGER: 0 for the CLI (a dead aggregator never holds it up), 200 ms for daemons (a
  final result or reply gets a chance to leave; shutdown never hangs).
- MAXMSGSIZE on every receiving socket (events 1 MiB, control 4 MiB, queries 64 KiB,
  replies 16 MiB): libzmq drops the *connection* of a peer that sends a larger frame, so
  senders must keep their frames under the limit (split batches).
- Send/receive high-water marks bound every queue.
- Connecting sockets reconnect after 100 ms, backing off to 2 s.
- TCP keepalive (idle 30 s, 3 probes 10 s apart) on every socket, and ZMTP heartbeats on
  the control pair, so a peer host that vanished without closing its connections is noticed.
  (Not on the event stream: a PING queued behind megabytes of events would time out a
  healthy but busy link.)
- ROUTER_MANDATORY on the control ROUTER: sending to an absent node fails at once
  (``zmq.ZMQError`` with ``errno == zmq.EHOSTUNREACH``) instead of vanishing.
- ROUTER_HANDOVER off (explicitly) on both ROUTERs: a second connection presenting a routing
  id already in use is refused, so it cannot take over another peer's messages.

Every factory takes ``setup``, called on the new socket before bind/connect: that is where
the CURVE layer (:mod:`xctl.wire.curve`) sets keys. A socket whose bind/connect fails is
closed before the error is raised.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import zmq

from xctl.core.errors import UsageError, XctlError
from xctl.wire.codec import CONTROL_MAX, EVENTS_MAX, QUERY_MAX, REPLY_MAX

log = logging.getLogger(__name__)

Socket = zmq.Socket[bytes]
Context = zmq.Context[Any]
SocketSetup = Callable[[Socket], None]

DEFAULT_PORT: Final = 7400
#: Topic frame of event batches: multipart [EVENTS_TOPIC, pack(batch)].
EVENTS_TOPIC: Final = b"ev"

CLIENT_LINGER_MS: Final = 0
DAEMON_LINGER_MS: Final = 200
RECONNECT_IVL_MS: Final = 100
RECONNECT_IVL_MAX_MS: Final = 2000
KEEPALIVE_IDLE_S: Final = 30
KEEPALIVE_INTVL_S: Final = 10
KEEPALIVE_CNT: Final = 3
CONTROL_HEARTBEAT_IVL_MS: Final = 2000
CONTROL_HEARTBEAT_TIMEOUT_MS: Final = 10_000

#: High-water marks, in messages. An event batch is ≤ 1000 events: the agent can hold
#: ~50 s of batches at its 50 ms flush; the aggregator one second of 1000 busy agents.
EVENTS_PUB_HWM: Final = 1000
EVENTS_SUB_HWM: Final = 50_000
CONTROL_HWM: Final = 10_000
QUERY_HWM: Final = 1000

_HOSTNAME = re.compile(r"^(\*|[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252}))$")


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The three ``tcp://`` endpoints of one port base."""

    events: str
    control: str
    query: str


def tcp_endpoint(host: str, port: int) -> str:
    """``tcp://host:port``, with an IPv6 literal in brackets."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def endpoints(host: str, port_base: int) -> Endpoints:
    """Endpoints at ``port_base`` (events), +1 (control), +2 (queries). ``host`` may be ``*``."""
    if not 0 < port_base <= 65535 - 2:
        raise UsageError(f"port {port_base} is out of range: the base port P needs P, P+1 and P+2 (1-65533)")
    return Endpoints(
        events=tcp_endpoint(host, port_base),
        control=tcp_endpoint(host, port_base + 1),
        query=tcp_endpoint(host, port_base + 2),
    )


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Parse ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` (or a bare IPv6 literal).

    A leading ``tcp://`` is tolerated. Raises :class:`UsageError` saying what is wrong.
    """
    raw = text.strip()
    raw = raw.removeprefix("tcp://")
    usage = "use HOST[:PORT], e.g. node0 or 10.0.0.1:7400 or [fd00::1]:7400"
    if not raw:
        raise UsageError(f"empty address: {usage}")
    port_text: str | None = None
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise UsageError(f"{text!r}: missing ']' after the IPv6 address ({usage})")
        host, rest = raw[1:end], raw[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"{text!r}: unexpected {rest!r} after ']' ({usage})")
            port_text = rest[1:]
        _check_ipv6(host, text, usage)
    elif raw.count(":") > 1:
        host = raw  # a bare IPv6 literal: no port can be told apart from it
        _check_ipv6(host, text, usage)
    else:
        host, sep, after = raw.partition(":")
        port_text = after if sep else None
        if not _HOSTNAME.match(host):
            raise UsageError(f"{text!r}: {host!r} is not a valid host name or address ({usage})")
    if port_text is None:
        return host, default_port
    if not port_text.isascii() or not port_text.isdigit():
        raise UsageError(f"{text!r}: port {port_text!r} is not a number ({usage})")
    port = int(port_text)
    if not 0 < port <= 65535:
        raise UsageError(f"{text!r}: port {port} is out of range (1-65535)")
    return host, port


def _check_ipv6(host: str, text: str, usage: str) -> None:
    if host in ("*", "::"):
        return
    try:
        ipaddress.IPv6Address(host)
    except ValueError as exc:
        raise UsageError(f"{text!r}: {host!r} is not a valid IPv6 address ({usage})") from exc


# --------------------------------------------------------------------------------------


def _make(
    ctx: Context,
    kind: int,
    *,
    linger: int,
    maxmsgsize: int | None,
    hwm: int,
    endpoint: str,
    setup: SocketSetup | None,
) -> Socket:
    sock: Socket = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, linger)
        if maxmsgsize is not None:
            sock.setsockopt(zmq.MAXMSGSIZE, maxmsgsize)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTVL_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_CNT)
        if "[" in endpoint:
            sock.setsockopt(zmq.IPV6, 1)
        if setup is not None:
            setup(sock)
    except BaseException:
        sock.close(0)
        raise
    return sock


def _heartbeats(sock: Socket) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, CONTROL_HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, CONTROL_HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, CONTROL_HEARTBEAT_TIMEOUT_MS)


def _bind(sock: Socket, endpoint: str, what: str) -> Socket:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        if exc.errno == zmq.EADDRINUSE:
            raise XctlError(
                f"cannot listen for {what} on {endpoint}: address already in use "
                "(is another aggregator running? pick another --port)"
            ) from exc
        if exc.errno == zmq.EINVAL:
            raise UsageError(f"cannot listen for {what} on {endpoint}: invalid address") from exc
        if exc.errno in (errno.ENODEV, errno.EADDRNOTAVAIL):
            raise UsageError(
                f"cannot listen for {what} on {endpoint}: not an address or interface of this host"
            ) from exc
        raise XctlError(f"cannot listen for {what} on {endpoint}: {exc.strerror}") from exc
    log.debug("%s bound to %s", what, endpoint)
    return sock


def _connect(sock: Socket, endpoint: str, what: str) -> Socket:
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise UsageError(f"cannot connect {what} to {endpoint}: {exc.strerror}") from exc
    log.debug("%s connecting to %s", what, endpoint)
    return sock


def events_sub(ctx: Context, bind: str, *, setup: SocketSetup | None = None) -> Socket:
    """Aggregator: SUB bound on the events port, subscribed to event batches."""
    sock = _make(
        ctx, zmq.SUB, linger=DAEMON_LINGER_MS, maxmsgsize=EVENTS_MAX, hwm=EVENTS_SUB_HWM, endpoint=bind, setup=setup
    )
    sock.setsockopt(zmq.SUBSCRIBE, EVENTS_TOPIC)
    return _bind(sock, bind, "events")


def events_pub(ctx: Context, connect: str, *, setup: SocketSetup | None = None) -> Socket:
    """Agent: PUB connecting to the aggregator's events port (drops when the HWM is reached)."""
    sock = _make(
        ctx, zmq.PUB, linger=DAEMON_LINGER_MS, maxmsgsize=None, hwm=EVENTS_PUB_HWM, endpoint=connect, setup=setup
    )
    return _connect(sock, connect, "events publisher")


def control_router(ctx: Context, bind: str, *, setup: SocketSetup | None = None) -> Socket:
    """Aggregator: ROUTER bound on the control port, ROUTER_MANDATORY, ZMTP heartbeats."""
    sock = _make(
        ctx, zmq.ROUTER, linger=DAEMON_LINGER_MS, maxmsgsize=CONTROL_MAX, hwm=CONTROL_HWM, endpoint=bind, setup=setup
    )
    try:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        _heartbeats(sock)
    except BaseException:
        sock.close(0)
        raise
    return _bind(sock, bind, "control")


def control_dealer(ctx: Context, connect: str, identity: bytes, *, setup: SocketSetup | None = None) -> Socket:
    """Agent: DEALER with routing id ``identity`` (``node/epoch``) connecting to control."""
    if not identity or len(identity) > 255 or identity[:1] == b"\x00":
        raise UsageError("routing id must be 1-255 bytes and must not start with a zero byte")
    sock = _make(
        ctx, zmq.DEALER, linger=DAEMON_LINGER_MS, maxmsgsize=CONTROL_MAX, hwm=CONTROL_HWM, endpoint=connect, setup=setup
    )
    try:
        sock.setsockopt(zmq.ROUTING_ID, identity)
        _heartbeats(sock)
    except BaseException:
        sock.close(0)
        raise
    return _connect(sock, connect, "control")


def query_router(ctx: Context, bind: str, *, setup: SocketSetup | None = None) -> Socket:
    """Aggregator: ROUTER bound on the query port (replies to vanished clients are dropped)."""
    sock = _make(
        ctx, zmq.ROUTER, linger=DAEMON_LINGER_MS, maxmsgsize=QUERY_MAX, hwm=QUERY_HWM, endpoint=bind, setup=setup
    )
    try:
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
    except BaseException:
        sock.close(0)
        raise
    return _bind(sock, bind, "queries")


def query_req(ctx: Context, connect: str, *, setup: SocketSetup | None = None) -> Socket:
    """CLI: REQ connecting to the query port, LINGER 0. Use one per attempt (Lazy Pirate)."""
    sock = _make(
        ctx, zmq.REQ, linger=CLIENT_LINGER_MS, maxmsgsize=REPLY_MAX, hwm=QUERY_HWM, endpoint=connect, setup=setup
    )
    return _connect(sock, connect, "query client")
