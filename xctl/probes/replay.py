"""``replay:FILE`` — replays a recorded or hand-written JSON-lines scene.

Each line is a probe event (DESIGN §3) timed either by ``t`` (seconds, relative, may be
negative) or by ``ts`` (absolute ms). The file is rebased so its last event happens *now*:
``t`` lines get ``now + (t - t_max) * 1000``, ``ts`` lines are shifted by ``now - ts_max``
(the two kinds are rebased separately). A line with neither is stamped *now*. Everything is
emitted at once in file order; then the probe idles (beating) until stopped. Blank lines and
lines starting with ``#`` are ignored; bad lines are counted and logged with file:line.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Final

from xctl.core.errors import EventError, ProbeError
from xctl.core.events import MAX_LINE_BYTES, Event, event_from_mapping
from xctl.probes.base import ProbeContext

log = logging.getLogger(__name__)

#: A replay file is loaded whole; refuse anything larger than this.
MAX_REPLAY_BYTES: Final = 64 * 1024 * 1024
#: How often an idle replay probe says it is alive.
BEAT_S: Final = 5.0
#: Bad lines logged individually; the rest are summarised.
MAX_LOGGED_ERRORS: Final = 20


@dataclass(frozen=True, slots=True)
class _Parsed:
    lineno: int
    event: Event
    t: float | None
    ts: int | None


def load_replay(
    text: str, now_ms: int, node: str | None, *, source: str | None = None
) -> tuple[list[Event], list[str]]:
    """Parse and rebase a replay file.

    Returns the events in file order and one message per bad line, ``line N: why`` (or
    ``SOURCE:N: why`` when ``source`` is given). A bad line never stops the others.
    """
    parsed: list[_Parsed] = []
    errors: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parsed.append(_parse(line, lineno, now_ms, node))
        except EventError as exc:
            errors.append(f"{source}:{lineno}: {exc}" if source else f"line {lineno}: {exc}")
    t_max = max((p.t for p in parsed if p.t is not None), default=0.0)
    ts_max = max((p.ts for p in parsed if p.ts is not None), default=now_ms)
    events: list[Event] = []
    for p in parsed:
        if p.t is not None:
            ts = now_ms + round((p.t - t_max) * 1000)
        elif p.ts is not None:
            ts = p.ts + (now_ms - ts_max)
        else:
            ts = now_ms
        events.append(_with_ts(p.event, max(ts, 0)))
    return events, errors


def _parse(line: str, lineno: int, now_ms: int, node: str | None) -> _Parsed:
    if len(line.encode("utf-8", "surrogatepass")) > MAX_LINE_BYTES:
        raise EventError("line", f"at most {MAX_LINE_BYTES} bytes", detail="line too long")
    try:
        obj: Any = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise EventError("line", "a JSON object", detail="not valid JSON") from exc
    if not isinstance(obj, dict):
        raise EventError("line", "a JSON object", obj)
    t = obj.pop("t", None)
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise EventError("t", "seconds relative to the scene (a number, e.g. -2.5)", t)
        if "ts" in obj:
            raise EventError("t", "either t (relative seconds) or ts (absolute ms)", detail="both t and ts given")
        obj["ts"] = now_ms  # placeholder, validated with the rest and replaced when rebasing
    event = event_from_mapping(obj, now_ms=now_ms, node=node)
    ts = event.ts if t is None and obj.get("ts") is not None else None
    return _Parsed(lineno, event, float(t) if t is not None else None, ts)


def _with_ts(event: Event, ts: int) -> Event:
    return Event(
        ts=ts,
        type=event.type,
        entity=event.entity,
        value=event.value,
        pid=event.pid,
        job=event.job,
        attrs=event.attrs,
    )


class ReplayProbe:
    """Emits a replay file's events, rebased to now, once; then idles until stopped."""

    heartbeat_s: float | None = 30.0

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = f"replay:{os.path.basename(path)}"

    @classmethod
    def from_spec(cls, arg: str | None) -> ReplayProbe:
        if arg is None or not arg.strip():
            raise ProbeError("replay needs a file: write replay:FILE, e.g. replay:scenes/xid79.jsonl")
        path = os.path.expanduser(arg.strip())
        _check_file(path)
        return cls(path)

    def describe(self) -> str:
        return f"replay of {self.path}"

    def run(self, ctx: ProbeContext) -> None:
        text = _read(self.path)
        events, errors = load_replay(text, ctx.clock(), ctx.node, source=self.path)
        for message in errors[:MAX_LOGGED_ERRORS]:
            log.warning("replay: %s", message)
        if len(errors) > MAX_LOGGED_ERRORS:
            log.warning("replay %s: %d more bad lines not logged", self.path, len(errors) - MAX_LOGGED_ERRORS)
        for _ in errors:
            ctx.bad("bad_event")
        for event in events:
            if ctx.stop.is_set():
                return
            ctx.emit(event)
        log.info("replay %s: %d events emitted, %d bad lines", self.path, len(events), len(errors))
        ctx.beat()
        while not ctx.stop.wait(BEAT_S):
            ctx.beat()


def _check_file(path: str) -> int:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ProbeError(f"replay: file {path!r} not found: give the path of a JSON-lines file") from None
    except OSError as exc:
        raise ProbeError(f"replay: cannot read {path!r}: {exc.strerror or exc}") from exc
    if not os.path.isfile(path):
        raise ProbeError(f"replay: {path!r} is not a regular file: give the path of a JSON-lines file")
    if size > MAX_REPLAY_BYTES:
        raise ProbeError(
            f"replay: {path!r} is {size} bytes, more than {MAX_REPLAY_BYTES}: split it or use sim for volume"
        )
    return size


def _read(path: str) -> str:
    _check_file(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(MAX_REPLAY_BYTES + 1)
    except OSError as exc:
        raise ProbeError(f"replay: cannot read {path!r}: {exc.strerror or exc}") from exc
