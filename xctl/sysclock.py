"""The real clock, injected into the pure core by the daemons."""

from __future__ import annotations

import time


def wall_ms() -> int:
    """Milliseconds since the epoch (the event-timestamp clock)."""
    return time.time_ns() // 1_000_000


def mono_s() -> float:
    """Monotonic seconds, for intervals and deadlines inside one process."""
    return time.monotonic()
