"""Socket factory: addresses, endpoints, options, and real round trips on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from waiting import wait_for

from xctl.core.errors import UsageError, XctlError
from xctl.core.events import Event, EventType
from xctl.wire.codec import CONTROL_MAX, EVENTS_MAX, QUERY_MAX, REPLY_MAX
from xctl.wire.framing import batch_frames, control_frames, read_batch, read_control
from xctl.wire.messages import EventBatch, Hello
from xctl.wire.sockets import (
    Endpoints,
    control_dealer,
    control_router,
    endpoints,
    events_pub,
    events_sub,
    parse_address,
    query_req,
    query_router,
    tcp_endpoint,
)

ANY_PORT = "tcp://127.0.0.1:*"


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def bound(sock: zmq.Socket[bytes]) -> str:
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    return endpoint.decode()


def opt(sock: zmq.Socket[bytes], option: int) -> int:
    value = sock.getsockopt(option)
    assert isinstance(value, int)
    return value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node3", ("node3", 7400)),
        ("node3:7500", ("node3", 7500)),
        ("  10.0.0.1:9  ", ("10.0.0.1", 9)),
        ("tcp://head.example.org:7400", ("head.example.org", 7400)),
        ("[::1]", ("::1", 7400)),
        ("[fd00::1]:7500", ("fd00::1", 7500)),
        ("fe80::1", ("fe80::1", 7400)),
        ("*:7400", ("*", 7400)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


def test_parse_address_default_port() -> None:
    assert parse_address("node3", default_port=9000) == ("node3", 9000)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty address"),
        ("   ", "empty address"),
        ("a b", "not a valid host name"),
        (":7400", "not a valid host name"),
        ("node3:", "is not a number"),
        ("node3:abc", "is not a number"),
        ("node3:٣", "is not a number"),
        ("node3:0", "out of range"),
        ("node3:65536", "out of range"),
        ("[::1", "missing ']'"),
        ("[::1]7400", "unexpected"),
        ("[nope]:7400", "not a valid IPv6 address"),
        ("1:2:3", "not a valid IPv6 address"),
    ],
)
def test_parse_address_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_address(text)
    assert "HOST[:PORT]" in str(info.value) or "range" in str(info.value)


def test_endpoints() -> None:
    assert endpoints("10.0.0.1", 7400) == Endpoints(
        events="tcp://10.0.0.1:7400", control="tcp://10.0.0.1:7401", query="tcp://10.0.0.1:7402"
    )
    assert endpoints("::1", 7400).query == "tcp://[::1]:7402"
    assert endpoints("*", 1).control == "tcp://*:2"
    assert tcp_endpoint("fd00::1", 5) == "tcp://[fd00::1]:5"


@pytest.mark.parametrize("port", [0, -1, 65534, 70000])
def test_endpoints_port_range(port: int) -> None:
    with pytest.raises(UsageError, match="out of range"):
        endpoints("h", port)


def test_socket_options(ctx: zmq.Context[Any]) -> None:
    sub = events_sub(ctx, ANY_PORT)
    router = control_router(ctx, ANY_PORT)
    queries = query_router(ctx, ANY_PORT)
    pub = events_pub(ctx, bound(sub))
    dealer = control_dealer(ctx, bound(router), b"node3/e1")
    req = query_req(ctx, bound(queries))

    assert sub.getsockopt(zmq.MAXMSGSIZE) == EVENTS_MAX
    assert router.getsockopt(zmq.MAXMSGSIZE) == CONTROL_MAX
    assert dealer.getsockopt(zmq.MAXMSGSIZE) == CONTROL_MAX
    assert queries.getsockopt(zmq.MAXMSGSIZE) == QUERY_MAX
    assert req.getsockopt(zmq.MAXMSGSIZE) == REPLY_MAX
    assert req.getsockopt(zmq.LINGER) == 0
    for daemon in (sub, router, queries, pub, dealer):
        assert 0 < opt(daemon, zmq.LINGER) <= 500
    for sock in (sub, router, queries, pub, dealer, req):
        assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
        assert sock.getsockopt(zmq.RECONNECT_IVL) == 100
        assert sock.getsockopt(zmq.RECONNECT_IVL_MAX) == 2000
        assert opt(sock, zmq.SNDHWM) > 0
        assert opt(sock, zmq.RCVHWM) > 0
    assert dealer.getsockopt(zmq.ROUTING_ID) == b"node3/e1"


def test_setup_hook_runs_before_bind(ctx: zmq.Context[Any]) -> None:
    seen: list[int] = []

    def setup(sock: zmq.Socket[bytes]) -> None:
        seen.append(sock.getsockopt(zmq.TYPE))  # type: ignore[arg-type]

    sock = query_router(ctx, ANY_PORT, setup=setup)
    assert seen == [zmq.ROUTER]
    sock.close()


def test_address_in_use_is_a_clear_error(ctx: zmq.Context[Any]) -> None:
    first = control_router(ctx, ANY_PORT)
    with pytest.raises(XctlError, match="address already in use"):
        control_router(ctx, bound(first))


def test_invalid_endpoint_is_usage_error(ctx: zmq.Context[Any]) -> None:
    with pytest.raises(UsageError):
        query_req(ctx, "tcp://no such host")
    with pytest.raises(UsageError, match="not an address or interface of this host"):
        query_router(ctx, "tcp://300.1.1.1:5")
    with pytest.raises(UsageError, match="not an address or interface of this host"):
        query_router(ctx, "tcp://192.0.2.1:5")  # TEST-NET-1, never local


@pytest.mark.parametrize("identity", [b"", b"\x00node", b"x" * 256])
def test_bad_routing_id(ctx: zmq.Context[Any], identity: bytes) -> None:
    with pytest.raises(UsageError, match="routing id"):
        control_dealer(ctx, "tcp://127.0.0.1:1", identity)


def test_control_round_trip_and_router_mandatory(ctx: zmq.Context[Any]) -> None:
    router = control_router(ctx, ANY_PORT)
    dealer = control_dealer(ctx, bound(router), b"node3/e1")
    hello = Hello(node="node3", epoch="e1", version="0.1", probes=("sim",), pid=1)
    dealer.send_multipart(control_frames(hello))
    assert router.poll(5000)
    rid, payload = router.recv_multipart()
    assert rid == b"node3/e1"
    assert read_control(payload) == hello

    router.send_multipart(control_frames(hello, rid))
    assert dealer.poll(5000)
    assert read_control(dealer.recv()) == hello

    with pytest.raises(zmq.ZMQError) as info:
        router.send_multipart(control_frames(hello, b"node9/e1"))
    assert info.value.errno == zmq.EHOSTUNREACH


def test_events_pub_sub_round_trip(ctx: zmq.Context[Any]) -> None:
    sub = events_sub(ctx, ANY_PORT)
    pub = events_pub(ctx, bound(sub))
    event = Event(ts=1, type=EventType.COMPUTE_UTIL, entity="gpu-0", value="5")
    batch = EventBatch(node="n", epoch="e", seq=0, sent_ts=1, events=(event,))
    # PUB drops until the subscription has arrived: publish until the first one lands.
    def landed() -> int:
        pub.send_multipart(batch_frames(batch))
        return sub.poll(20)

    wait_for(landed, timeout=5, what="a batch to arrive", interval=0)
    received, rejects = read_batch(sub.recv_multipart())
    assert received == batch
    assert not rejects


def test_ipv6_loopback(ctx: zmq.Context[Any]) -> None:
    try:
        router = query_router(ctx, "tcp://[::1]:*")
    except XctlError:
        pytest.skip("no IPv6 loopback here")
    assert bound(router).startswith("tcp://[::1]:")
    req = query_req(ctx, bound(router))
    req.send(b"hi")
    assert router.poll(5000)
    assert router.recv_multipart()[-1] == b"hi"
