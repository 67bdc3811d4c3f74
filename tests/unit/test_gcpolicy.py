"""The daemons' garbage-collector schedule, on the real collector."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from xctl.gcpolicy import GcPolicy


class Node:
    """A graph-like record; two of them pointing at each other make cyclic garbage."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cyclic_garbage_probe() -> weakref.ref[Node]:
    """Make two nodes that reference each other, drop them, and return a weak ref to one."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def clock() -> Iterator[list[float]]:
    now = [1000.0]
    yield now
    gc.unfreeze()  # leave the test process's collector as it was


def policy(clock: list[float]) -> GcPolicy:
    return GcPolicy(freeze_every_s=1.0, full_every_s=60.0, monotonic=lambda: clock[0])


def test_survivors_are_frozen_on_schedule_and_not_before(clock: list[float]) -> None:
    gc.unfreeze()
    p = policy(clock)
    keep = [Node() for _ in range(1000)]
    p.tick()
    assert gc.get_freeze_count() == 0 and p.freezes == 0
    clock[0] += 1.0
    p.tick()
    assert p.freezes == 1
    assert gc.get_freeze_count() >= len(keep)  # the survivors now sit where collections never look
    assert p.stats()["freezes"] == 1


def test_young_cyclic_garbage_is_collected_before_the_freeze(clock: list[float]) -> None:
    gc.unfreeze()
    p = policy(clock)
    gc.disable()  # no automatic collection may beat the policy to it
    try:
        gone = cyclic_garbage_probe()
        assert gone() is not None
        clock[0] += 1.0
        p.tick()
        assert gone() is None
    finally:
        gc.enable()


def test_cyclic_garbage_frozen_by_mistake_is_freed_by_the_full_collection(clock: list[float]) -> None:
    gc.unfreeze()
    p = policy(clock)
    gc.disable()  # keep the cycle alive until it is frozen
    try:
        gone = cyclic_garbage_probe()
        gc.freeze()
    finally:
        gc.enable()
    gc.collect()
    assert gone() is not None  # a frozen cycle is out of the collector's reach …
    clock[0] += 60.0
    p.tick()
    assert gone() is None  # … until the hourly full collection
    assert p.full_collections == 1 and gc.get_freeze_count() > 0


def test_the_aggregator_reports_the_schedule_in_health() -> None:
    from xctl.aggregator.server import Aggregator, AggregatorConfig

    assert "gc" not in Aggregator(AggregatorConfig()).counters()  # embedded: the host's collector
    counters = Aggregator(AggregatorConfig(gc_policy=True)).counters()
    assert counters["gc"] == {"freezes": 0, "full_collections": 0, "pause_ms_max": 0.0}
