"""The probe contract: what the agent's supervisor runs, each probe in its own thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from xctl.core.clock import Clock
from xctl.core.events import Event


@dataclass
class ProbeContext:
    """What a running probe may touch. Owned by the supervisor; one per probe thread.

    - ``emit(event)`` hands an event to the agent (bounded queue; never blocks for long).
    - ``beat()`` says "alive" without an event (a quiet probe is not a hung probe).
    - ``bad(reason)`` counts a rejected input line/sample by reason (rate-limited logging
      is the supervisor's job).
    - ``stop`` is set when the probe must return; sleep with ``stop.wait(seconds)``.
    - ``cycle(seconds)`` reports what one sampling pass took (wall clock: NVML and /proc reads
      wait on the kernel or the driver), shown per probe by ``xctl nodes`` and /metrics.
    """

    node: str
    clock: Clock
    emit: Callable[[Event], None]
    beat: Callable[[], None]
    bad: Callable[[str], None]
    stop: threading.Event = field(default_factory=threading.Event)
    cycle: Callable[[float], None] = field(default=lambda _seconds: None)


Sampler = Callable[[int, Callable[[str], None]], list[Event]]


def run_every(ctx: ProbeContext, interval_s: float, sample: Sampler) -> None:
    """The loop of a sampling probe: sample, hand the events over, report the pass, sleep."""
    while not ctx.stop.is_set():
        started = time.perf_counter()
        for event in sample(ctx.clock(), ctx.bad):
            ctx.emit(event)
        ctx.cycle(time.perf_counter() - started)
        ctx.beat()
        if ctx.stop.wait(interval_s):
            break


class Probe(Protocol):
    """A probe runs until ``ctx.stop`` is set. Raising means "crashed": it is restarted."""

    #: Unique name within an agent, e.g. ``procfs`` or ``exec:my-script``.
    name: str
    #: If set, a probe that neither emits nor beats for this long is reported hung.
    heartbeat_s: float | None

    def run(self, ctx: ProbeContext) -> None: ...

    def describe(self) -> str:
        """One line saying what it monitors (shown by ``xctl nodes``)."""
        ...
