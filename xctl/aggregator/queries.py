"""Query handlers: op name → function of (state, args) returning the JSON of DESIGN §7.

Handlers validate their arguments strictly (an unknown argument or a wrong type is a
BAD_REQUEST naming it) and raise xctl errors; the server turns those into error replies.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from xctl import __version__
from xctl.core.cluster import ClusterGraph, Liveness
from xctl.core.errors import NotFoundError, UsageError
from xctl.core.events import Event, EventType
from xctl.core.targets import parse_target
from xctl.core.views import error_list, job_list, node_list, process_list
from xctl.core.why import API_VERSION, Explanation, explain

RECENT_EVENTS: Final = 20_000
MAX_EVENTS_REPLY: Final = 2_000
#: Upper bounds (seconds) of the query-duration histogram buckets; +Inf is implied.
QUERY_BUCKETS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class OpTimings:
    """Cumulative duration histogram of one query op (bounded: one int per bucket).

    Written by the aggregator's socket thread, read by the /metrics thread: ``counts[i]``
    is the number of queries that took <= ``QUERY_BUCKETS_S[i]`` and more than the bucket
    before it; the last slot is +Inf. Readers copy ``counts`` and derive the total from it,
    so a scrape never sees a count that disagrees with its buckets.
    """

    counts: list[int] = field(default_factory=lambda: [0] * (len(QUERY_BUCKETS_S) + 1))
    sum_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(QUERY_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds


#: Hook for the rules layer: enrich an explanation with the matching rule.
Enricher = Callable[[Explanation, ClusterGraph], Explanation]


@dataclass
class QueryState:
    """What query handlers may read. Owned by the aggregator's socket thread."""

    cluster: ClusterGraph
    start_id: str
    started_ms: int
    counters: Callable[[], dict[str, Any]]
    #: Recent batches as (cursor of their first event, node, events): one append per batch,
    #: not per event, keeps this off the ingest hot path. Bounded by RECENT_EVENTS events.
    recent: deque[tuple[int, str, tuple[Event, ...]]] = field(default_factory=deque)
    recent_events: int = 0
    next_cursor: int = 0
    enrich: Enricher | None = None
    #: op → duration histogram (only ops that exist: unknown ops are refused before timing).
    query_timings: dict[str, OpTimings] = field(default_factory=dict)

    def remember(self, node: str, events: tuple[Event, ...]) -> None:
        self.recent.append((self.next_cursor + 1, node, events))
        self.next_cursor += len(events)
        self.recent_events += len(events)
        while self.recent_events > RECENT_EVENTS:
            self.recent_events -= len(self.recent.popleft()[2])

    def iter_recent(self) -> Iterator[tuple[int, str, Event]]:
        """Newest first: (cursor, node, event)."""
        for first, node, events in reversed(self.recent):
            for offset in range(len(events) - 1, -1, -1):
                yield first + offset, node, events[offset]


Handler = Callable[[QueryState, Mapping[str, Any]], Any]


def _args(args: Mapping[str, Any], allowed: Mapping[str, type | tuple[type, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in args.items():
        kind = allowed.get(key)
        if kind is None:
            raise UsageError(f"unknown argument {key!r} (allowed: {', '.join(sorted(allowed)) or 'none'})")
        if value is None:
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise UsageError(f"argument {key!r} has the wrong type ({type(value).__name__})")
        out[key] = value
    return out


def _known_node(state: QueryState, node: str | None) -> None:
    if node is not None and node not in state.cluster.nodes and node not in state.cluster.status:
        known = ", ".join(sorted(state.cluster.status)[:10]) or "none yet"
        raise NotFoundError(f"unknown node {node!r} (known: {known})")


def op_ps(state: QueryState, args: Mapping[str, Any]) -> Any:
    a = _args(args, {"node": str, "job": str, "all": bool})
    _known_node(state, a.get("node"))
    return process_list(state.cluster, node=a.get("node"), job=a.get("job"), include_exited=a.get("all", True))


def op_why(state: QueryState, args: Mapping[str, Any]) -> Any:
    a = _args(args, {"target": str, "node": str})
    if "target" not in a:
        raise UsageError("why needs a target: node:pid, pid or job:ID")
    target = parse_target(a["target"], default_node=a.get("node"))
    explanation = explain(state.cluster, target)
    if state.enrich is not None:
        explanation = state.enrich(explanation, state.cluster)
    return explanation.to_json()


def op_nodes(state: QueryState, args: Mapping[str, Any]) -> Any:
    _args(args, {})
    return node_list(state.cluster)


def op_jobs(state: QueryState, args: Mapping[str, Any]) -> Any:
    _args(args, {})
    return job_list(state.cluster)


_TYPES: Final = {t.value for t in EventType}


def op_events(state: QueryState, args: Mapping[str, Any]) -> Any:
    a = _args(
        args,
        {"node": str, "type": str, "entity": str, "since_ms": int, "after": int, "limit": int, "pid": int},
    )
    _known_node(state, a.get("node"))
    etype = a.get("type")
    if etype is not None and etype not in _TYPES and not any(t.startswith(etype + ".") for t in _TYPES):
        raise UsageError(f"unknown event type {etype!r} (one of {', '.join(sorted(_TYPES))}, or a prefix like error)")
    limit = max(1, min(int(a.get("limit", 200)), MAX_EVENTS_REPLY))
    after = a.get("after", 0)
    since = a.get("since_ms")
    node, entity, pid = a.get("node"), a.get("entity"), a.get("pid")
    items: list[dict[str, Any]] = []
    for cursor, ev_node, event in state.iter_recent():
        if cursor <= after:
            break
        if since is not None and event.ts < since:
            continue
        if node is not None and ev_node != node:
            continue
        if etype is not None and not (event.type.value == etype or event.type.value.startswith(etype + ".")):
            continue
        if entity is not None and event.entity != entity:
            continue
        if pid is not None and event.pid != pid:
            continue
        items.append({"cursor": cursor, "node": ev_node, **event.to_json()})
        if len(items) >= limit:
            break
    items.reverse()
    return {"apiVersion": API_VERSION, "kind": "EventList", "items": items, "cursor": state.next_cursor}


def op_health(state: QueryState, args: Mapping[str, Any]) -> Any:
    _args(args, {})
    cluster = state.cluster
    liveness = {s.value: 0 for s in Liveness}
    for node in cluster.status:
        liveness[cluster.liveness(node).value] += 1
    return {
        "apiVersion": API_VERSION,
        "kind": "Health",
        "ok": True,
        "version": __version__,
        "start_id": state.start_id,
        "uptime_s": round((cluster.clock() - state.started_ms) / 1000, 1),
        "nodes": liveness,
        "jobs": len(cluster.jobs()),
        "errors": error_list(cluster)[:50],
        "counters": state.counters(),
    }


HANDLERS: Final[dict[str, Handler]] = {
    "ps": op_ps,
    "why": op_why,
    "nodes": op_nodes,
    "jobs": op_jobs,
    "events": op_events,
    "health": op_health,
}


def handle(state: QueryState, op: str, args: Mapping[str, Any], handlers: Mapping[str, Handler] = HANDLERS) -> Any:
    handler = handlers.get(op)
    if handler is None:
        raise UsageError(f"unknown op {op!r} (one of {', '.join(sorted(handlers))})")
    started = time.perf_counter()
    try:
        return handler(state, args)
    finally:
        timings = state.query_timings.get(op)
        if timings is None:
            timings = state.query_timings[op] = OpTimings()
        timings.observe(time.perf_counter() - started)
