"""Message schemas: round trips, field-naming schema errors, versions, partial batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from xctl.core.errors import (
    EventError,
    NotAuthorisedError,
    NotFoundError,
    ProtocolError,
    TargetError,
    UsageError,
    XctlError,
)
from xctl.core.events import Event, EventType
from xctl.wire.codec import CONTROL_MAX, EVENTS_MAX, REPLY_MAX, pack, unpack
from xctl.wire.framing import (
    batch_frames,
    control_frames,
    read_batch,
    read_control,
    read_query,
    reply_frames,
    split_envelope,
)
from xctl.wire.messages import (
    MAX_BATCH_EVENTS,
    MAX_REJECT_DETAIL,
    Ack,
    Command,
    ErrorMessage,
    EventBatch,
    Heartbeat,
    Hello,
    QueryReply,
    QueryRequest,
    Result,
    Snapshot,
    SnapshotReq,
    decode_batch,
    decode_control,
    decode_query,
    decode_reply,
    error_reply,
    exception_for,
    ok_reply,
)

E1 = Event(ts=1_732_350_000_123, type=EventType.COMPUTE_UTIL, entity="gpu-3", value="85", pid=4812, job="job-42")
E2 = Event(
    ts=1_732_350_000_200,
    type=EventType.ERROR_HW,
    entity="gpu-3",
    value="XID_79",
    attrs={"raw": "NVRM: Xid 79", "rank": 3, "ratio": 0.5, "fatal": True},
)

CONTROL_MESSAGES: list[Any] = [
    Hello(node="node3", epoch="e1", version="0.1.0", probes=("procfs", "nvml"), pid=1234),
    Heartbeat(ts=1000, node="node3", epoch="e1", seq=42),
    Heartbeat(ts=1000, start_id="agg-1"),
    SnapshotReq(node="node3", req_id="r1"),
    Snapshot(node="node3", epoch="e1", seq=7, req_id="r1", events=(E1, E2)),
    Snapshot(node="node3", epoch="e1", seq=0, req_id="r1", events=()),
    Command(
        id="c1",
        op="zap",
        target={"pid": 4812, "create_time": 1.5},
        deadline=2000,
        requested_by="alice",
        args={"signal": "TERM"},
    ),
    Ack(id="c1", node="node3"),
    Result(id="c1", node="node3", ok=True, data={"tree": [{"pid": 4812, "outcome": "killed"}]}),
    Result(id="c1", node="node3", ok=False, error="EXPIRED"),
    ErrorMessage(code="VERSION", message="peer speaks protocol v2"),
]


def wire(obj: dict[str, Any], limit: int = CONTROL_MAX) -> Any:
    """Through real msgpack bytes and back."""
    return unpack(pack(obj), limit=limit)


@pytest.mark.parametrize("msg", CONTROL_MESSAGES, ids=lambda m: type(m).__name__)
def test_control_round_trip(msg: Any) -> None:
    decoded = decode_control(wire(msg.to_dict()))
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert msg.to_dict()["v"] == 1
    assert msg.to_dict()["t"] == msg.T


def test_control_framing_round_trip() -> None:
    hello = CONTROL_MESSAGES[0]
    assert read_control(control_frames(hello)[0]) == hello
    rid, payload = control_frames(hello, b"node3/e1")
    assert rid == b"node3/e1"
    assert read_control(payload) == hello


def test_batch_round_trip() -> None:
    batch = EventBatch(node="node3", epoch="e1", seq=5, sent_ts=1_732_350_000_300, events=(E1, E2))
    decoded, rejects = decode_batch(wire(batch.to_dict(), EVENTS_MAX))
    assert decoded == batch
    assert not rejects
    assert rejects.count == 0
    assert not decoded.is_heartbeat


def test_empty_batch_is_a_heartbeat() -> None:
    batch = EventBatch(node="node3", epoch="e1", seq=9, sent_ts=1)
    decoded, _ = decode_batch(wire(batch.to_dict()))
    assert decoded.is_heartbeat
    assert decoded.seq == 9


def test_batch_frames_round_trip() -> None:
    batch = EventBatch(node="n", epoch="e", seq=0, sent_ts=0, events=(E1,))
    frames = batch_frames(batch)
    assert frames[0] == b"ev"
    assert read_batch(frames) == (batch, decode_batch(batch.to_dict())[1])


@pytest.mark.parametrize("frames", [[b"ev"], [b"xx", b"\x80"], [b"ev", b"\x80", b"\x80"]])
def test_batch_bad_frames(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError) as info:
        read_batch(frames)
    assert info.value.reason == "bad_frame"


def test_batch_without_t_is_accepted() -> None:
    obj = EventBatch(node="n", epoch="e", seq=1, sent_ts=2).to_dict()
    del obj["t"]
    assert decode_batch(obj)[0].seq == 1


def test_batch_with_one_bad_event_keeps_the_good_ones() -> None:
    obj = EventBatch(node="node3", epoch="e1", seq=1, sent_ts=1, events=(E1, E2)).to_dict()
    bad = E1.to_wire()
    bad[3] = "abc"  # pid
    obj["events"] = [obj["events"][0], bad, "not an event", obj["events"][1]]
    batch, rejects = decode_batch(wire(obj))
    assert batch.events == (E1, E2)
    assert rejects.count == 2
    assert bool(rejects)
    assert [type(e) for e in rejects.errors] == [EventError, EventError]
    assert str(rejects.errors[0]).startswith("events[1].pid: expected integer")
    assert rejects.errors[0].field == "events[1].pid"
    assert str(rejects.errors[1]).startswith("events[2].event: expected a 7-item list")


def test_rejected_detail_is_bounded_but_the_count_is_exact() -> None:
    obj = EventBatch(node="n", epoch="e", seq=1, sent_ts=1).to_dict()
    obj["events"] = [None] * 500 + [E1.to_wire()]
    batch, rejects = decode_batch(obj)
    assert batch.events == (E1,)
    assert rejects.count == 500
    assert len(rejects.errors) == MAX_REJECT_DETAIL


def test_batch_event_count_is_bounded() -> None:
    obj = EventBatch(node="n", epoch="e", seq=1, sent_ts=1).to_dict()
    obj["events"] = [None] * (MAX_BATCH_EVENTS + 1)
    with pytest.raises(ProtocolError, match=r"^events: expected at most"):
        decode_batch(obj)


def test_snapshot_with_bad_event_keeps_the_good_ones() -> None:
    obj = Snapshot(node="n", epoch="e", seq=3, req_id="r", events=(E1, E2)).to_dict()
    obj["events"].insert(1, [1, 2, 3])
    snap = decode_control(obj)
    assert isinstance(snap, Snapshot)
    assert snap.events == (E1, E2)
    assert snap.rejected.count == 1
    assert "rejected" not in snap.to_dict()


# --------------------------------------------------------------------------------------
# Schema errors name the field.

Mutation = Callable[[dict[str, Any]], None]


def _set(name: str, value: object) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        obj[name] = value

    return mutate


def _drop(name: str) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        del obj[name]

    return mutate


HELLO = CONTROL_MESSAGES[0].to_dict()
HB = CONTROL_MESSAGES[1].to_dict()
SNAP = CONTROL_MESSAGES[4].to_dict()
CMD = CONTROL_MESSAGES[6].to_dict()
RESULT = CONTROL_MESSAGES[8].to_dict()
BATCH = EventBatch(node="n", epoch="e", seq=1, sent_ts=1, events=(E1,)).to_dict()
QUERY = QueryRequest(id="q1", op="ps", args={"node": "n1"}).to_dict()
REPLY_ERR = error_reply("q1", NotFoundError("no such pid")).to_dict()

SCHEMA_CASES: list[tuple[str, dict[str, Any], Mutation, str]] = [
    ("control", HELLO, _set("node", 3), "node: expected string, got integer"),
    ("control", HELLO, _set("node", ""), "node: expected non-empty string"),
    ("control", HELLO, _set("node", "x" * 300), "node: expected at most 256 characters"),
    ("control", HELLO, _drop("epoch"), "epoch: missing"),
    ("control", HELLO, _set("version", None), "version: expected string, got nil"),
    ("control", HELLO, _set("probes", "procfs"), "probes: expected list, got string"),
    ("control", HELLO, _set("probes", ["ok", 1]), "probes[1]: expected string, got integer"),
    ("control", HELLO, _set("pid", True), "pid: expected integer, got boolean"),
    ("control", HELLO, _set("pid", -1), "pid: expected integer >= 0"),
    ("control", HELLO, _set("t", "nope"), "t: unknown control message type 'nope'"),
    ("control", HELLO, _set("t", 5), "t: expected string, got integer"),
    ("control", HELLO, _drop("t"), "t: missing"),
    ("control", HB, _set("seq", 1.5), "seq: expected integer, got number"),
    ("control", HB, _drop("ts"), "ts: missing"),
    ("control", HB, _drop("node"), "node: missing (an agent heartbeat needs node"),
    ("control", HB, _set("start_id", b"x"), "start_id: expected string, got bytes"),
    ("control", SNAP, _set("events", {}), "events: expected list, got map"),
    ("control", SNAP, _set("req_id", 1), "req_id: expected string"),
    ("control", CMD, _set("target", [1]), "target: expected map, got list"),
    ("control", CMD, _set("target", {b"pid": 1}), "target key: expected string, got bytes"),
    ("control", CMD, _set("deadline", "soon"), "deadline: expected integer, got string"),
    ("control", CMD, _set("args", 1), "args: expected map, got integer"),
    ("control", CMD, _drop("requested_by"), "requested_by: missing"),
    ("control", RESULT, _set("ok", 1), "ok: expected boolean, got integer"),
    ("control", RESULT, _set("error", 1), "error: expected string, got integer"),
    ("control", RESULT, _set("data", "x"), "data: expected map, got string"),
    ("control", {"v": 1, "t": "error", "code": 1}, lambda o: None, "code: expected string"),
    ("control", {"v": 1, "t": "ack", "id": "x"}, lambda o: None, "node: missing"),
    ("batch", BATCH, _set("seq", -1), "seq: expected integer >= 0"),
    ("batch", BATCH, _set("sent_ts", "now"), "sent_ts: expected integer"),
    ("batch", BATCH, _set("events", None), "events: expected list, got nil"),
    ("batch", BATCH, _set("t", "query"), "t: expected 'batch', got 'query'"),
    ("batch", BATCH, _drop("epoch"), "epoch: missing"),
    ("query", QUERY, _drop("id"), "id: missing"),
    ("query", QUERY, _set("op", ""), "op: expected non-empty string"),
    ("query", QUERY, _set("args", [1]), "args: expected map, got list"),
    ("reply", REPLY_ERR, _set("ok", None), "ok: expected boolean, got nil"),
    ("reply", REPLY_ERR, _set("error", "boom"), "error: expected map, got string"),
    ("reply", REPLY_ERR, _set("error", {"code": "X"}), "error.message: missing"),
    ("reply", REPLY_ERR, _set("error", {"code": 1, "message": "m"}), "error.code: expected string, got integer"),
    ("reply", REPLY_ERR, _set("id", 7), "id: expected string"),
]

DECODERS: dict[str, Callable[[object], Any]] = {
    "control": decode_control,
    "batch": decode_batch,
    "query": decode_query,
    "reply": decode_reply,
}


@pytest.mark.parametrize(("kind", "base", "mutate", "message"), SCHEMA_CASES)
def test_schema_errors_name_the_field(kind: str, base: dict[str, Any], mutate: Mutation, message: str) -> None:
    obj = dict(base)
    mutate(obj)
    with pytest.raises(ProtocolError) as info:
        DECODERS[kind](obj)
    assert info.value.reason == "bad_schema"
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("decode", DECODERS.values())
@pytest.mark.parametrize("obj", [None, 1, "x", [1, 2], b"v"])
def test_non_map_is_bad_schema(decode: Callable[[object], Any], obj: object) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(obj)
    assert info.value.reason == "bad_schema"
    assert "expected a map" in str(info.value)


# --------------------------------------------------------------------------------------
# Versions.


@pytest.mark.parametrize("decode", DECODERS.values())
@pytest.mark.parametrize("version", [0, 2, 99])
def test_other_major_version_is_refused_clearly(decode: Callable[[object], Any], version: int) -> None:
    # A future peer may change everything else; the version is checked first.
    with pytest.raises(ProtocolError) as info:
        decode({"v": version, "t": "something-new", "whatever": 1})
    assert info.value.reason == "version"
    assert f"peer speaks protocol v{version}, this xctl speaks v1" in str(info.value)
    assert "upgrade" in str(info.value)


@pytest.mark.parametrize(("v", "message"), [("1", "v: expected integer, got string"), (True, "v: expected integer")])
def test_non_integer_version_is_bad_schema(v: object, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_control({**HELLO, "v": v})
    assert info.value.reason == "bad_schema"
    assert str(info.value).startswith(message)


def test_missing_version_is_bad_schema() -> None:
    obj = dict(HELLO)
    del obj["v"]
    with pytest.raises(ProtocolError, match=r"^v: missing") as info:
        decode_control(obj)
    assert info.value.reason == "bad_schema"


# --------------------------------------------------------------------------------------
# Queries.


def test_query_round_trip() -> None:
    req = QueryRequest(id="abc", op="why", args={"target": "node3:4812"})
    assert decode_query(wire(req.to_dict())) == req
    assert read_query(pack(req.to_dict())) == req


def test_query_in_design_form_without_t_or_args() -> None:
    assert decode_query({"v": 1, "id": "a", "op": "ps"}) == QueryRequest(id="a", op="ps", args={})


def test_read_query_bounds_depth() -> None:
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ProtocolError) as info:
        read_query(pack({"v": 1, "id": "a", "op": "ps", "args": {"x": deep}}))
    assert info.value.reason == "too_deep"


@pytest.mark.parametrize("data", [None, 5, "s", [1, {"a": b"b"}], {"items": []}])
def test_ok_reply_round_trip(data: object) -> None:
    reply = ok_reply("abc", data)
    assert decode_reply(wire(reply.to_dict(), REPLY_MAX)) == reply


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotFoundError("no process 4812 on node3"), "NOT_FOUND"),
        (UsageError("bad op"), "BAD_REQUEST"),
        (TargetError("bad target"), "BAD_TARGET"),
        (NotAuthorisedError("key not authorised"), "NOT_AUTHORISED"),
        (XctlError("boom"), "ERROR"),
        (ProtocolError("version", "peer speaks protocol v2"), "VERSION"),
        (ProtocolError("bad_schema", "id: missing"), "PROTOCOL"),
    ],
)
def test_error_reply_round_trip_and_back_to_exception(exc: XctlError, code: str) -> None:
    reply = error_reply("abc", exc)
    obj = reply.to_dict()
    assert obj["ok"] is False
    assert obj["error"] == {"code": code, "message": str(exc)}
    assert "data" not in obj
    decoded = decode_reply(wire(obj))
    assert decoded == reply
    assert decoded.error is not None
    again = exception_for(decoded.error)
    assert type(again) is type(exc)
    assert str(again) == str(exc)
    assert again.code == exc.code


def test_unknown_error_code_keeps_the_code() -> None:
    exc = exception_for(ErrorMessage("TIMEOUT", "agent node3 did not answer"))
    assert type(exc) is XctlError
    assert exc.code == "TIMEOUT"
    assert XctlError.code == "ERROR"  # the class is untouched
    assert str(exc) == "agent node3 did not answer"


def test_reply_with_empty_id_is_valid() -> None:
    reply = error_reply("", ProtocolError("bad_msgpack", "not valid msgpack"))
    assert decode_reply(reply.to_dict()).id == ""


def test_reply_framing() -> None:
    envelope, payload = split_envelope([b"peer", b"", b"payload"])
    assert envelope == [b"peer"]
    assert payload == b"payload"
    frames = reply_frames(envelope, ok_reply("a", 1))
    assert frames[:2] == [b"peer", b""]
    assert decode_reply(unpack(frames[2], limit=REPLY_MAX)) == QueryReply(id="a", ok=True, data=1)


@pytest.mark.parametrize("frames", [[b"payload"], [b"peer", b"payload"], [b"peer", b"x", b"payload"]])
def test_bad_envelope(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError) as info:
        split_envelope(frames)
    assert info.value.reason == "bad_frame"


def test_error_message_from_exception() -> None:
    msg = ErrorMessage.from_exception(ProtocolError("version", "peer speaks protocol v2, ..."))
    assert msg.code == "VERSION"
    assert decode_control(msg.to_dict()) == msg
