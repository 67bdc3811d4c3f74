"""Fuzzing the wire: whatever arrives, the only exception is ProtocolError.

(Single bad events inside a batch or snapshot are not raised at all: they are counted in
``Rejects``, as EventError details.)
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xctl.core.errors import EventError, ProtocolError
from xctl.core.events import Event, EventType
from xctl.wire.codec import EVENTS_MAX, QUERY_MAX, pack, unpack
from xctl.wire.framing import read_batch, read_control, read_query
from xctl.wire.messages import (
    Ack,
    Command,
    ErrorMessage,
    EventBatch,
    Heartbeat,
    Hello,
    QueryRequest,
    Result,
    Snapshot,
    SnapshotReq,
    decode_batch,
    decode_control,
    decode_query,
    decode_reply,
    error_reply,
    ok_reply,
)

#: XCTL_FUZZ_EXAMPLES=20000 for a long run; the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("XCTL_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

E1 = Event(ts=1_732_350_000_123, type=EventType.ERROR_HW, entity="gpu-3", value="XID_79", pid=4812, attrs={"r": 1})

VALID: list[dict[str, Any]] = [
    EventBatch(node="n", epoch="e", seq=1, sent_ts=2, events=(E1,)).to_dict(),
    Hello(node="n", epoch="e", version="1", probes=("a",), pid=1).to_dict(),
    Heartbeat(ts=1, node="n", epoch="e", seq=3).to_dict(),
    Heartbeat(ts=1, start_id="s").to_dict(),
    SnapshotReq(node="n", req_id="r").to_dict(),
    Snapshot(node="n", epoch="e", seq=1, req_id="r", events=(E1,)).to_dict(),
    Command(id="c", op="zap", target={"pid": 1}, deadline=5, requested_by="u", args={"a": 1}).to_dict(),
    Ack(id="c", node="n").to_dict(),
    Result(id="c", node="n", ok=False, data={"x": 1}, error="E").to_dict(),
    ErrorMessage(code="X", message="m").to_dict(),
    QueryRequest(id="q", op="ps", args={"node": "n"}).to_dict(),
    ok_reply("q", {"items": [1, 2]}).to_dict(),
    error_reply("q", ProtocolError("bad_schema", "x")).to_dict(),
]


def _decode_batch(obj: object) -> object:
    batch, rejects = decode_batch(obj)
    assert all(isinstance(e, EventError) for e in rejects.errors)
    assert len(batch.events) + rejects.count == len(obj["events"])  # type: ignore[index]
    return batch


def _decode_control(obj: object) -> object:
    msg = decode_control(obj)
    if isinstance(msg, Snapshot):
        assert all(isinstance(e, EventError) for e in msg.rejected.errors)
    return msg


DECODERS: list[Callable[[object], object]] = [_decode_batch, _decode_control, decode_query, decode_reply]

# msgpack-able values, including the awkward ones: big ints, NaN, bytes, nested containers.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["ps", "hello", "batch", "error", "compute.util", "gpu-0", "", "v", "t", "events"])
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=8)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(["v", "t", "id", "node"]), children, max_size=8)
    ),
    max_leaves=10,
)
shallow = scalars | st.lists(scalars, max_size=4) | st.dictionaries(st.text(max_size=4), scalars, max_size=4)
field_names = st.sampled_from(
    sorted({k for msg in VALID for k in msg} | {"attrs", "x"}),
)


def check(decode: Callable[[object], object], obj: object) -> None:
    with contextlib.suppress(ProtocolError):
        decode(obj)


def check_bytes(data: bytes, limit: int = 1 << 20) -> None:
    try:
        obj = unpack(data, limit=limit)
    except ProtocolError:
        return
    for decode in DECODERS:
        check(decode, obj)


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes(data: bytes) -> None:
    check_bytes(data)
    check_bytes(data, limit=16)


@FUZZ
@given(values)
def test_arbitrary_objects(obj: object) -> None:
    for decode in DECODERS:
        check(decode, obj)
    check_bytes(pack(obj))


@FUZZ
@given(st.dictionaries(st.sampled_from(["v", "t", "id", "op", "node", "events", "ok"]), shallow, max_size=7))
def test_arbitrary_maps_with_protocol_keys(obj: dict[str, Any]) -> None:
    obj.setdefault("v", 1)
    for decode in DECODERS:
        check(decode, obj)


@FUZZ
@given(st.sampled_from(VALID), field_names, values | st.just(...))
def test_mutated_valid_messages(base: dict[str, Any], name: str, value: object) -> None:
    """One field of a valid message replaced by anything (or removed, for ``...``)."""
    obj = dict(base)
    if value is ...:
        obj.pop(name, None)
    else:
        obj[name] = value
    for decode in DECODERS:
        check(decode, obj)


@FUZZ
@given(st.lists(scalars | st.lists(scalars, max_size=8), max_size=6), st.integers(min_value=0, max_value=6), scalars)
def test_mutated_events(events: list[Any], slot: int, value: object) -> None:
    """Batches whose events are anything, or a valid event with one slot replaced."""
    good = E1.to_wire()
    good[slot] = value
    obj = dict(VALID[0], events=[*events, good, E1.to_wire()])
    batch, rejects = decode_batch(obj)
    assert batch.events[-1] == E1  # the good event survives whatever its neighbours are
    assert len(batch.events) + rejects.count == len(obj["events"])


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_byte_flips_of_valid_messages(base: dict[str, Any], data: st.DataObject) -> None:
    raw = bytearray(pack(base))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        i = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[i] = data.draw(st.integers(min_value=0, max_value=255))
    check_bytes(bytes(raw))


@pytest.mark.parametrize("base", VALID, ids=lambda m: str(m.get("t")))
def test_every_truncation_of_a_valid_message(base: dict[str, Any]) -> None:
    raw = pack(base)
    for end in range(len(raw)):
        with pytest.raises(ProtocolError) as info:
            unpack(raw[:end], limit=1 << 20)
        assert info.value.reason == "bad_msgpack"
    check_bytes(raw)


@pytest.mark.parametrize("depth", [1025, 10_000, 100_000])
@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k"])  # [[[…]]] and {"k": {"k": …}}
def test_deep_nesting(depth: int, opener: bytes) -> None:
    data = opener * depth + b"\xc0"
    with pytest.raises(ProtocolError) as info:
        unpack(data, limit=len(data))
    assert info.value.reason == "too_deep"


def test_deep_nesting_below_msgpack_bound_is_caught_for_queries() -> None:
    data = pack({"v": 1, "id": "a", "op": "ps", "args": {"x": msgpack.unpackb(b"\x91" * 1000 + b"\xc0")}})
    with pytest.raises(ProtocolError) as info:
        read_query(data)
    assert info.value.reason == "too_deep"


HUGE = 2**31


@pytest.mark.parametrize(
    "data",
    [
        b"\xdd" + struct.pack(">I", HUGE),
        b"\xdd" + struct.pack(">I", 2**32 - 1) + b"\xc0" * 64,
        b"\xdf" + struct.pack(">I", HUGE) + b"\xa1k\xc0",
        b"\xdb" + struct.pack(">I", HUGE) + b"abc",
        b"\xc6" + struct.pack(">I", HUGE) + b"abc",
        b"\xc9" + struct.pack(">I", HUGE) + b"\x01abc",
        # A valid-looking batch map whose events array declares 2**31 entries.
        b"\x86\xa1v\x01\xa1t\xa5batch\xa4node\xa1n\xa5epoch\xa1e\xa3seq\x01\xa6events\xdd" + struct.pack(">I", HUGE),
    ],
)
def test_huge_declared_lengths(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        unpack(data, limit=EVENTS_MAX)
    assert info.value.reason == "bad_msgpack"
    with pytest.raises(ProtocolError):
        read_batch([b"ev", data])
    with pytest.raises(ProtocolError):
        read_control(data)
    with pytest.raises(ProtocolError):
        read_query(data)


def test_oversized_frames_refused_before_decoding() -> None:
    big = pack({"v": 1, "id": "a", "op": "ps", "args": {"x": "y" * QUERY_MAX}})
    with pytest.raises(ProtocolError) as info:
        read_query(big)
    assert info.value.reason == "too_large"
