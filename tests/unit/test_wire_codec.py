"""msgpack codec: round trips, limits, and the only exception it may raise."""

from __future__ import annotations

import struct

import msgpack
import pytest

from xctl.core.errors import ProtocolError
from xctl.wire.codec import (
    CONTROL_MAX,
    EVENTS_MAX,
    QUERY_MAX,
    REPLY_MAX,
    DropCounter,
    pack,
    unpack,
)


@pytest.mark.parametrize(
    "obj",
    [
        None,
        True,
        0,
        -1,
        2**64 - 1,
        -(2**63),
        1.5,
        "",
        "héllo",
        b"\x00\xff",
        [],
        [1, [2, [3]]],
        {"a": {"b": [None, 1.0, "x", b"y"]}},
    ],
)
def test_round_trip(obj: object) -> None:
    assert unpack(pack(obj), limit=1024) == obj


def test_bytes_stay_bytes_and_strings_stay_strings() -> None:
    out = unpack(pack({"s": "x", "b": b"x"}), limit=100)
    assert out == {"s": "x", "b": b"x"}
    assert isinstance(out["s"], str)
    assert isinstance(out["b"], bytes)


def test_limits_are_ordered() -> None:
    assert QUERY_MAX == 64 * 1024
    assert EVENTS_MAX == 1024 * 1024
    assert CONTROL_MAX == 4 * 1024 * 1024
    assert REPLY_MAX == 16 * 1024 * 1024


def test_frame_at_limit_is_accepted_one_over_is_too_large() -> None:
    data = pack("x" * 100)
    assert unpack(data, limit=len(data)) == "x" * 100
    with pytest.raises(ProtocolError) as info:
        unpack(data, limit=len(data) - 1)
    assert info.value.reason == "too_large"
    assert str(len(data)) in str(info.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "bad_msgpack"),
        (b"\xc1", "bad_msgpack"),  # the one never-used byte
        (b"\x92\x01", "bad_msgpack"),  # truncated array
        (b"\x01\x02", "bad_msgpack"),  # extra data
        (b"\xa2\xff\xfe", "bad_msgpack"),  # invalid UTF-8
        (b"\x81\x01\x02", "bad_msgpack"),  # int map key
        (b"\x81\x91\x01\x02", "bad_msgpack"),  # list map key
        (b"\xc7\x00\x05", "bad_msgpack"),  # empty extension type
        (b"\xd4\x05\x00", "bad_msgpack"),  # fixext1
        (b"\xd6\xff\x00\x00\x00\x01", "bad_msgpack"),  # timestamp extension
        (b"\xd7\xff" + b"\x00" * 8, "bad_msgpack"),
        (b"\x91" * 10_000 + b"\xc0", "too_deep"),
    ],
)
def test_malformed_input_raises_protocol_error(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        unpack(data, limit=1 << 20)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "header",
    [
        b"\xdd" + struct.pack(">I", 2**31),  # array32
        b"\xdf" + struct.pack(">I", 2**31),  # map32
        b"\xdb" + struct.pack(">I", 2**31),  # str32
        b"\xc6" + struct.pack(">I", 2**31),  # bin32
        b"\xc9" + struct.pack(">I", 2**31) + b"\x05",  # ext32
        b"\xdc\xff\xff",  # array16
        b"\xde\xff\xff",  # map16
    ],
)
def test_huge_declared_lengths_are_refused_without_allocating(header: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        unpack(header + b"\x00" * 16, limit=1 << 20)
    assert info.value.reason == "bad_msgpack"


def test_declared_length_over_frame_is_bad_msgpack() -> None:
    with pytest.raises(ProtocolError, match="exceeds its size") as info:
        unpack(b"\xdd" + struct.pack(">I", 2**31) + b"\xc0", limit=1 << 20)
    assert info.value.reason == "bad_msgpack"


def test_max_depth() -> None:
    nested: object = 1
    for _ in range(5):
        nested = [nested]
    data = pack({"a": nested})  # depth: map, then 5 lists
    assert unpack(data, limit=1024, max_depth=6) == {"a": nested}
    with pytest.raises(ProtocolError) as info:
        unpack(data, limit=1024, max_depth=5)
    assert info.value.reason == "too_deep"


def test_depth_1024_is_msgpacks_own_bound() -> None:
    assert unpack(b"\x91" * 1024 + b"\xc0", limit=4096) is not None
    with pytest.raises(ProtocolError) as info:
        unpack(b"\x91" * 1025 + b"\xc0", limit=4096)
    assert info.value.reason == "too_deep"


def test_max_depth_with_wide_flat_message_is_fine() -> None:
    obj = {"k": [[i] for i in range(1000)]}
    assert unpack(pack(obj), limit=QUERY_MAX, max_depth=3) == obj


def test_pack_refuses_unencodable_objects() -> None:
    with pytest.raises(ProtocolError) as info:
        pack({"x": object()})
    assert info.value.reason == "unencodable"
    with pytest.raises(ProtocolError):
        pack(2**64)


def test_error_is_chained_to_msgpack_exception() -> None:
    with pytest.raises(ProtocolError) as info:
        unpack(b"\x01\x02", limit=10)
    assert isinstance(info.value.__cause__, msgpack.ExtraData)


def test_drop_counter() -> None:
    drops = DropCounter()
    assert drops.total == 0
    assert drops.as_dict() == {}
    drops.count("bad_msgpack")
    drops.count("bad_msgpack")
    drops.count("too_large", 3)
    assert drops.get("bad_msgpack") == 2
    assert drops.get("never") == 0
    assert drops.total == 5
    snapshot = drops.as_dict()
    assert snapshot == {"bad_msgpack": 2, "too_large": 3}
    drops.count("x")
    assert "x" not in snapshot  # a copy
    assert "bad_msgpack" in repr(drops)
