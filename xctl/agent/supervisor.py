"""Runs each probe in its own thread and hands events over through one bounded queue.

A probe that raises is restarted with exponential backoff; one that stops emitting and
beating for longer than its declared heartbeat is reported hung and replaced by a fresh
instance (a Python thread cannot be killed; the stuck one is abandoned as a daemon thread
and its output ignored). Either way an ``error.hw`` event on ``probe:NAME`` with value
PROBE_CRASHED / PROBE_HUNG records the blind spot (DESIGN §3). The queue drops the oldest
event when full and counts it: a flood from one probe never blocks the others or the agent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from xctl.core.clock import Clock
from xctl.core.events import Event, EventType
from xctl.probes.base import Probe, ProbeContext

log = logging.getLogger(__name__)

QUEUE_MAX: Final = 50_000
BACKOFF_START_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
#: Weight of the newest pass in a probe's average pass time (about the last 10 passes).
CYCLE_AVG_WEIGHT: Final = 0.1


@dataclass
class ProbeSlot:
    """The supervisor's record of one probe: its current instance and health."""

    name: str
    factory: Callable[[], Probe]
    probe: Probe | None = None
    ctx: ProbeContext | None = None
    thread: threading.Thread | None = None
    state: str = "starting"
    detail: str = ""
    restarts: int = 0
    crashes: int = 0
    hangs: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    last_beat: float = 0.0
    backoff_s: float = BACKOFF_START_S
    restart_at: float = 0.0
    generation: int = 0
    #: Sampling passes reported through ``ctx.cycle`` and the seconds they took in all.
    cycles: int = 0
    cycle_s_total: float = 0.0
    #: A moving average of one pass, for ``xctl nodes`` (None: the probe reports no passes).
    cycle_s_avg: float | None = None

    def record_cycle(self, seconds: float) -> None:
        self.cycles += 1
        self.cycle_s_total += seconds
        avg = self.cycle_s_avg
        self.cycle_s_avg = seconds if avg is None else avg + (seconds - avg) * CYCLE_AVG_WEIGHT

    def as_dict(self) -> dict[str, str]:
        out = {"name": self.name, "state": self.state, "detail": self.detail}
        if self.cycle_s_avg is not None:
            out["cycle_ms"] = f"{self.cycle_s_avg * 1000:.3f}"
        return out


