"""Wait for a condition with a deadline: the one polling helper that every test folder shares.

``tests/conftest.py`` puts this folder on ``sys.path``, so ``from waiting import wait_for`` works
from tests/unit, tests/integration, tests/fuzz and the rest alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    ignoring: tuple[type[Exception], ...] = (),
) -> T:
    """Poll ``check`` until it returns something truthy, and return that value.

    ``check`` runs at once, then every ``interval`` seconds, and a last time at the deadline: a
    sleep is cut short there, never run past it. An exception of a type in ``ignoring`` (a daemon
    that does not answer yet, say) counts as a falsy answer and is kept as the last value seen;
    any other exception propagates. At the deadline, AssertionError names ``what`` and the last
    value seen.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = value = check()
        except ignoring as exc:
            last = exc
        else:
            if value:
                return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(min(interval, left))
