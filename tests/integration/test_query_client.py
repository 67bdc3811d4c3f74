"""QueryClient against a real ROUTER in a thread, on 127.0.0.1 (no mocks, no sleeps)."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import zmq

from xctl.core.errors import (
    NotAuthorisedError,
    NotFoundError,
    ProtocolError,
    TargetError,
    UnreachableError,
    UsageError,
    XctlError,
)
from xctl.wire.client import QueryClient
from xctl.wire.codec import QUERY_MAX, pack, unpack
from xctl.wire.framing import read_query, reply_frames, split_envelope
from xctl.wire.messages import QueryReply, QueryRequest, decode_reply, error_reply, ok_reply
from xctl.wire.sockets import query_router


@dataclass
class Seen:
    envelope: list[bytes]
    request: QueryRequest | None
    error: XctlError | None = None


#: handler(n, seen) -> a reply, raw payload or frames to send back (after the envelope), or None
#: to stay silent. ``n`` counts requests from 1.
Handler = Callable[[int, Seen], list[bytes] | bytes | QueryReply | None]


class Server:
    """A query ROUTER owned by its own thread (sockets are never shared between threads)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen: list[Seen] = []
        self._stop = threading.Event()
        self._ready: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fake-aggregator", daemon=True)
        self._thread.start()
        self.address = self._ready.get(timeout=5)

    def _run(self) -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        sock = query_router(ctx, "tcp://127.0.0.1:*")
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(endpoint, bytes)
        self._ready.put(endpoint.decode())
        try:
            while not self._stop.is_set():
                if not sock.poll(10):
                    continue
                envelope, payload = split_envelope(sock.recv_multipart())
                try:
                    seen = Seen(envelope, read_query(payload))
                except XctlError as exc:
                    seen = Seen(envelope, None, exc)
                self.seen.append(seen)
                answer = self.handler(len(self.seen), seen)
                if answer is None:
                    continue
                if isinstance(answer, QueryReply):
                    sock.send_multipart(reply_frames(envelope, answer))
                elif isinstance(answer, bytes):
                    sock.send_multipart([*envelope, b"", answer])
                else:
                    sock.send_multipart([*envelope, b"", *answer])
        finally:
            sock.close(linger=0)
            ctx.term()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], Server]]:
    servers: list[Server] = []

    def start(handler: Handler) -> Server:
        server = Server(handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def echo(_n: int, seen: Seen) -> QueryReply:
    assert seen.request is not None
    return ok_reply(seen.request.id, {"op": seen.request.op, "args": seen.request.args})


def closed_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening (bound once by us, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --------------------------------------------------------------------------------------


def test_request_returns_data(serve: Callable[[Handler], Server]) -> None:
    server = serve(echo)
    with QueryClient(server.address, timeout_s=5) as client:
        assert client.request("ps", {"node": "node3"}) == {"op": "ps", "args": {"node": "node3"}}
        assert client.request("nodes") == {"op": "nodes", "args": {}}
    assert len(server.seen) == 2
    ids = [s.request.id for s in server.seen if s.request]
    assert len(set(ids)) == 2
    assert all(len(i) == 32 for i in ids)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (NotFoundError("no process 4812 on node3"), NotFoundError),
        (UsageError("unknown op 'psx'"), UsageError),
        (TargetError("'x:y': pid must be a number"), TargetError),
        (NotAuthorisedError("zap requires an admin key"), NotAuthorisedError),
        (ProtocolError("version", "peer speaks protocol v2, this xctl speaks v1"), ProtocolError),
        (XctlError("something broke"), XctlError),
    ],
)
def test_error_reply_raises_matching_exception(
    serve: Callable[[Handler], Server], exc: XctlError, expected: type[XctlError]
) -> None:
    def fail(_n: int, seen: Seen) -> QueryReply:
        assert seen.request is not None
        return error_reply(seen.request.id, exc)

    server = serve(fail)
    with QueryClient(server.address, timeout_s=5) as client, pytest.raises(expected) as info:
        client.request("why", {"target": "node3:4812"})
    assert type(info.value) is expected
    assert str(info.value) == str(exc)
    assert len(server.seen) == 1  # an error is an answer: no retry


def test_unknown_error_code_keeps_code(serve: Callable[[Handler], Server]) -> None:
    def fail(_n: int, seen: Seen) -> bytes:
        assert seen.request is not None
        reply = {"v": 1, "id": seen.request.id, "ok": False, "error": {"code": "TIMEOUT", "message": "late"}}
        return pack(reply)

    server = serve(fail)
    with QueryClient(server.address) as client, pytest.raises(XctlError) as info:
        client.request("zap")
    assert info.value.code == "TIMEOUT"


def test_no_server_is_unreachable_within_timeout() -> None:
    address = f"tcp://127.0.0.1:{closed_port()}"
    timeout = 0.6
    with QueryClient(address, timeout_s=timeout, retries=2) as client:
        start = time.monotonic()
        with pytest.raises(UnreachableError) as info:
            client.request("ps")
        elapsed = time.monotonic() - start
    assert elapsed < timeout + 0.5
    assert elapsed >= timeout * 0.9  # it did wait, it did not give up early
    message = str(info.value)
    assert address in message
    assert "within 0.6s" in message
    assert "tried 3 times" in message
    assert "is it running?" in message
    assert info.value.exit_code == 3


