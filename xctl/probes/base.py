"""The probe contract: what the agent's supervisor runs, each probe in its own thread."""

from __future__ import annotations

import threading
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
    """

    node: str
    clock: Clock
    emit: Callable[[Event], None]
    beat: Callable[[], None]
    bad: Callable[[str], None]
    stop: threading.Event = field(default_factory=threading.Event)


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
