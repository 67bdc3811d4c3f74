"""When the daemons' garbage collector may run (their pauses are visibility lag).

The aggregator holds every node's graph: at 1,000 nodes about a million long-lived objects.
Python's cyclic collector scans whole generations, so its automatic collections stall the
ingest loop for 70–240 ms (measured with bench/ingest.py at 1,000 nodes × 8 GPUs at 1 Hz),
which is the p99 visibility lag. Reference counting frees almost all of our garbage (events,
samples and graph records form no cycles), so the policy is:

- every ``freeze_every_s``, collect the young generations (only what was allocated since the
  last freeze: a few ms) and move the survivors to the permanent generation, which automatic
  collections never scan;
- every ``full_every_s``, unfreeze and collect everything once, so cyclic garbage that was
  frozen by mistake is bounded to one interval's worth.

The policy is driven from the daemon's own loop (``tick``), so collections happen between
messages, never in the middle of applying a batch.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

FREEZE_EVERY_S: Final = 1.0
FULL_EVERY_S: Final = 3_600.0


class GcPolicy:
    def __init__(
        self,
        *,
        freeze_every_s: float = FREEZE_EVERY_S,
        full_every_s: float = FULL_EVERY_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.freeze_every_s = freeze_every_s
        self.full_every_s = full_every_s
        self._monotonic = monotonic
        now = monotonic()
        self._last_freeze = now
        self._last_full = now
        self.freezes = 0
        self.full_collections = 0
        self.pause_s_max = 0.0

    def start(self) -> None:
        """Freeze what start-up allocated (modules, configuration): never worth scanning."""
        gc.collect()
        gc.freeze()

    def tick(self) -> None:
        now = self._monotonic()
        if now - self._last_full >= self.full_every_s:
            self._last_full = self._last_freeze = now
            self._timed(self._full)
        elif now - self._last_freeze >= self.freeze_every_s:
            self._last_freeze = now
            self._timed(self._freeze_survivors)

    def stats(self) -> dict[str, float]:
        return {
            "freezes": self.freezes,
            "full_collections": self.full_collections,
            "pause_ms_max": round(self.pause_s_max * 1000, 1),
        }

    def _freeze_survivors(self) -> None:
        gc.collect(1)
        gc.freeze()
        self.freezes += 1

    def _full(self) -> None:
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self.full_collections += 1
        if found:
            log.debug("full collection found %d objects in reference cycles", found)

    def _timed(self, step: Callable[[], None]) -> None:
        started = time.perf_counter()
        step()
        self.pause_s_max = max(self.pause_s_max, time.perf_counter() - started)
