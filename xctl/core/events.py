"""Events: the one currency of xctl (DESIGN §3).

Every signal — an NVML sample, a kernel log line, an external probe's JSON line — becomes
an immutable :class:`Event`. This module parses the probe JSON-lines format (v1, including
the original xctl field names) and converts to and from the compact wire tuple
``[ts, type, entity, pid, job, value, attrs]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from xctl.core.errors import EventError

AttrValue = str | int | float | bool

MAX_LINE_BYTES: Final = 64 * 1024
MAX_ENTITY_LEN: Final = 256
MAX_VALUE_LEN: Final = 4096
MAX_ATTRS: Final = 64
MAX_ATTR_KEY_LEN: Final = 64
MAX_ATTR_STR_LEN: Final = 8192

NO_ATTRS: Final[Mapping[str, AttrValue]] = MappingProxyType({})


class EventType(StrEnum):
    """The twelve event types of the probe protocol."""

    COMPUTE_UTIL = "compute.util"
    COMPUTE_MEM = "compute.mem"
    TRANSPORT_BW = "transport.bw"
    TRANSPORT_DROP = "transport.drop"
    STORAGE_IOPS = "storage.iops"
    STORAGE_QDEPTH = "storage.qdepth"
    PROCESS_STATE = "process.state"
    ERROR_HW = "error.hw"
    ERROR_NET = "error.net"
    TOPO_LINK_DOWN = "topo.link_down"
    INTENT_RUN = "intent.run"
    ACTION_EXEC = "action.exec"


_TYPES: Final[dict[str, EventType]] = {t.value: t for t in EventType}
_MAX_TS: Final = 2**53
_MAX_PID: Final = 2**31
_new_tuple = tuple.__new__
_NONE = type(None)
#: Field types (ts, type, entity, pid, job, value) of wire tuples that take the fast path.
_FAST_SHAPES: Final = frozenset((int, str, str, pid, job, str) for pid in (int, _NONE) for job in (str, _NONE))
ERROR_TYPES: Final = frozenset({EventType.ERROR_HW, EventType.ERROR_NET, EventType.TOPO_LINK_DOWN})


class Event(NamedTuple):
    """One observation. ``ts`` is milliseconds since the epoch on the sender's clock.

    Immutable and slot-less by construction (a named tuple): the aggregator builds one per
    event received, so construction cost is the ingest hot path (a frozen dataclass costs
    several times more). Fields in the order probes think of them; the wire order differs.
    """

    ts: int
    type: EventType
    entity: str
    value: str
    pid: int | None = None
    job: str | None = None
    attrs: Mapping[str, AttrValue] = NO_ATTRS

    def to_wire(self) -> list[Any]:
        """The compact wire tuple ``[ts, type, entity, pid, job, value, attrs]``."""
        return [self.ts, self.type.value, self.entity, self.pid, self.job, self.value, dict(self.attrs)]

    def replace(self, **changes: Any) -> Event:
        return self._replace(**changes)

    @classmethod
    def from_wire(cls, item: object) -> Event:
        """Validate and build one event from a wire tuple; raises :class:`EventError`.

        An ``attrs`` dict is adopted, not copied (it comes from a decoder): do not mutate it.
        """
        good, bad = events_from_wire((item,))
        if bad:
            raise bad[0][1]
        return good[0]

    @classmethod
    def _from_wire_checked(cls, item: object) -> Event:
        if not isinstance(item, list | tuple) or len(item) != 7:
            raise EventError("event", "a 7-item list [ts, type, entity, pid, job, value, attrs]", item)
        ts, etype, entity, pid, job, value, attrs = item
        return cls(
            ts=_ts(ts),
            type=_type(etype),
            entity=_entity(entity),
            value=_value(value),
            pid=_pid(pid),
            job=_job(job),
            attrs=_attrs(attrs),
        )

    def to_json(self) -> dict[str, Any]:
        """The probe-format JSON object (what ``xctl events -o json`` prints)."""
        out: dict[str, Any] = {"ts": self.ts, "type": self.type.value, "entity": self.entity, "value": self.value}
        if self.pid is not None:
            out["pid"] = self.pid
        if self.job is not None:
            out["job"] = self.job
        if self.attrs:
            out["attrs"] = dict(self.attrs)
        return out


def parse_line(line: str | bytes, *, now_ms: int, node: str | None = None) -> Event:
    """Parse one probe JSON line.

    ``now_ms`` stands in for a missing ``ts``. When ``node`` is given, a line that claims
    another node is refused (an agent stamps its own name). Raises :class:`EventError`
    naming the field at fault; never anything else.
    """
    size = len(line.encode("utf-8", "surrogatepass")) if isinstance(line, str) else len(line)
    if size > MAX_LINE_BYTES:
        raise EventError("line", f"at most {MAX_LINE_BYTES} bytes", detail=f"line too long ({size} bytes)")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise EventError("line", "a JSON object", detail=f"not valid JSON ({_reason(exc)})") from exc
    if not isinstance(obj, dict):
        raise EventError("line", "a JSON object", obj)
    return event_from_mapping(obj, now_ms=now_ms, node=node)


def event_from_mapping(obj: Mapping[str, Any], *, now_ms: int, node: str | None = None) -> Event:
    """Build an event from a decoded probe object (field aliases accepted).

    Attribute names with a leading underscore are reserved for xctl's own bookkeeping (a
    graph snapshot's ages, counts and edges, which travel only on the wire) and are dropped
    from probe objects: a probe cannot forge them.
    """
    claimed = obj.get("node")
    if claimed is not None:
        if not isinstance(claimed, str):
            raise EventError("node", "string", claimed)
        if node is not None and claimed != node:
            raise EventError("node", node, detail=f'line claims node "{claimed}" but this is node "{node}"')
    raw_ts = obj.get("ts")
    return Event(
        ts=now_ms if raw_ts is None else _ts(raw_ts),
        type=_type(_first(obj, "event_type", "type")),
        entity=_entity(_first(obj, "entity_id", "entity")),
        value=_value(obj.get("value", "")),
        pid=_pid(obj.get("pid")),
        job=_job(_first(obj, "job_id", "job", required=False)),
        attrs=_probe_attrs(_attrs(obj.get("attrs"))),
    )


def _probe_attrs(attrs: Mapping[str, AttrValue]) -> Mapping[str, AttrValue]:
    if not any(key.startswith("_") for key in attrs):
        return attrs
    kept = {k: v for k, v in attrs.items() if not k.startswith("_")}
    return MappingProxyType(kept) if kept else NO_ATTRS


def _first(obj: Mapping[str, Any], name: str, alias: str, *, required: bool = True) -> Any:
    if name in obj:
        return obj[name]
    if alias in obj:
        return obj[alias]
    if required:
        raise EventError(name, "a value", detail=f"missing (also accepted as {alias!r})")
    return None


def _ts(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise EventError("ts", "integer milliseconds since the epoch", raw)
    if isinstance(raw, float) and not math.isfinite(raw):
        raise EventError("ts", "a finite number", raw)
    ts = int(raw)
    if not 0 <= ts < 2**53:
        raise EventError("ts", "milliseconds since the epoch", raw)
    return ts


def _type(raw: object) -> EventType:
    if not isinstance(raw, str):
        raise EventError("event_type", "string", raw)
    etype = _TYPES.get(raw)
    if etype is None:
        raise EventError("event_type", "one of " + ", ".join(_TYPES), detail=f'unknown event type "{raw[:40]}"')
    return etype


def _entity(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise EventError("entity_id", "non-empty string", raw)
    if len(raw) > MAX_ENTITY_LEN:
        raise EventError("entity_id", f"at most {MAX_ENTITY_LEN} characters", detail="too long")
    return raw


def _value(raw: object) -> str:
    if isinstance(raw, str):
        if len(raw) > MAX_VALUE_LEN:
            raise EventError("value", f"at most {MAX_VALUE_LEN} characters", detail="too long")
        return raw
    if isinstance(raw, bool):
        raise EventError("value", "string or number", raw)
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise EventError("value", "a finite number", raw)
        return str(int(raw)) if raw.is_integer() and abs(raw) < 2**53 else repr(raw)
    raise EventError("value", "string or number", raw)


def _pid(raw: object) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise EventError("pid", "integer", raw)
    if not 0 < raw < 2**31:
        raise EventError("pid", "a positive process id", raw)
    return raw


def _job(raw: object) -> str | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    if not isinstance(raw, str):
        raise EventError("job_id", "string", raw)
    if len(raw) > MAX_ENTITY_LEN:
        raise EventError("job_id", f"at most {MAX_ENTITY_LEN} characters", detail="too long")
    return raw


def _attrs(raw: object) -> Mapping[str, AttrValue]:
    if raw is None:
        return NO_ATTRS
    if not isinstance(raw, Mapping):
        raise EventError("attrs", "a flat object", raw)
    if not raw:
        return NO_ATTRS
    if len(raw) > MAX_ATTRS:
        raise EventError("attrs", f"at most {MAX_ATTRS} keys", detail=f"{len(raw)} keys")
    out: dict[str, AttrValue] = {}
    for key, val in raw.items():
        if not isinstance(key, str) or not key or len(key) > MAX_ATTR_KEY_LEN:
            raise EventError("attrs", "string keys", key)
        if isinstance(val, str):
            if len(val) > MAX_ATTR_STR_LEN:
                raise EventError(f"attrs.{key}", f"at most {MAX_ATTR_STR_LEN} characters", detail="too long")
        elif isinstance(val, float):
            if not math.isfinite(val):
                raise EventError(f"attrs.{key}", "a finite number", val)
        elif not isinstance(val, int | bool):
            raise EventError(f"attrs.{key}", "string, number or boolean", val)
        out[key] = val
    return MappingProxyType(out)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 80 else text[:77] + "..."


def events_from_wire(items: Iterable[object]) -> tuple[list[Event], list[tuple[int, EventError]]]:
    """Validate decoded wire tuples: the good events, and ``(index, error)`` for each bad one.

    This is the aggregator's ingest hot path (it runs once per event received), so the
    common shape — exact types, flat attrs — is checked inline in one loop, without a call
    per event; anything else gets the full checks of :meth:`Event._from_wire_checked`, whose
    errors name the field. Both paths accept and refuse exactly the same inputs (a property
    test holds them to it). Attr dicts are adopted, not copied: they come from the decoder.
    """
    good: list[Event] = []
    bad: list[tuple[int, EventError]] = []
    append = good.append
    types = _TYPES
    new = _new_tuple
    cls = Event
    proxy = MappingProxyType
    shapes = _FAST_SHAPES
    for index, item in enumerate(items):
        if type(item) is list and len(item) == 7:
            ts, etype, entity, pid, job, value, attrs = item
            # One set lookup checks the six field types at once (exact types: no bool for int).
            if (
                (type(ts), type(etype), type(entity), type(pid), type(job), type(value)) in shapes
                and 0 <= ts < _MAX_TS
                and 0 < len(entity) <= MAX_ENTITY_LEN
                and len(value) <= MAX_VALUE_LEN
                and (pid is None or 0 < pid < _MAX_PID)
                and (job is None or 0 < len(job) <= MAX_ENTITY_LEN)
            ):
                known = types.get(etype)
                if known is not None:
                    if attrs is None or (type(attrs) is dict and not attrs):
                        append(new(cls, (ts, known, entity, value, pid, job, NO_ATTRS)))
                        continue
                    if type(attrs) is dict and len(attrs) <= MAX_ATTRS and _flat(attrs):
                        append(new(cls, (ts, known, entity, value, pid, job, proxy(attrs))))
                        continue
        try:
            append(cls._from_wire_checked(item))
        except EventError as exc:
            bad.append((index, exc))
    return good, bad


def _flat(attrs: dict[Any, Any]) -> bool:
    """True when every attr is valid as it is (the slow path says what is wrong otherwise)."""
    for key, val in attrs.items():
        if type(key) is not str or not 0 < len(key) <= MAX_ATTR_KEY_LEN:
            return False
        kind = type(val)
        if kind is str:
            if len(val) > MAX_ATTR_STR_LEN:
                return False
        elif kind is float:
            if not math.isfinite(val):
                return False
        elif kind is not int and kind is not bool:
            return False
    return True


def events_to_wire(events: Sequence[Event]) -> list[list[Any]]:
    return [e.to_wire() for e in events]