class Supervisor:
    """Owns the probe threads. ``drain()`` is called by the agent loop (one consumer)."""

    def __init__(self, node: str, clock: Clock, *, queue_max: int = QUEUE_MAX) -> None:
        self.node = node
        self.clock = clock
        self.slots: list[ProbeSlot] = []
        self._queue: deque[Event] = deque(maxlen=queue_max)
        self._queue_max = queue_max
        self.dropped = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        # The consumer sleeps in poll() on this pipe: a probe writes one byte when it puts an
        # event into an empty queue, so an idle agent wakes only when there is work.
        self.wake_fd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ---------------------------------------------------------------- setup
    def add(self, name: str, factory: Callable[[], Probe]) -> ProbeSlot:
        slot = ProbeSlot(name, factory)
        self.slots.append(slot)
        return slot

    def add_disabled(self, name: str, reason: str) -> None:
        self.slots.append(ProbeSlot(name, _never, state="disabled", detail=reason))

    def start(self) -> None:
        for slot in self.slots:
            if slot.state != "disabled":
                self._launch(slot)

    def stop(self, timeout_s: float = 1.5) -> None:
        """Ask every probe to stop and wait a bounded time; stuck threads are daemons."""
        self._stopping.set()
        for slot in self.slots:
            if slot.ctx is not None:
                slot.ctx.stop.set()
        deadline = time.monotonic() + timeout_s
        for slot in self.slots:
            if slot.thread is not None:
                slot.thread.join(max(0.0, deadline - time.monotonic()))

    # ---------------------------------------------------------------- queue
    def _emit(self, slot: ProbeSlot, generation: int, event: Event) -> None:
        if generation != slot.generation:
            return  # an abandoned (hung) instance woke up: ignore it
        slot.last_beat = time.monotonic()
        queue = self._queue
        if len(queue) >= self._queue_max:
            with self._lock:
                self.dropped += 1
        was_empty = not queue
        queue.append(event)
        if was_empty:
            self.wake()

    def wake(self) -> None:
        """Wake the consumer's poll() (a probe event, a failure, or a stop request)."""
        # A full pipe means the consumer is already awake; a closed one that we are stopping.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\x00")

    def clear_wake(self) -> None:
        """Called by the consumer when poll() reported the wake fd readable."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self.wake_fd, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def drain(self, limit: int = 5_000) -> list[Event]:
        out: list[Event] = []
        queue = self._queue
        while queue and len(out) < limit:
            out.append(queue.popleft())
        return out

    def pending(self) -> int:
        return len(self._queue)

    # ---------------------------------------------------------------- threads
    def _launch(self, slot: ProbeSlot) -> None:
        try:
            probe = slot.factory()
        except Exception as exc:  # noqa: BLE001 - a probe's failure must never take the agent down
            slot.state, slot.detail = "disabled", f"cannot start: {exc}"
            log.warning("probe %s disabled: %s", slot.name, exc)
            return
        slot.generation += 1
        generation = slot.generation
        ctx = ProbeContext(
            node=self.node,
            clock=self.clock,
            emit=lambda ev: self._emit(slot, generation, ev),
            beat=lambda: self._beat(slot, generation),
            bad=lambda reason: self._bad(slot, generation, reason),
            cycle=lambda seconds: self._cycle(slot, generation, seconds),
        )
        slot.probe, slot.ctx = probe, ctx
        slot.last_beat = time.monotonic()
        slot.state = "running"
        try:
            slot.detail = probe.describe()
        except Exception as exc:  # noqa: BLE001 - describe() is informative only
            slot.detail = f"describe failed: {exc}"
        thread = threading.Thread(
            target=self._run, args=(slot, probe, ctx, generation), name=f"probe-{slot.name}", daemon=True
        )
        slot.thread = thread
        thread.start()

    def _beat(self, slot: ProbeSlot, generation: int) -> None:
        if generation == slot.generation:
            slot.last_beat = time.monotonic()

    def _cycle(self, slot: ProbeSlot, generation: int, seconds: float) -> None:
        if generation == slot.generation:
            slot.record_cycle(seconds)

    def _bad(self, slot: ProbeSlot, generation: int, reason: str) -> None:
        if generation != slot.generation:
            return
        # Only counted here: the probe itself logs the offending input, rate-limited.
        slot.bad[reason] = slot.bad.get(reason, 0) + 1

    def _run(self, slot: ProbeSlot, probe: Probe, ctx: ProbeContext, generation: int) -> None:
        try:
            probe.run(ctx)
        except Exception as exc:
            if generation == slot.generation and not ctx.stop.is_set():
                self._failed(slot, "PROBE_CRASHED", f"crashed: {type(exc).__name__}: {exc}")
                log.warning("probe %s crashed: %s", slot.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            return
        if generation == slot.generation and not ctx.stop.is_set() and not self._stopping.is_set():
            self._failed(slot, "PROBE_CRASHED", "ended unexpectedly")

    def _failed(self, slot: ProbeSlot, code: str, detail: str) -> None:
        """Record the failure as an event and schedule a restart with backoff."""
        if code == "PROBE_HUNG":
            slot.hangs += 1
        else:
            slot.crashes += 1
        slot.state = "hung" if code == "PROBE_HUNG" else "restarting"
        slot.detail = detail
        slot.restart_at = time.monotonic() + slot.backoff_s
        slot.backoff_s = min(slot.backoff_s * 2, BACKOFF_MAX_S)
        attrs = {"detail": detail[:500]}
        self._queue.append(Event(self.clock(), EventType.ERROR_HW, f"probe:{slot.name}", code, None, None, attrs))
        self.wake()

    def check(self) -> None:
        """Called by the agent loop about once a second: hung detection and restarts."""
        if self._stopping.is_set():
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "running" and slot.probe is not None:
                limit = slot.probe.heartbeat_s
                if limit is not None and now - slot.last_beat > limit:
                    if slot.ctx is not None:
                        slot.ctx.stop.set()
                    slot.generation += 1  # the stuck instance's output is ignored from now on
                    self._failed(slot, "PROBE_HUNG", f"no output for {now - slot.last_beat:.1f} s (limit {limit} s)")
                    log.warning("probe %s hung: %s", slot.name, slot.detail)
                elif now - slot.last_beat < 1.0 and slot.backoff_s > BACKOFF_START_S and slot.restarts:
                    slot.backoff_s = max(BACKOFF_START_S, slot.backoff_s / 2)
            elif slot.state in ("restarting", "hung") and now >= slot.restart_at:
                slot.restarts += 1
                self._launch(slot)

    def states(self) -> list[dict[str, str]]:
        return [s.as_dict() for s in self.slots]

    def counters(self) -> dict[str, object]:
        return {
            "queue_dropped": self.dropped,
            "probes": {
                s.name: {"state": s.state, "restarts": s.restarts, "crashes": s.crashes, "hangs": s.hangs, "bad": s.bad}
                for s in self.slots
            },
        }


def _never() -> Probe:
    raise RuntimeError("disabled probe")
