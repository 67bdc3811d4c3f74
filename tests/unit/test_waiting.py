"""The shared polling helper (tests/waiting.py)."""

from __future__ import annotations

import time

import pytest
from waiting import wait_for


def test_returns_the_first_truthy_value() -> None:
    answers: list[object] = [None, 0, [], "", {"ok": 1}, "later"]
    assert wait_for(lambda: answers.pop(0), timeout=5, what="an answer", interval=0.001) == {"ok": 1}


def test_times_out_naming_what_and_the_last_value_seen() -> None:
    with pytest.raises(AssertionError, match=r"^timed out after 0.2s waiting for the flag; last: \[\]$"):
        wait_for(list, timeout=0.2, what="the flag")


def test_never_sleeps_past_the_deadline() -> None:
    calls: list[float] = []
    started = time.monotonic()
    with pytest.raises(AssertionError):
        wait_for(lambda: calls.append(time.monotonic()), timeout=0.2, what="nothing", interval=5.0)
    assert time.monotonic() - started < 1.0, "a 5 s interval is cut short at the 0.2 s deadline"
    assert 2 <= len(calls) <= 3, "one check at once, one at the deadline (a sleep may end a hair early)"
    assert calls[1] - started >= 0.2


def test_listed_exceptions_count_as_not_yet_and_others_propagate() -> None:
    answers: list[str | Exception] = [ConnectionError("not up"), ConnectionError("still not"), "up"]

    def check() -> str:
        answer = answers.pop(0) if answers else ConnectionError("down")
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_for(check, timeout=5, what="the server", interval=0.001, ignoring=(ConnectionError,)) == "up"
    with pytest.raises(AssertionError, match=r"last: ConnectionError\('down'\)$"):
        wait_for(check, timeout=0.05, what="the server", ignoring=(ConnectionError,))
    with pytest.raises(ZeroDivisionError):
        wait_for(lambda: 1 // 0, timeout=5, what="a number", ignoring=(ConnectionError,))
