"""The probe JSON-lines format (DESIGN §3) and the compact wire tuple."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xctl.core.errors import EventError, UsageError
from xctl.core.events import (
    MAX_LINE_BYTES,
    Event,
    EventType,
    event_from_mapping,
    events_to_wire,
    parse_line,
)

NOW = 1_732_350_009_999
ORIGINAL = '{"ts": 1732350000123, "event_type": "compute.util", "entity_id": "gpu-3", "job_id": "job-42", "pid": 4812, "value": "85"}'  # noqa: E501


def parse(obj: dict[str, Any], *, node: str | None = None) -> Event:
    return parse_line(json.dumps(obj), now_ms=NOW, node=node)


def error_of(obj: object, *, node: str | None = None) -> EventError:
    line = obj if isinstance(obj, str | bytes) else json.dumps(obj)
    with pytest.raises(EventError) as info:
        parse_line(line, now_ms=NOW, node=node)
    return info.value


def base(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"ts": 1_732_350_000_123, "type": "compute.util", "entity": "gpu-3", "value": "85"}
    obj.update(over)
    return obj


# ---------------------------------------------------------------------- accepted input
def test_the_original_xctl_line_is_accepted_unchanged() -> None:
    ev = parse_line(ORIGINAL, now_ms=NOW)
    assert ev == Event(1_732_350_000_123, EventType.COMPUTE_UTIL, "gpu-3", "85", 4812, "job-42")
    assert ev.attrs == {}


def test_the_original_line_as_bytes_with_a_trailing_newline() -> None:
    ev = parse_line((ORIGINAL + "\n").encode(), now_ms=NOW)
    assert (ev.type, ev.entity, ev.pid, ev.job, ev.value) == (EventType.COMPUTE_UTIL, "gpu-3", 4812, "job-42", "85")


def test_short_aliases_type_entity_job() -> None:
    ev = parse({"ts": 5, "type": "error.hw", "entity": "gpu-1", "job": "job-7", "value": "XID_79"})
    assert (ev.ts, ev.type, ev.entity, ev.job, ev.value) == (5, EventType.ERROR_HW, "gpu-1", "job-7", "XID_79")


def test_the_long_name_wins_over_its_alias() -> None:
    ev = parse(base(event_type="error.net", entity_id="mlx5_0", job_id="job-a", job="job-b"))
    assert (ev.type, ev.entity, ev.job) == (EventType.ERROR_NET, "mlx5_0", "job-a")


@pytest.mark.parametrize("etype", [t.value for t in EventType])
def test_every_one_of_the_twelve_types_is_accepted(etype: str) -> None:
    assert parse(base(type=etype)).type.value == etype
    assert len(EventType) == 12


@pytest.mark.parametrize(
    ("raw", "text"),
    [(85, "85"), (85.5, "85.5"), (85.0, "85"), (0, "0"), (-3, "-3"), (0.25, "0.25"), ("IO_WAIT", "IO_WAIT")],
)
def test_numeric_values_are_normalised_to_strings(raw: object, text: str) -> None:
    assert parse(base(value=raw)).value == text


def test_a_missing_value_is_the_empty_string() -> None:
    obj = base()
    del obj["value"]
    assert parse(obj).value == ""


def test_missing_ts_is_the_receive_time() -> None:
    obj = base()
    del obj["ts"]
    assert parse(obj).ts == NOW


def test_null_ts_is_the_receive_time_and_float_ts_is_truncated() -> None:
    assert parse(base(ts=None)).ts == NOW
    assert parse(base(ts=1_732_350_000_123.9)).ts == 1_732_350_000_123


def test_integer_job_ids_become_strings_and_empty_job_is_none() -> None:
    assert parse(base(job=42)).job == "42"
    assert parse(base(job="")).job is None
    assert parse(base()).job is None


def test_a_flat_attrs_map_is_accepted_with_its_types() -> None:
    attrs = {"raw": "NVRM: Xid 79", "rank": 3, "util": 97.5, "ecc": True, "used_mib": 64000}
    ev = parse(base(attrs=attrs))
    assert dict(ev.attrs) == attrs
    assert isinstance(ev.attrs["ecc"], bool)


def test_reserved_underscore_attrs_are_dropped_from_probe_lines() -> None:
    ev = parse(base(type="error.hw", value="XID_13", attrs={"_age": 10**9, "_hist": 5, "_wait": "x", "raw": "Xid 13"}))
    assert dict(ev.attrs) == {"raw": "Xid 13"}
    assert parse(base(attrs={"_count": 3})).attrs == {}


def test_reserved_attrs_still_travel_on_the_wire() -> None:
    wire = [1, "error.hw", "gpu-0", None, None, "XID_13", {"_age": 5, "_count": 2}]
    assert dict(Event.from_wire(wire).attrs) == {"_age": 5, "_count": 2}


def test_attrs_are_read_only() -> None:
    ev = parse(base(attrs={"rank": 3}))
    with pytest.raises(TypeError):
        ev.attrs["rank"] = 4  # type: ignore[index]


def test_unknown_fields_are_ignored() -> None:
    ev = parse(base(hostname="node3", extra={"deep": [1, 2]}, version=2))
    assert ev == Event(1_732_350_000_123, EventType.COMPUTE_UTIL, "gpu-3", "85")


def test_a_matching_node_claim_is_accepted() -> None:
    assert parse(base(node="node3"), node="node3").entity == "gpu-3"
    assert parse(base(node="node7")).entity == "gpu-3"  # no node to check against


# ---------------------------------------------------------------------- rejected input
def test_a_non_numeric_pid_names_the_field_exactly() -> None:
    err = error_of(base(pid="abc"))
    assert str(err) == 'pid: expected integer, got "abc"'
    assert (err.field, err.expected, err.got) == ("pid", "integer", "abc")


def test_a_boolean_pid_is_rejected() -> None:
    assert str(error_of(base(pid=True))) == "pid: expected integer, got true"


def test_a_float_pid_is_rejected() -> None:
    assert str(error_of(base(pid=4812.0))) == "pid: expected integer, got 4812.0"


@pytest.mark.parametrize("pid", [0, -1, 2**31])
def test_an_out_of_range_pid_is_rejected(pid: int) -> None:
    assert str(error_of(base(pid=pid))) == f"pid: expected a positive process id, got {pid}"


def test_an_unknown_event_type_is_rejected_by_name() -> None:
    err = error_of(base(type="compute.temperature"))
    assert str(err) == 'event_type: unknown event type "compute.temperature"'
    assert "compute.util" in err.expected


def test_a_missing_type_and_entity_are_reported_with_their_aliases() -> None:
    obj = base()
    del obj["type"]
    assert str(error_of(obj)) == "event_type: missing (also accepted as 'type')"
    obj = base()
    del obj["entity"]
    assert str(error_of(obj)) == "entity_id: missing (also accepted as 'entity')"


def test_an_empty_entity_is_rejected() -> None:
    assert str(error_of(base(entity=""))) == 'entity_id: expected non-empty string, got ""'


def test_nested_attrs_are_rejected() -> None:
    expected = "expected string, number or boolean"
    assert str(error_of(base(attrs={"raw": {"line": "x"}}))) == f"attrs.raw: {expected}, got dict"
    assert str(error_of(base(attrs={"ranks": [1, 2]}))) == f"attrs.ranks: {expected}, got list"
    assert str(error_of(base(attrs="rank=3"))) == 'attrs: expected a flat object, got "rank=3"'


def test_attrs_with_a_null_value_are_rejected() -> None:
    assert str(error_of(base(attrs={"rank": None}))) == "attrs.rank: expected string, number or boolean, got null"


@pytest.mark.parametrize("value", [True, None, [85], {"v": 85}])
def test_a_value_that_is_neither_string_nor_number_is_rejected(value: object) -> None:
    assert error_of(base(value=value)).field == "value"


@pytest.mark.parametrize("ts", ["1732350000123", True, -1, 2**53])
def test_a_bad_ts_is_rejected(ts: object) -> None:
    assert error_of(base(ts=ts)).field == "ts"


def test_nan_and_infinity_are_rejected() -> None:
    assert error_of('{"ts": NaN, "type": "compute.util", "entity": "gpu-0", "value": 1}').field == "ts"
    assert error_of('{"type": "compute.util", "entity": "gpu-0", "value": Infinity}').field == "value"


def test_a_probe_that_claims_another_node_is_refused() -> None:
    err = error_of(base(node="node7"), node="node3")
    assert str(err) == 'node: line claims node "node7" but this is node "node3"'


def test_a_non_string_node_claim_is_rejected() -> None:
    assert str(error_of(base(node=3), node="node3")) == "node: expected string, got 3"


@pytest.mark.parametrize("line", ["", "not json", "{", '{"ts": 1,}', "\x00"])
def test_invalid_json_is_an_event_error_on_the_line(line: str) -> None:
    err = error_of(line)
    assert err.field == "line"
    assert str(err).startswith("line: not valid JSON (")


@pytest.mark.parametrize("line", ["[1, 2]", '"gpu-3"', "85", "null"])
def test_json_that_is_not_an_object_is_rejected(line: str) -> None:
    assert error_of(line).field == "line"


def test_invalid_utf8_bytes_are_an_event_error() -> None:
    assert error_of(b'{"type": "compute.util", "entity": "\xff\xfe"}').field == "line"


def test_event_error_is_a_usage_error_with_a_stable_code() -> None:
    err = error_of(base(pid="abc"))
    assert isinstance(err, UsageError)
    assert (err.code, err.exit_code) == ("BAD_EVENT", 2)


# ---------------------------------------------------------------------- the 64 KiB limit
def _line_of(size: int) -> str:
    """A valid event line of exactly ``size`` bytes (padded with an unknown field)."""
    head = json.dumps(base(pad=""))
    pad = size - len(head.encode())
    assert pad >= 0
    return json.dumps(base(pad="x" * pad))


def test_a_line_of_exactly_64_kib_is_accepted() -> None:
    line = _line_of(MAX_LINE_BYTES)
    assert len(line.encode()) == MAX_LINE_BYTES == 64 * 1024
    assert parse_line(line, now_ms=NOW).entity == "gpu-3"
    assert parse_line(line.encode(), now_ms=NOW).entity == "gpu-3"


def test_a_line_one_byte_over_64_kib_is_rejected() -> None:
    line = _line_of(MAX_LINE_BYTES + 1)
    assert str(error_of(line)) == f"line: line too long ({MAX_LINE_BYTES + 1} bytes)"
    assert error_of(line.encode()).field == "line"


def test_the_limit_counts_bytes_not_characters() -> None:
    head = json.dumps(base(pad=""), ensure_ascii=False)
    chars = (MAX_LINE_BYTES - len(head.encode())) // 2 + 1
    line = json.dumps(base(pad="é" * chars), ensure_ascii=False)
    assert len(line) < MAX_LINE_BYTES < len(line.encode())
    assert "too long" in str(error_of(line))


# ---------------------------------------------------------------------- wire and JSON
EVENTS = [
    Event(1, EventType.COMPUTE_UTIL, "gpu-0", "97"),
    Event(2, EventType.COMPUTE_MEM, "gpu-1", "78", 4812, "job-42", {"used_mib": 64000, "total_mib": 81559}),
    Event(3, EventType.TRANSPORT_BW, "gpu-1/nvlink-0", "IO_WAIT", 4812, "job-42"),
    Event(4, EventType.TRANSPORT_DROP, "mlx5_0", "12", None, None, {"counter": "rx_discards", "interval_s": 1.0}),
    Event(5, EventType.STORAGE_IOPS, "nvme0n1", "85", 77, None, {"await_ms": 850.5}),
    Event(6, EventType.STORAGE_QDEPTH, "nfs:/scratch", "4"),
    Event(7, EventType.PROCESS_STATE, "python3", "exit", 4812, "job-42", {"exit_code": 1, "create_time": 1.5}),
    Event(8, EventType.ERROR_HW, "gpu-3", "XID_79", None, None, {"raw": "NVRM: Xid 79", "xid": 79}),
    Event(9, EventType.ERROR_NET, "job-42", "NCCL_TIMEOUT", 4812, "job-42"),
    Event(10, EventType.TOPO_LINK_DOWN, "gpu-2/pcie", "PCIE_DEGRADED", None, None, {"width": 4, "max_width": 16}),
    Event(11, EventType.INTENT_RUN, "job-42", "CHECKPOINT_BEGIN", None, "job-42", {"world_size": 32}),
    Event(2**53 - 1, EventType.ACTION_EXEC, "node3:4812", "ZAP", 4812, None, {"by": "alice", "ok": True}),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type.value)
def test_wire_round_trip(event: Event) -> None:
    wire = event.to_wire()
    assert wire == [event.ts, event.type.value, event.entity, event.pid, event.job, event.value, dict(event.attrs)]
    assert Event.from_wire(wire) == event
    assert Event.from_wire(tuple(wire)) == event


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type.value)
def test_json_round_trip_through_the_probe_format(event: Event) -> None:
    line = json.dumps(event.to_json())
    assert parse_line(line, now_ms=NOW) == event


def test_events_to_wire_keeps_order() -> None:
    assert [Event.from_wire(w) for w in events_to_wire(EVENTS)] == EVENTS


_attr_values = st.one_of(
    st.text(max_size=20), st.integers(-(2**40), 2**40), st.booleans(), st.floats(allow_nan=False, allow_infinity=False)
)
_events = st.builds(
    Event,
    ts=st.integers(0, 2**53 - 1),
    type=st.sampled_from(list(EventType)),
    entity=st.text(min_size=1, max_size=40),
    value=st.text(max_size=40),
    pid=st.one_of(st.none(), st.integers(1, 2**31 - 1)),
    job=st.one_of(st.none(), st.text(min_size=1, max_size=20)),
    attrs=st.dictionaries(st.text(min_size=1, max_size=10), _attr_values, max_size=5),
)
#: Probe lines drop reserved (leading underscore) attribute names; the wire keeps them.
_probe_events = _events.filter(lambda e: not any(k.startswith("_") for k in e.attrs))


@settings(max_examples=60, deadline=None)
@given(st.lists(_events, max_size=10))
def test_wire_round_trip_for_many_events(events: list[Event]) -> None:
    assert [Event.from_wire(w) for w in events_to_wire(events)] == events


@settings(max_examples=100, deadline=None)
@given(_probe_events)
def test_json_round_trip_for_generated_events(event: Event) -> None:
    assert event_from_mapping(json.loads(json.dumps(event.to_json())), now_ms=NOW) == event


GOOD_WIRE: list[Any] = [1, "compute.util", "gpu-0", 4812, "job-42", "97", {}]


@pytest.mark.parametrize(
    "item",
    [
        GOOD_WIRE[:6],
        [*GOOD_WIRE, None],
        [],
        {"ts": 1},
        "compute.util",
        None,
        7,
    ],
    ids=["6-items", "8-items", "empty", "dict", "str", "none", "int"],
)
def test_from_wire_rejects_the_wrong_shape(item: object) -> None:
    with pytest.raises(EventError) as info:
        Event.from_wire(item)
    assert info.value.field == "event"


@pytest.mark.parametrize(
    ("index", "bad", "field"),
    [
        (0, "1", "ts"),
        (0, True, "ts"),
        (0, -5, "ts"),
        (1, "compute.bogus", "event_type"),
        (1, 3, "event_type"),
        (2, "", "entity_id"),
        (2, None, "entity_id"),
        (3, "4812", "pid"),
        (3, True, "pid"),
        (3, 0, "pid"),
        (4, 1.5, "job_id"),
        (5, None, "value"),
        (5, False, "value"),
        (6, [1, 2], "attrs"),
        (6, {"a": {"b": 1}}, "attrs.a"),
        (6, {1: "x"}, "attrs"),
    ],
)
def test_from_wire_rejects_wrong_types_naming_the_field(index: int, bad: object, field: str) -> None:
    item = list(GOOD_WIRE)
    item[index] = bad
    with pytest.raises(EventError) as info:
        Event.from_wire(item)
    assert info.value.field == field
