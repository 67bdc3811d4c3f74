"""Injected clocks. The core never reads the time itself; daemons pass a real clock in."""

from __future__ import annotations

from collections.abc import Callable

#: A clock returns milliseconds since the epoch.
Clock = Callable[[], int]


class ManualClock:
    """A clock that moves only when told to: deterministic tests and replays."""

    __slots__ = ("now",)

    def __init__(self, start_ms: int = 1_732_350_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> int:
        self.now += ms
        return self.now
