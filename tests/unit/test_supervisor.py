"""The probe supervisor: threads, bounded queue, crash/hang recovery (issue 3)."""

from __future__ import annotations

import select
import threading
import time

import pytest
from waiting import wait_for

from xctl.agent import supervisor as sup
from xctl.agent.supervisor import Supervisor
from xctl.core.events import Event, EventType
from xctl.probes.base import ProbeContext, run_every


def now_ms() -> int:
    return int(time.time() * 1000)


class Steady:
    """Emits one event every ``period`` seconds until stopped."""

    name = "steady"
    heartbeat_s: float | None = 5.0

    def __init__(self, period: float = 0.01) -> None:
        self.period = period

    def describe(self) -> str:
        return "steady test probe"

    def run(self, ctx: ProbeContext) -> None:
        i = 0
        while not ctx.stop.wait(self.period):
            ctx.emit(Event(ctx.clock(), EventType.COMPUTE_UTIL, "gpu-0", str(i % 100)))
            i += 1


class Crasher:
    name = "crasher"
    heartbeat_s: float | None = None
    runs = 0

    def describe(self) -> str:
        return "crashes at once"

    def run(self, ctx: ProbeContext) -> None:
        Crasher.runs += 1
        raise RuntimeError("boom")


class Hanger:
    """Never emits, never beats, ignores stop: a probe stuck in a syscall."""

    name = "hanger"
    heartbeat_s: float | None = 0.2
    release = threading.Event()

    def describe(self) -> str:
        return "hangs"

    def run(self, ctx: ProbeContext) -> None:
        Hanger.release.wait(30)


class Flood:
    name = "flood"
    heartbeat_s: float | None = None

    def describe(self) -> str:
        return "floods"

    def run(self, ctx: ProbeContext) -> None:
        for i in range(1000):
            ctx.emit(Event(i, EventType.COMPUTE_UTIL, "gpu-0", str(i)))
        ctx.stop.wait(30)


def drained(s: Supervisor) -> list[Event]:
    out: list[Event] = []
    while True:
        batch = s.drain()
        if not batch:
            return out
        out.extend(batch)


def test_several_probes_run_at_once_and_their_events_arrive() -> None:
    s = Supervisor("n", now_ms)
    s.add("a", Steady)
    s.add("b", Steady)
    s.start()
    try:
        events: list[Event] = []

        def collected() -> bool:
            events.extend(s.drain())
            return len(events) >= 20

        wait_for(collected, timeout=5.0, what="20 events from the two probes")
        assert {slot.state for slot in s.slots} == {"running"}
        assert {slot.thread.name for slot in s.slots if slot.thread} == {"probe-a", "probe-b"}
    finally:
        s.stop()
        s.close()


def test_a_crashing_probe_is_recorded_and_restarted_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sup, "BACKOFF_START_S", 0.05)
    Crasher.runs = 0
    s = Supervisor("n", now_ms)
    slot = s.add("crasher", Crasher)
    s.start()
    try:
        def restarted_twice() -> bool:
            s.check()
            return Crasher.runs >= 3

        wait_for(restarted_twice, timeout=5.0, what="the crasher to be restarted twice")
        events = drained(s)
        crashed = [e for e in events if e.entity == "probe:crasher"]
        assert crashed
        assert all(e.type is EventType.ERROR_HW and e.value == "PROBE_CRASHED" for e in crashed)
        assert "boom" in str(crashed[0].attrs["detail"])
        assert slot.crashes >= 2
        assert slot.backoff_s > 0.05  # grows with every crash
    finally:
        s.stop()
        s.close()


def test_a_hung_probe_is_reported_and_replaced_while_the_others_go_on() -> None:
    Hanger.release.clear()
    s = Supervisor("n", now_ms)
    hung = s.add("hanger", Hanger)
    s.add("steady", Steady)
    s.start()
    try:
        def reported() -> bool:
            s.check()
            return hung.hangs >= 1

        wait_for(reported, timeout=5.0, what="the hung probe to be reported")
        events = drained(s)
        assert any(e.entity == "probe:hanger" and e.value == "PROBE_HUNG" for e in events)
        assert any(e.entity == "gpu-0" for e in events), "the healthy probe kept emitting"
        assert hung.state in ("hung", "running")
    finally:
        Hanger.release.set()
        s.stop()
        s.close()


def test_the_queue_is_bounded_drops_the_oldest_and_counts() -> None:
    s = Supervisor("n", now_ms, queue_max=100)
    s.add("flood", Flood)
    s.start()
    try:
        wait_for(lambda: s.dropped >= 900, timeout=5.0, what="900 events to be dropped")
        events = drained(s)
        assert len(events) == 100
        assert [int(e.value) for e in events] == list(range(900, 1000)), "the newest are kept"
    finally:
        s.stop()
        s.close()


def test_an_event_into_an_empty_queue_wakes_the_consumer() -> None:
    s = Supervisor("n", now_ms)
    s.add("steady", lambda: Steady(period=0.2))
    try:
        readable, _, _ = select.select([s.wake_fd], [], [], 0)
        assert not readable
        s.start()
        readable, _, _ = select.select([s.wake_fd], [], [], 2.0)
        assert readable
        s.clear_wake()
        assert s.drain()
    finally:
        s.stop()
        s.close()


class Sampler:
    """A sampling probe on the shared loop: each pass reads a file (real I/O) and takes a
    known minimum time, so the reported pass cost can be checked from below."""

    name = "sampler"
    heartbeat_s: float | None = 5.0
    PASS_S = 0.02

    def describe(self) -> str:
        return "sampling test probe"

    def sample(self, now_ms: int, bad: object) -> list[Event]:
        with open("/proc/self/stat") as f:
            f.read()
        time.sleep(self.PASS_S)  # the pass's work; the cost reported must include it
        return [Event(now_ms, EventType.COMPUTE_UTIL, "gpu-0", "50")]

    def run(self, ctx: ProbeContext) -> None:
        run_every(ctx, 0.01, self.sample)


def test_a_sampling_probe_reports_what_each_pass_costs() -> None:
    s = Supervisor("n", now_ms)
    s.add("sampler", Sampler)
    s.add("steady", Steady)
    s.start()
    try:
        slot = s.slots[0]
        wait_for(lambda: slot.cycles >= 3, timeout=5.0, what="three sampling passes")
        assert slot.cycle_s_total >= 3 * Sampler.PASS_S
        assert slot.cycle_s_avg is not None and slot.cycle_s_avg >= Sampler.PASS_S
        states = {p["name"]: p for p in s.states()}
        assert float(states["sampler"]["cycle_ms"]) >= Sampler.PASS_S * 1000
        assert "cycle_ms" not in states["steady"]  # an event-driven probe reports no passes
    finally:
        s.stop()
        s.close()
