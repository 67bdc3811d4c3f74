"""exec:COMMAND against real child processes (tests/fixtures/probes/fake_probe.py)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from waiting import wait_for

from xctl.core.errors import ProbeError
from xctl.core.events import MAX_LINE_BYTES, Event, EventType
from xctl.probes.base import ProbeContext
from xctl.probes.exec_probe import ExecProbe, LineSplitter, RateLimitedLog
from xctl.probes.registry import make_probe

FAKE = Path(__file__).resolve().parents[1] / "fixtures" / "probes" / "fake_probe.py"
NODE = "node-1"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Harness:
    probe: ExecProbe
    events: list[Event] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    beats: list[int] = field(default_factory=list)
    error: list[BaseException] = field(default_factory=list)
    ctx: ProbeContext = field(init=False)
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.ctx = ProbeContext(
            node=NODE,
            clock=now_ms,
            emit=self.events.append,
            beat=lambda: self.beats.append(1),
            bad=self.bad.append,
        )
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.probe.run(self.ctx)
        except Exception as exc:  # noqa: BLE001 - recorded for the test to inspect
            self.error.append(exc)

    def start(self) -> Harness:
        self.thread.start()
        return self

    def stop(self, timeout: float = 3.0) -> float:
        began = time.monotonic()
        self.ctx.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not return after stop"
        return time.monotonic() - began


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def harness() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(*args: str, term_grace_s: float = 1.0) -> Harness:
        h = Harness(ExecProbe([sys.executable, str(FAKE), *args], term_grace_s=term_grace_s))
        made.append(h)
        return h.start()

    yield make
    for h in made:
        h.ctx.stop.set()
        h.thread.join(5)


def test_good_lines_emitted_bad_lines_counted(harness: Callable[..., Harness]) -> None:
    h = harness("mixed")
    wait_for(lambda: len(h.events) >= 2, timeout=5.0, what="two events")
    wait_for(lambda: len(h.bad) >= 4, timeout=5.0, what="four bad lines")
    h.stop()
    assert [e.value for e in h.events] == ["10", "20"]
    first = h.events[0]
    assert (first.ts, first.type, first.entity, first.pid, first.job) == (
        1732350000123,
        EventType.COMPUTE_UTIL,
        "gpu-0",
        4812,
        "job-42",
    )
    assert abs(h.events[1].ts - now_ms()) < 10_000  # no ts: stamped on receipt
    assert sorted(h.bad) == ["bad_event", "bad_event", "bad_json", "bad_json"]
    assert h.beats  # each line read says "alive"
    assert not h.error


def test_bad_lines_logged_at_most_once_per_window(
    harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="xctl.probes.exec_probe"):
        h = harness("mixed")
        wait_for(lambda: len(h.bad) >= 4, timeout=5.0, what="four bad lines")
        h.stop()
    rejected = [r for r in caplog.records if "rejected a line" in r.getMessage()]
    assert len(rejected) == 1
    assert "bad_json" in rejected[0].getMessage()


def test_child_exit_raises_probe_error(harness: Callable[..., Harness]) -> None:
    h = harness("exit", "3")
    h.thread.join(5)
    assert not h.thread.is_alive()
    assert len(h.error) == 1
    assert isinstance(h.error[0], ProbeError)
    assert "exited with code 3" in str(h.error[0])
    assert [e.value for e in h.events] == ["1"]  # output before the exit is not lost


def test_clean_exit_still_counts_as_ended(harness: Callable[..., Harness]) -> None:
    h = harness("exit", "0")
    h.thread.join(5)
    assert isinstance(h.error[0], ProbeError)
    assert "exited with code 0" in str(h.error[0])


def test_stop_terminates_child_quickly(harness: Callable[..., Harness]) -> None:
    h = harness("sleep")
    wait_for(lambda: len(h.events) >= 1, timeout=5.0, what="an event")
    child = h.events[0].pid
    assert child is not None
    assert pid_alive(child)
    assert h.stop() < 2.0
    assert not h.error  # stopping is not a crash
    wait_for(lambda: not pid_alive(child), timeout=2.0, what="the child to end")


def test_child_ignoring_sigterm_is_killed(harness: Callable[..., Harness]) -> None:
    h = harness("stubborn", term_grace_s=0.3)
    wait_for(lambda: len(h.events) >= 1, timeout=5.0, what="an event")
    child = h.events[0].pid
    assert child is not None
    elapsed = h.stop()
    assert 0.3 <= elapsed < 2.0
    wait_for(lambda: not pid_alive(child), timeout=2.0, what="the child to end")


def test_line_claiming_another_node_is_refused(harness: Callable[..., Harness]) -> None:
    h = harness("other-node")
    wait_for(lambda: len(h.events) >= 1, timeout=5.0, what="an event")
    h.stop()
    assert h.bad == ["wrong_node"]
    assert [e.value for e in h.events] == ["2"]


def test_oversized_line_is_dropped_and_next_line_survives(harness: Callable[..., Harness]) -> None:
    h = harness("long-line")
    wait_for(lambda: len(h.events) >= 1, timeout=5.0, what="an event")
    h.stop()
    assert h.bad == ["line_too_long"]
    assert [e.value for e in h.events] == ["after"]


def test_stderr_is_logged_bounded(harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="xctl.probes.exec_probe"):
        h = harness("stderr")
        wait_for(lambda: len(h.events) >= 1, timeout=5.0, what="an event")
        wait_for(lambda: sum("stderr" in r.getMessage() for r in caplog.records) >= 2, timeout=5.0,
                 what="two stderr lines logged")
        h.stop()
    messages = [r.getMessage() for r in caplog.records if "stderr" in r.getMessage()]
    assert any("warming up" in m for m in messages)
    assert all(len(m) < 500 for m in messages)
    assert not h.bad


def test_grandchild_holding_stdout_does_not_hide_exit(harness: Callable[..., Harness]) -> None:
    h = harness("grandchild")
    h.thread.join(5)
    assert not h.thread.is_alive()
    assert isinstance(h.error[0], ProbeError)
    assert "exited with code 3" in str(h.error[0])
    grandchild = h.events[0].pid
    assert grandchild is not None
    wait_for(lambda: not pid_alive(grandchild), timeout=2.0, what="the grandchild to end")  # the group was cleaned up


def test_missing_executable_is_a_probe_error() -> None:
    with pytest.raises(ProbeError, match="not found"):
        make_probe("exec:/nonexistent/probe --json")


def test_unbalanced_quotes_are_a_probe_error() -> None:
    with pytest.raises(ProbeError, match="quotes"):
        ExecProbe.from_spec("python3 -c 'print(1)")


def test_empty_command_is_a_probe_error() -> None:
    with pytest.raises(ProbeError, match="exec:COMMAND"):
        ExecProbe.from_spec("   ")


def test_spec_name_and_describe() -> None:
    probe = make_probe(f"exec:{sys.executable} {FAKE} sleep")
    assert isinstance(probe, ExecProbe)
    assert probe.name == f"exec:{os.path.basename(sys.executable)}"
    assert probe.heartbeat_s is None
    assert "fake_probe.py sleep" in probe.describe()
    assert probe.term_grace_s == 1.0  # SIGTERM, then SIGKILL after 1 s
    assert ExecProbe(["/bin/true"], heartbeat_s=30.0).heartbeat_s == 30.0


def test_line_splitter_bounds_memory() -> None:
    s = LineSplitter(max_bytes=8)
    assert s.feed(b"abc\r\nde") == [b"abc"]
    assert s.feed(b"f\n") == [b"def"]
    assert s.feed(b"0123456789") == []
    assert len(s._buf) == 0  # the long line is not kept
    assert s.feed(b"xyz\nok\n") == [None, b"ok"]
    assert s.feed(b"12345678\n") == [b"12345678"]
    assert s.feed(b"tail") == []
    assert s.flush() == [b"tail"]
    assert s.feed(b"way too long") == []
    assert s.flush() == [None]
    assert s.flush() == []


def test_line_splitter_default_is_the_protocol_limit() -> None:
    s = LineSplitter()
    assert s.feed(b"a" * MAX_LINE_BYTES + b"\n") == [b"a" * MAX_LINE_BYTES]
    assert s.feed(b"a" * (MAX_LINE_BYTES + 1) + b"\n") == [None]


def test_rate_limited_log_counts_suppressed() -> None:
    r = RateLimitedLog(10_000)
    assert r.allow(0) == 0
    assert r.allow(1) is None
    assert r.allow(9_999) is None
    assert r.allow(10_000) == 2
    assert r.allow(10_001) is None
