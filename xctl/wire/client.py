"""The query client (CLI side): Lazy Pirate over REQ, so it never hangs.

One call of :meth:`QueryClient.request` makes at most ``retries + 1`` attempts. Each attempt
opens a *fresh* REQ socket (LINGER 0), sends the query, and waits for the reply; a socket
that timed out is closed, never reused (a REQ socket stuck waiting for a lost reply can
neither send nor be trusted again).

Timing: the whole call is bounded by ``timeout_s`` (plus the few milliseconds it takes to
make and close sockets). The budget is split evenly between the attempts —
``timeout_s / (retries + 1)`` each — and the last attempt gets whatever is left. So a
query the aggregator needs more than that share to answer is sent again (same request id,
so the aggregator can recognise the repeat); commands carry their own idempotency key.

A reply whose id does not match is logged and ends that attempt (a REQ socket accepts one
reply per request); the next attempt starts at once on a fresh socket. An *error* reply
with an empty id is the aggregator saying it could not read the request at all, and is
taken as the answer. A reply that is not valid protocol raises ProtocolError at once: the
aggregator is there, and retrying would not change what it says.

Refused handshakes: each REQ socket is watched by a socket monitor. When the aggregator's ZAP
handler refuses our key (EVENT_HANDSHAKE_FAILED_AUTH), or one side uses CURVE and the other
not, or our ``server.key`` is not the aggregator's, the call raises NotAuthorisedError at
once (exit 5) with what went wrong, instead of timing out as "unreachable".
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from types import TracebackType
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from xctl.core.errors import NotAuthorisedError, ProtocolError, UnreachableError, UsageError
from xctl.wire.codec import QUERY_MAX, REPLY_MAX, pack, unpack
from xctl.wire.curve import HANDSHAKE_EVENTS, ClientKeys, chain, client_setup, handshake_failure
from xctl.wire.messages import ErrorMessage, QueryReply, QueryRequest, decode_reply, exception_for
from xctl.wire.sockets import Context, Socket, SocketSetup, query_req

log = logging.getLogger(__name__)


class QueryClient:
    """Send queries to an aggregator's query port. Not thread-safe: one per thread.

    ``address`` is the ``tcp://host:port`` of the query port (P+2; see
    :func:`xctl.wire.sockets.endpoints`). When ``ctx`` is not given, the client makes its
    own context and terminates it on :meth:`close`. ``keys``: connect with CURVE (see
    :mod:`xctl.wire.curve`).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 2,
        ctx: Context | None = None,
        setup: SocketSetup | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise UsageError(f"timeout must be a positive number of seconds, got {timeout_s}")
        if retries < 0:
            raise UsageError(f"retries must be 0 or more, got {retries}")
        self.address = address
        self.timeout_s = float(timeout_s)
        self.retries = retries
        self.keys = keys
        self._setup = chain(client_setup(keys) if keys is not None else None, setup)
        self._own_ctx = ctx is None
        self._ctx: Context = zmq.Context() if ctx is None else ctx
        self._closed = False

    def request(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Ask ``op`` with ``args``; return the reply's ``data`` or raise.

        Raises the XctlError subclass matching an error reply's code (NotFoundError,
        UsageError, TargetError, NotAuthorisedError, ProtocolError, else XctlError with the
        reply's code), or UnreachableError when no attempt got an answer in time.
        """
        if self._closed:
            raise UsageError("query client is closed")
        if not isinstance(op, str) or not op:
            raise UsageError("query op must be a non-empty string")
        req = QueryRequest(id=uuid.uuid4().hex, op=op, args=dict(args or {}))
        payload = pack(req.to_dict())
        if len(payload) > QUERY_MAX:
            raise UsageError(f"query {op!r} is {len(payload)} bytes, more than the limit of {QUERY_MAX}")

        attempts = self.retries + 1
        share = self.timeout_s / attempts
        deadline = time.monotonic() + self.timeout_s
        tried = 0
        mismatched = 0
        for attempt in range(1, attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait_s = remaining if attempt == attempts else min(share, remaining)
            tried += 1
            reply = self._attempt(payload, wait_s)
            if reply is None:
                log.debug(
                    "query %s %s: no answer from %s in %.2fs (attempt %d/%d)",
                    op,
                    req.id,
                    self.address,
                    wait_s,
                    attempt,
                    attempts,
                )
                continue
            if reply.id != req.id and not (reply.id == "" and not reply.ok):
                mismatched += 1
                log.warning("query %s: ignoring a reply for request %r (expected %r)", op, reply.id[:40], req.id)
                continue
            if reply.ok:
                return reply.data
            raise exception_for(reply.error or ErrorMessage("ERROR", "error reply without details"))

        extra = f"; {mismatched} replies for other requests were ignored" if mismatched else ""
        raise UnreachableError(
            f"aggregator at {self.address} did not answer within {self.timeout_s:g}s "
            f"(tried {tried} time{'s' if tried != 1 else ''}{extra}): is it running? "
            "Check --aggregator / XCTL_AGGREGATOR and that the port is reachable from here."
        )

    def _attempt(self, payload: bytes, wait_s: float) -> QueryReply | None:
        """One send/wait on a fresh REQ socket; ``None`` when nothing came back in time."""
        monitors: list[Socket] = []

        def setup(sock: Socket) -> None:
            if self._setup is not None:
                self._setup(sock)
            # Before connect, so no handshake event is missed.
            monitors.append(sock.get_monitor_socket(HANDSHAKE_EVENTS))

        try:
            sock = query_req(self._ctx, self.address, setup=setup)
        except BaseException:
            for mon in monitors:
                mon.close(linger=0)
            raise
        monitor = monitors[0]
        try:
            try:
                sock.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                return None
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            deadline = time.monotonic() + wait_s
            while True:
                left_ms = round((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    return None
                ready = dict(poller.poll(max(1, left_ms)))
                if monitor in ready:
                    self._check_handshake(monitor)
                if sock in ready:
                    break
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            raise UnreachableError(f"query to {self.address} failed: {exc.strerror}") from exc
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
        if len(frames) != 1:
            raise ProtocolError("bad_frame", f"reply from {self.address}: expected 1 frame, got {len(frames)}")
        return decode_reply(unpack(frames[0], limit=REPLY_MAX))

    def _check_handshake(self, monitor: Socket) -> None:
        """Raise NotAuthorisedError for a handshake the aggregator refused (see the module doc)."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            why = handshake_failure(int(event["event"]), int(event["value"]), curve=self.keys is not None)
            if why is not None:
                hint = ""
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and self.keys is not None:
                    hint = (
                        f" (your key {self.keys.path.name}, public key {self.keys.public_key}: an admin adds its "
                        ".key file to the aggregator's operators/ or admins/ list and sends it SIGHUP)"
                    )
                raise NotAuthorisedError(f"{why} (aggregator at {self.address}){hint}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
