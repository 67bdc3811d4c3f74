"""Wire message schemas (DESIGN §6) and their validation.

Every message is a msgpack map carrying ``v`` (the major protocol version) and ``t`` (its
type). Decoders take the already-unpacked object (see :func:`xctl.wire.codec.unpack`),
check the version *first* (so a newer peer gets a "version" error, not a confusing schema
error), then the type of every field, and raise ``ProtocolError("bad_schema", "<field>:
expected …")`` on anything wrong — never anything else.

``t`` is required on control messages (it picks the schema). Event batches and queries
travel on sockets that carry nothing else, so there ``t`` is written ("batch", "query",
"reply") but optional on input: a tool that follows DESIGN §6 literally
(``{v, id, op, args}``) is understood.

Events inside a batch or snapshot are validated one by one: a bad event is dropped and
reported in :class:`Rejects`; it never costs the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

from xctl.core.errors import (
    ConfigError,
    EventError,
    NotAuthorisedError,
    NotFoundError,
    ProtocolError,
    TargetError,
    UsageError,
    XctlError,
)
from xctl.core.events import Event, events_from_wire
from xctl.wire.codec import PROTOCOL_VERSION

T = TypeVar("T")

#: Longest identifier (node name, epoch, ids, op names) accepted on the wire.
MAX_IDENT_LEN: Final = 256
#: Most events in one batch (agents flush at ≤ 1000; this is a guard, not a target).
MAX_BATCH_EVENTS: Final = 10_000
#: Most probes one agent may report, and the longest probe detail kept.
MAX_PROBES: Final = 64
MAX_PROBE_DETAIL: Final = 300
#: How many rejected-event errors are kept for logging (the count is always exact).
MAX_REJECT_DETAIL: Final = 10

_TYPE_NAMES: Final[dict[type, str]] = {
    str: "string",
    int: "integer",
    bool: "boolean",
    float: "number",
    dict: "map",
    list: "list",
    bytes: "bytes",
    type(None): "nil",
}


# --------------------------------------------------------------------------------------
# Field helpers: one way to say "field must be of type X", used everywhere.


def _what(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _bad(name: str, expected: str, got: object) -> ProtocolError:
    return ProtocolError("bad_schema", f"{name}: expected {expected}, got {_what(got)}")


def _is(value: object, kind: type) -> bool:
    if kind is int:  # bool is an int in Python, never on the wire
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _req(obj: Mapping[str, Any], name: str, kind: type[T], *, path: str = "") -> T:
    """The field ``name`` of ``obj``; it must be present and of type ``kind``."""
    if name not in obj:
        raise ProtocolError("bad_schema", f"{path}{name}: missing (expected {_TYPE_NAMES.get(kind, kind.__name__)})")
    value = obj[name]
    if not _is(value, kind):
        raise _bad(path + name, _TYPE_NAMES.get(kind, kind.__name__), value)
    return value  # type: ignore[no-any-return]


def _opt(obj: Mapping[str, Any], name: str, kind: type[T], *, path: str = "") -> T | None:
    """Like :func:`_req`, but a missing field or nil gives ``None``."""
    if obj.get(name) is None:
        return None
    return _req(obj, name, kind, path=path)


def _ident(obj: Mapping[str, Any], name: str, *, empty_ok: bool = False) -> str:
    """A required identifier string: non-empty (unless ``empty_ok``), at most MAX_IDENT_LEN."""
    value = _req(obj, name, str)
    if not value and not empty_ok:
        raise ProtocolError("bad_schema", f"{name}: expected non-empty string")
    if len(value) > MAX_IDENT_LEN:
        raise ProtocolError("bad_schema", f"{name}: expected at most {MAX_IDENT_LEN} characters")
    return value


def _count(obj: Mapping[str, Any], name: str) -> int:
    """A required integer >= 0 (sequence numbers, milliseconds, pids)."""
    value = _req(obj, name, int)
    if value < 0:
        raise ProtocolError("bad_schema", f"{name}: expected integer >= 0, got {value}")
    return value


def _str_map(obj: Mapping[str, Any], name: str, *, required: bool = True) -> dict[str, Any]:
    """A map with string keys (missing and optional gives ``{}``)."""
    value = _req(obj, name, dict) if required else (_opt(obj, name, dict) or {})
    for key in value:
        if not isinstance(key, str):
            raise _bad(f"{name} key", "string", key)
    return value


def _str_list(obj: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = _req(obj, name, list)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(f"{name}[{i}]", "string", item)
    return tuple(value)


def _envelope(obj: object, what: str, t: str | None) -> Mapping[str, Any]:
    """Check that ``obj`` is a map of this protocol version (and of type ``t`` if given)."""
    if not isinstance(obj, dict):
        raise _bad(what, "a map", obj)
    check_version(obj)
    if t is not None:
        got = obj.get("t")
        if got is not None and got != t:
            raise ProtocolError("bad_schema", f"t: expected {t!r}, got {_shown(got)}")
    return obj


def check_version(obj: Mapping[str, Any]) -> None:
    """Refuse a message without an integer ``v`` or with another major version."""
    if "v" not in obj:
        raise ProtocolError("bad_schema", "v: missing (every xctl message carries its protocol version)")
    v = obj["v"]
    if not _is(v, int):
        raise _bad("v", "integer", v)
    if v != PROTOCOL_VERSION:
        hint = "upgrade this xctl" if v > PROTOCOL_VERSION else "upgrade the peer"
        raise ProtocolError(
            "version",
            f"peer speaks protocol v{v}, this xctl speaks v{PROTOCOL_VERSION}: {hint} "
            "(agents, aggregator and CLI must share the protocol's major version)",
        )


def _shown(value: object) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    return _what(value)


def _head(t: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "t": t}


# --------------------------------------------------------------------------------------
# Events inside batches and snapshots.


@dataclass(frozen=True, slots=True)
class Rejects:
    """Events dropped while decoding a batch or snapshot: the exact count, a few details."""

    count: int = 0
    errors: tuple[EventError, ...] = ()

    def __bool__(self) -> bool:
        return self.count > 0


NO_REJECTS: Final = Rejects()


def _events(obj: Mapping[str, Any], limit: int | None) -> tuple[tuple[Event, ...], Rejects]:
    items = _req(obj, "events", list)
    if limit is not None and len(items) > limit:
        raise ProtocolError("bad_schema", f"events: expected at most {limit} events, got {len(items)}")
    good, bad = events_from_wire(items)
    count = len(bad)
    errors: list[EventError] = []
    for i, exc in bad[:MAX_REJECT_DETAIL]:
        text, prefix = str(exc), f"{exc.field}: "
        detail = text.removeprefix(prefix)
        errors.append(EventError(f"events[{i}].{exc.field}", exc.expected, exc.got, detail=detail))
    return tuple(good), (Rejects(count, tuple(errors)) if count else NO_REJECTS)


# --------------------------------------------------------------------------------------
# Events: agent PUB -> aggregator SUB, multipart [b"ev", pack(batch.to_dict())].


@dataclass(frozen=True, slots=True)
class EventBatch:
    """A batch of events from one agent. An empty batch is a heartbeat carrying the last seq."""

    node: str
    epoch: str
    seq: int
    sent_ts: int
    events: tuple[Event, ...] = ()

    @property
    def is_heartbeat(self) -> bool:
        return not self.events

    def to_dict(self) -> dict[str, Any]:
        return {
            **_head("batch"),
            "node": self.node,
            "epoch": self.epoch,
            "seq": self.seq,
            "sent_ts": self.sent_ts,
            "events": [e.to_wire() for e in self.events],
        }


def decode_batch(obj: object) -> tuple[EventBatch, Rejects]:
    """Validate an event batch. Bad events are dropped and reported, the rest kept."""
    msg = _envelope(obj, "batch", "batch")
    node, epoch = _ident(msg, "node"), _ident(msg, "epoch")
    seq, sent_ts = _count(msg, "seq"), _count(msg, "sent_ts")
    events, rejects = _events(msg, MAX_BATCH_EVENTS)
    return EventBatch(node, epoch, seq, sent_ts, events), rejects


# --------------------------------------------------------------------------------------
# Control: agent DEALER <-> aggregator ROUTER.


@dataclass(frozen=True, slots=True)
class Hello:
    T: ClassVar[str] = "hello"
    node: str
    epoch: str
    version: str
    probes: tuple[str, ...]
    pid: int

    def to_dict(self) -> dict[str, Any]:
        return {
            **_head(self.T),
            "node": self.node,
            "epoch": self.epoch,
            "version": self.version,
            "probes": list(self.probes),
            "pid": self.pid,
        }

    @classmethod
    def from_dict(cls, msg: Mapping[str, Any]) -> Hello:
        return cls(
            node=_ident(msg, "node"),
            epoch=_ident(msg, "epoch"),
            version=_ident(msg, "version"),
            probes=_str_list(msg, "probes"),
            pid=_count(msg, "pid"),
        )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Both directions, every second. An agent's carries ``node``, ``epoch``, ``seq`` (the
    last batch seq it sent) and ``probes`` (each probe's name, state and detail, shown by
    ``xctl nodes``); the aggregator's carries ``start_id`` (new at every start)."""

    T: ClassVar[str] = "heartbeat"
    ts: int
    node: str | None = None
    epoch: str | None = None
    seq: int | None = None
    start_id: str | None = None
    probes: tuple[dict[str, str], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {**_head(self.T), "ts": self.ts}
        for name in ("node", "epoch", "seq", "start_id"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.probes is not None:
            out["probes"] = [dict(p) for p in self.probes]
        return out

    @classmethod
    def from_dict(cls, msg: Mapping[str, Any]) -> Heartbeat:
        ts = _count(msg, "ts")
        start_id = _ident(msg, "start_id") if msg.get("start_id") is not None else None
        if msg.get("node") is None:
            if start_id is None:
                raise ProtocolError(
                    "bad_schema", "node: missing (an agent heartbeat needs node, an aggregator one start_id)"
                )
            return cls(ts=ts, start_id=start_id)
        return cls(
            ts=ts,
            node=_ident(msg, "node"),
            epoch=_ident(msg, "epoch"),
            seq=_count(msg, "seq"),
            start_id=start_id,
            probes=_probe_states(msg),
        )


#: A probe's state in a heartbeat: name, state, detail, and (optional) ``cycle_ms``, the
#: average sampling pass in milliseconds.
_PROBE_KEYS: Final = ("name", "state", "detail", "cycle_ms")
_PROBE_KEYS_ALWAYS: Final = frozenset({"name", "state", "detail"})


def _probe_states(msg: Mapping[str, Any]) -> tuple[dict[str, str], ...] | None:
    raw = _opt(msg, "probes", list)
    if raw is None:
        return None
    if len(raw) > MAX_PROBES:
        raise ProtocolError("bad_schema", f"probes: expected at most {MAX_PROBES} probes, got {len(raw)}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _bad(f"probes[{i}]", "map", item)
        entry: dict[str, str] = {}
        for key in _PROBE_KEYS:
            value = item.get(key, "")
            if not isinstance(value, str):
                raise _bad(f"probes[{i}].{key}", "string", value)
            if value or key in _PROBE_KEYS_ALWAYS:
                entry[key] = value[:MAX_PROBE_DETAIL]
        out.append(entry)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SnapshotReq:
    T: ClassVar[str] = "snapshot_req"
    node: str
    req_id: str

    def to_dict(self) -> dict[str, Any]:
        return {**_head(self.T), "node": self.node, "req_id": self.req_id}

    @classmethod
    def from_dict(cls, msg: Mapping[str, Any]) -> SnapshotReq:
        return cls(node=_ident(msg, "node"), req_id=_ident(msg, "req_id"))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The minimal event list that rebuilds a node's local graph, as of batch ``seq``.

    ``rejected`` (not on the wire) reports events dropped while decoding it.
    """

    T: ClassVar[str] = "snapshot"
    node: str
    epoch: str
    seq: int
    req_id: str
    events: tuple[Event, ...]
    rejected: Rejects = field(default=NO_REJECTS, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            **_head(self.T),
            "node": self.node,
            "epoch": self.epoch,
            "seq": self.seq,
            "req_id": self.req_id,
            "events": [e.to_wire() for e in self.events],
        }

    @classmethod
    def from_dict(cls, msg: Mapping[str, Any]) -> Snapshot:
        node, epoch = _ident(msg, "node"), _ident(msg, "epoch")
        seq, req_id = _count(msg, "seq"), _ident(msg, "req_id")
        events, rejected = _events(msg, None)
        return cls(node, epoch, seq, req_id, events, rejected)


@dataclass(frozen=True, slots=True)
class Command:
    """A command for an agent (zap, …). ``id`` is the CLI-made idempotency key; ``deadline``
    is absolute, in ms since the epoch; ``target`` names pid *and* create time."""

    T: ClassVar[str] = "command"
    id: str
    op: str
    target: dict[str, Any]
    deadline: int
    requested_by: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **_head(self.T),
            "id": self.id,
            "op": self.op,
            "target": self.target,
            "deadline": self.deadline,
            "requested_by": self.requested_by,
            "args": self.args,
        }

    @classmethod
    def from_dict(cls, msg: Mapping[str, Any]) -> Command:
        return cls(
            id=_ident(msg, "id"),
            op=_ident(msg, "op"),
            target=_str_map(msg, "target"),
            deadline=_count(msg, "deadline"),
            requested_by=_ident(msg, "requested_by"),
            args=_str_map(msg, "args", required=False),
        )


@dataclass(frozen=True, slots=True)
class Ack:
    T: ClassVar[str] = "ack"
    id: str
    node: str

    def to_dict(self) -> dict[str, Any]:
        return {**_head(self.T), "id": self.id, "node": self.node}

    @classmethod
    def from_dict(cls, msg: Mapping[str, Any]) -> Ack:
        return cls(id=_ident(msg, "id"), node=_ident(msg, "node"))


@dataclass(frozen=True, slots=True)
class Result:
    T: ClassVar[str] = "result"
    id: str
    node: str
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **_head(self.T),
            "id": self.id,
            "node": self.node,
            "ok": self.ok,
            "data": self.data,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, msg: Mapping[str, Any]) -> Result:
        return cls(
            id=_ident(msg, "id"),
            node=_ident(msg, "node"),
            ok=_req(msg, "ok", bool),
            data=_str_map(msg, "data", required=False),
            error=_opt(msg, "error", str),
        )


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """Sent back to a peer that sent garbage or speaks another version, instead of silence.

    Also the ``error`` of a failed query reply (there without ``v``/``t``).
    """

    T: ClassVar[str] = "error"
    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {**_head(self.T), "code": self.code, "message": self.message}

    def body(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_dict(cls, msg: Mapping[str, Any], *, path: str = "") -> ErrorMessage:
        return cls(code=_req(msg, "code", str, path=path), message=_req(msg, "message", str, path=path))

    @classmethod
    def from_exception(cls, exc: XctlError) -> ErrorMessage:
        """``code`` is the exception's code; a version mismatch gets its own code, VERSION."""
        code = "VERSION" if isinstance(exc, ProtocolError) and exc.reason == "version" else exc.code
        return cls(code=code, message=str(exc))


ControlMessage = Hello | Heartbeat | SnapshotReq | Snapshot | Command | Ack | Result | ErrorMessage

_CONTROL: Final[dict[str, Any]] = {
    cls.T: cls.from_dict for cls in (Hello, Heartbeat, SnapshotReq, Snapshot, Command, Ack, Result, ErrorMessage)
}


def decode_control(obj: object) -> ControlMessage:
    """Validate a control message and build its dataclass (dispatching on ``t``)."""
    msg = _envelope(obj, "message", None)
    t = _req(msg, "t", str)
    build = _CONTROL.get(t)
    if build is None:
        raise ProtocolError(
            "bad_schema", f"t: unknown control message type {_shown(t)} (expected one of {', '.join(_CONTROL)})"
        )
    result: ControlMessage = build(msg)
    return result


# --------------------------------------------------------------------------------------
# Queries: CLI REQ -> aggregator ROUTER.


@dataclass(frozen=True, slots=True)
class QueryRequest:
    id: str
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**_head("query"), "id": self.id, "op": self.op, "args": self.args}


def decode_query(obj: object) -> QueryRequest:
    msg = _envelope(obj, "query", "query")
    return QueryRequest(id=_ident(msg, "id"), op=_ident(msg, "op"), args=_str_map(msg, "args", required=False))


@dataclass(frozen=True, slots=True)
class QueryReply:
    """``{v, id, ok: true, data}`` or ``{v, id, ok: false, error: {code, message}}``.

    ``id`` is empty when the request was unreadable (its id unknown); a REQ socket has one
    request in flight, so the client takes such an error reply as the answer to it.
    """

    id: str
    ok: bool
    data: Any = None
    error: ErrorMessage | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {**_head("reply"), "id": self.id, "ok": self.ok}
        if self.ok:
            out["data"] = self.data
        else:
            err = self.error or ErrorMessage("ERROR", "unknown error")
            out["error"] = err.body()
        return out


def ok_reply(request_id: str, data: Any) -> QueryReply:
    return QueryReply(id=request_id, ok=True, data=data)


def error_reply(request_id: str, exc: XctlError) -> QueryReply:
    """The reply for a failed query: the exception's ``code`` and message."""
    return QueryReply(id=request_id, ok=False, error=ErrorMessage.from_exception(exc))


def decode_reply(obj: object) -> QueryReply:
    msg = _envelope(obj, "reply", "reply")
    request_id = _ident(msg, "id", empty_ok=True)
    if _req(msg, "ok", bool):
        return QueryReply(id=request_id, ok=True, data=msg.get("data"))
    return QueryReply(id=request_id, ok=False, error=ErrorMessage.from_dict(_str_map(msg, "error"), path="error."))


_EXCEPTIONS: Final[dict[str, type[XctlError]]] = {
    cls.code: cls for cls in (UsageError, TargetError, ConfigError, NotFoundError, NotAuthorisedError)
}


def exception_for(error: ErrorMessage) -> XctlError:
    """The exception a caller should raise for an error reply (matching ``code``).

    Unknown codes give a plain :class:`XctlError` whose ``code`` attribute is the reply's,
    so JSON output keeps it.
    """
    if error.code == "VERSION":
        return ProtocolError("version", error.message)
    if error.code == ProtocolError.code:
        return ProtocolError("peer", error.message)
    cls = _EXCEPTIONS.get(error.code)
    if cls is not None:
        return cls(error.message)
    exc = XctlError(error.message)
    exc.code = error.code
    return exc