def test_silent_server_is_unreachable_and_each_attempt_uses_a_fresh_socket(
    serve: Callable[[Handler], Server],
) -> None:
    server = serve(lambda _n, _seen: None)
    with QueryClient(server.address, timeout_s=0.6, retries=2) as client:
        start = time.monotonic()
        with pytest.raises(UnreachableError):
            client.request("ps")
        assert time.monotonic() - start < 0.6 + 0.5
    assert len(server.seen) == 3
    assert len({s.envelope[0] for s in server.seen}) == 3  # three distinct REQ sockets
    assert len({s.request.id for s in server.seen if s.request}) == 1  # one request, retried


def test_answer_to_second_attempt_succeeds(serve: Callable[[Handler], Server]) -> None:
    server = serve(lambda n, seen: None if n == 1 else echo(n, seen))
    with QueryClient(server.address, timeout_s=1.5, retries=2) as client:
        start = time.monotonic()
        assert client.request("health") == {"op": "health", "args": {}}
        assert time.monotonic() - start < 1.5
    assert len(server.seen) == 2
    first, second = server.seen
    assert first.envelope != second.envelope  # a fresh socket
    assert first.request is not None
    assert second.request is not None
    assert first.request.id == second.request.id


def test_reply_with_wrong_id_is_ignored(serve: Callable[[Handler], Server]) -> None:
    def wrong_then_right(n: int, seen: Seen) -> QueryReply:
        assert seen.request is not None
        return ok_reply("not-" + seen.request.id if n == 1 else seen.request.id, {"n": n})

    server = serve(wrong_then_right)
    with QueryClient(server.address, timeout_s=3, retries=2) as client:
        assert client.request("ps") == {"n": 2}
    assert len(server.seen) == 2


def test_only_wrong_ids_is_unreachable_and_says_so(serve: Callable[[Handler], Server]) -> None:
    server = serve(lambda n, _seen: ok_reply(f"other-{n}", None))
    with QueryClient(server.address, timeout_s=2, retries=1) as client, pytest.raises(UnreachableError) as info:
        client.request("ps")
    assert "2 replies for other requests were ignored" in str(info.value)
    assert len(server.seen) == 2


def test_error_reply_with_empty_id_is_the_answer(serve: Callable[[Handler], Server]) -> None:
    server = serve(lambda _n, _seen: error_reply("", ProtocolError("bad_schema", "op: missing")))
    with QueryClient(server.address, timeout_s=2) as client, pytest.raises(ProtocolError, match="op: missing"):
        client.request("ps")
    assert len(server.seen) == 1


def test_garbage_reply_is_a_protocol_error(serve: Callable[[Handler], Server]) -> None:
    server = serve(lambda _n, _seen: b"\xc1garbage")
    with QueryClient(server.address, timeout_s=2) as client, pytest.raises(ProtocolError) as info:
        client.request("ps")
    assert info.value.reason == "bad_msgpack"


def test_multi_frame_reply_is_a_protocol_error(serve: Callable[[Handler], Server]) -> None:
    server = serve(lambda _n, _seen: [pack({}), pack({})])
    with QueryClient(server.address, timeout_s=2) as client, pytest.raises(ProtocolError) as info:
        client.request("ps")
    assert info.value.reason == "bad_frame"


def test_newer_aggregator_gives_version_error(serve: Callable[[Handler], Server]) -> None:
    def v2(_n: int, seen: Seen) -> bytes:
        assert seen.request is not None
        return pack({"v": 2, "id": seen.request.id, "ok": True, "result": {}})

    server = serve(v2)
    with QueryClient(server.address, timeout_s=2) as client, pytest.raises(ProtocolError) as info:
        client.request("ps")
    assert info.value.reason == "version"
    assert "peer speaks protocol v2" in str(info.value)


def test_query_too_large_is_refused_before_sending() -> None:
    with QueryClient(f"tcp://127.0.0.1:{closed_port()}", timeout_s=5) as client:
        start = time.monotonic()
        with pytest.raises(UsageError, match="more than the limit"):
            client.request("events", {"blob": "x" * QUERY_MAX})
        assert time.monotonic() - start < 0.5


def test_usage_errors() -> None:
    with pytest.raises(UsageError):
        QueryClient("tcp://127.0.0.1:1", timeout_s=0)
    with pytest.raises(UsageError):
        QueryClient("tcp://127.0.0.1:1", retries=-1)
    client = QueryClient("tcp://127.0.0.1:1")
    with pytest.raises(UsageError):
        client.request("")
    client.close()
    client.close()  # idempotent
    with pytest.raises(UsageError, match="closed"):
        client.request("ps")


def test_shared_context_is_not_terminated(serve: Callable[[Handler], Server]) -> None:
    server = serve(echo)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with QueryClient(server.address, ctx=ctx) as client:
            client.request("ps")
        assert not ctx.closed
    finally:
        ctx.term()


def test_unreadable_query_gets_an_error_reply_from_a_well_behaved_server(
    serve: Callable[[Handler], Server],
) -> None:
    """The server side of the contract, with the framing helpers: garbage in, error out."""

    def strict(_n: int, seen: Seen) -> QueryReply:
        if seen.error is not None:
            return error_reply("", seen.error)
        assert seen.request is not None
        return ok_reply(seen.request.id, "fine")

    server = serve(strict)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(server.address)
        req.send(pack({"v": 1, "id": "x"}))  # no op
        assert req.poll(5000)
        client_side = req.recv()
        req.close()
    finally:
        ctx.term()
    reply = decode_reply(unpack(client_side, limit=1 << 20))
    assert reply.ok is False
    assert reply.error is not None
    assert reply.error.code == "PROTOCOL"
    assert reply.error.message.startswith("op: missing")
