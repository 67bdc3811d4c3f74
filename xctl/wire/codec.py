"""msgpack codec with hard limits (DESIGN §6 "Limits").

Everything that arrives from a socket goes through :func:`unpack`, which never raises
anything but :class:`~xctl.core.errors.ProtocolError` with one of three reasons:

- ``too_large``: the frame, or a length declared inside it, exceeds the limit;
- ``too_deep``: containers nested deeper than the unpacker (or the caller) allows;
- ``bad_msgpack``: anything else that is not one complete msgpack object.

The protocol uses no msgpack extension types (not even timestamps), so they are refused.
"""

from __future__ import annotations

from typing import Any, Final, NoReturn

import msgpack

from xctl.core.errors import ProtocolError

#: Major protocol version; a peer with another major version is refused with a clear error.
PROTOCOL_VERSION: Final = 1

KiB: Final = 1024
MiB: Final = 1024 * KiB

#: One event batch (agent PUB → aggregator SUB).
EVENTS_MAX: Final = 1 * MiB
#: One control message (snapshots are the big ones).
CONTROL_MAX: Final = 4 * MiB
#: One query coming in to the aggregator from a CLI.
QUERY_MAX: Final = 64 * KiB
#: One reply going back to a CLI (``events``/``ps`` on a big cluster can be large).
REPLY_MAX: Final = 16 * MiB
#: Nesting depth allowed in queries (checked by the aggregator, see :func:`unpack`).
QUERY_MAX_DEPTH: Final = 32


def pack(obj: Any) -> bytes:
    """Encode ``obj`` (maps with str keys, lists, str, bytes, ints, floats, bools, None)."""
    try:
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("unencodable", f"cannot encode message: {exc}") from exc


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise ProtocolError("bad_msgpack", f"msgpack extension type {code} is not part of the xctl protocol")


def unpack(data: bytes, *, limit: int, max_depth: int | None = None) -> Any:
    """Decode exactly one msgpack object from ``data``.

    ``limit`` bounds the frame size (``too_large``). Every length declared inside the frame
    is bounded by the frame's own size (an array cannot have more elements than the frame has
    bytes), so a short frame declaring a 2**31-element array is refused as ``bad_msgpack``
    before anything is allocated.
    msgpack itself refuses nesting deeper than 1024; ``max_depth`` sets a tighter bound,
    checked after decoding (cheap for small frames: use it for queries).
    """
    size = len(data)
    if size > limit:
        raise ProtocolError("too_large", f"message of {size} bytes exceeds the limit of {limit} bytes")
    bound = size  # <= limit
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            max_str_len=bound,
            max_bin_len=bound,
            max_array_len=bound,
            max_map_len=bound // 2,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except (msgpack.StackError, RecursionError) as exc:
        raise ProtocolError("too_deep", "message nested too deeply") from exc
    except msgpack.ExtraData as exc:
        raise ProtocolError("bad_msgpack", "extra bytes after the message") from exc
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad_msgpack", f"string is not valid UTF-8 ({exc.reason})") from exc
    except (ValueError, TypeError, OverflowError) as exc:
        text = str(exc)
        if "max_ext_len" in text:  # every extension type is refused by max_ext_len=0
            raise ProtocolError("bad_msgpack", "msgpack extension types are not part of the xctl protocol") from exc
        if "exceeds max" in text:  # the max_*_len bounds are the frame's own size
            raise ProtocolError("bad_msgpack", f"a length inside the message exceeds its size ({text[:80]})") from exc
        raise ProtocolError("bad_msgpack", f"not valid msgpack: {text[:120] or type(exc).__name__}") from exc
    if max_depth is not None:
        _check_depth(obj, max_depth)
    return obj


def _check_depth(obj: Any, max_depth: int) -> None:
    """Iterative walk (no recursion) refusing containers nested deeper than ``max_depth``."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            children: Any = item
        elif isinstance(item, dict):
            children = item.values()
        else:
            continue
        if depth >= max_depth:
            raise ProtocolError("too_deep", f"message nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, list | dict))


class DropCounter:
    """Counts dropped or malformed input by reason. Owned by one thread; not locked."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def count(self, reason: str, n: int = 1) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + n

    def get(self, reason: str) -> int:
        return self._counts.get(reason, 0)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """A copy, safe to hand to another thread (e.g. for /metrics)."""
        return dict(self._counts)

    def __repr__(self) -> str:
        return f"DropCounter({self._counts!r})"
