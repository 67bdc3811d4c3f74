"""Multipart framing: how messages sit in ZeroMQ frames, in one place.

- Events (PUB → SUB): ``[b"ev", pack(batch)]``.
- Queries arriving at a ROUTER from a REQ: ``[routing_id…, b"", pack(query)]``; the reply
  goes back as ``[routing_id…, b"", pack(reply)]``.
- Control at the ROUTER: ``[routing_id, pack(message)]``; at the DEALER: ``[pack(message)]``.

Every reader raises :class:`~xctl.core.errors.ProtocolError` only (``bad_frame`` for wrong
framing, plus the codec's and the schema's reasons).
"""

from __future__ import annotations

from collections.abc import Sequence

from xctl.core.errors import ProtocolError
from xctl.wire.codec import CONTROL_MAX, EVENTS_MAX, QUERY_MAX, QUERY_MAX_DEPTH, pack, unpack
from xctl.wire.messages import (
    ControlMessage,
    EventBatch,
    QueryReply,
    QueryRequest,
    Rejects,
    decode_batch,
    decode_control,
    decode_query,
)
from xctl.wire.sockets import EVENTS_TOPIC


def batch_frames(batch: EventBatch) -> list[bytes]:
    """The frames to send for ``batch``. The caller keeps each batch under EVENTS_MAX."""
    return [EVENTS_TOPIC, pack(batch.to_dict())]


def read_batch(frames: Sequence[bytes]) -> tuple[EventBatch, Rejects]:
    """Decode the frames received on the events SUB socket."""
    if len(frames) != 2 or frames[0] != EVENTS_TOPIC:
        raise ProtocolError("bad_frame", f"event message: expected 2 frames [b'ev', batch], got {len(frames)}")
    return decode_batch(unpack(frames[1], limit=EVENTS_MAX))


def read_control(payload: bytes) -> ControlMessage:
    """Decode one control message payload (the last frame)."""
    return decode_control(unpack(payload, limit=CONTROL_MAX))


def control_frames(message: ControlMessage, routing_id: bytes | None = None) -> list[bytes]:
    """Frames for a control message; ``routing_id`` when sending from the ROUTER."""
    payload = pack(message.to_dict())
    return [payload] if routing_id is None else [routing_id, payload]


def split_envelope(frames: Sequence[bytes]) -> tuple[list[bytes], bytes]:
    """Split ``[routing_id…, b"", payload]`` (what a ROUTER gets from a REQ)."""
    if len(frames) < 3 or frames[-2] != b"":
        raise ProtocolError("bad_frame", "query: expected [routing id, empty delimiter, payload] (a REQ socket)")
    return list(frames[:-2]), frames[-1]


def read_query(payload: bytes) -> QueryRequest:
    """Decode a query payload, with the query size and nesting limits."""
    return decode_query(unpack(payload, limit=QUERY_MAX, max_depth=QUERY_MAX_DEPTH))


def reply_frames(envelope: Sequence[bytes], reply: QueryReply) -> list[bytes]:
    """Frames a query ROUTER sends back for ``reply``."""
    return [*envelope, b"", pack(reply.to_dict())]
