"""The model's tools: READ-ONLY views over the aggregator's query ops, bounded and compact.

There is no write path: `zap` (or anything else that changes the cluster) is not a tool,
and a call to a tool that is not in :data:`TOOL_NAMES` is answered with an error and never
reaches the aggregator. Arguments come from the model and are untrusted: they are checked
and bounded here (an events window of at most :data:`MAX_SINCE_S`, at most
:data:`MAX_EVENTS` events) before any query is made. Results are trimmed to
:data:`MAX_RESULT_CHARS` so the context stays small.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from xctl.core.errors import XctlError
from xctl.diag.evidence import Refs
from xctl.diag.findings import clip, compact_event, compact_why
from xctl.diag.rulesearch import search_rules

log = logging.getLogger(__name__)

MAX_EVENTS: Final = 50
DEFAULT_EVENTS: Final = 20
MAX_SINCE_S: Final = 3600
DEFAULT_SINCE_S: Final = 900
MAX_PS_ITEMS: Final = 40
MAX_RANKS: Final = 64
MAX_NODES: Final = 64
MAX_RESULT_CHARS: Final = 6000
MAX_ARG_CHARS: Final = 200


class Querier(Protocol):
    """What diag needs from :class:`xctl.wire.client.QueryClient`."""

    def request(self, op: str, args: dict[str, Any] | None = None) -> Any: ...


class ToolArgError(ValueError):
    pass


def _fn(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


#: Every string argument says the bound `_str` enforces: a schema-following server (llama-server
#: turns it into a grammar) then cannot let a small model run on inside one string until the
#: token limit cuts the call off unparseable.
_STR: Final = {"type": "string", "maxLength": MAX_ARG_CHARS}

TOOL_SPECS: Final[tuple[dict[str, Any], ...]] = (
    _fn(
        "why",
        "The deterministic causal chain for a target: verdict, root cause, chain with evidence events.",
        {"target": {**_STR, "description": "node:pid, pid, or job:ID"}},
        ["target"],
    ),
    _fn(
        "ps",
        "GPU processes (node, pid, name, job, rank, state, verdict, GPU use), optionally filtered.",
        {"node": _STR, "job": _STR},
        [],
    ),
    _fn(
        "events",
        f"Recent events from the aggregator's log, newest last (at most {MAX_EVENTS}, "
        f"window at most {MAX_SINCE_S} s). Each has an id (e.g. e85) and a ts to cite.",
        {
            "node": _STR,
            "entity": {**_STR, "description": "e.g. gpu-3, mlx5_0, job-42"},
            "type": {**_STR, "description": "event type or prefix: error, error.hw, process.state, transport.bw, …"},
            "since_s": {"type": "integer", "minimum": 1, "maximum": MAX_SINCE_S},
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_EVENTS},
        },
        [],
    ),
    _fn(
        "job_ranks",
        "Every rank of a job across nodes: node, pid, rank, state, verdict, GPU utilisation.",
        {"job": _STR},
        ["job"],
    ),
    _fn(
        "node_liveness",
        "Every node's liveness (alive/suspect/dead), last message time and probe states.",
        {},
        [],
    ),
    _fn(
        "rule_search",
        "Knowledge-base rules that mention an error code (e.g. XID_79, NCCL_TIMEOUT): id, severity, action.",
        {"code": _STR},
        ["code"],
    ),
)

TOOL_NAMES: Final = tuple(spec["function"]["name"] for spec in TOOL_SPECS)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """What the report says about one call (``tools_called``)."""

    name: str
    args: dict[str, Any]
    ok: bool
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "args": self.args, "ok": self.ok}
        if self.error:
            out["error"] = self.error
        return out


class ToolBox:
    """Runs tool calls against a :class:`Querier`; every event in a result it gives back to
    the model is registered in ``refs`` (after trimming: only what was shown counts)."""

    def __init__(
        self,
        querier: Querier,
        refs: Refs,
        *,
        now_ms: Callable[[], int] | None = None,
        rules: Any = None,
    ) -> None:
        self.querier = querier
        self.refs = refs
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))
        self.rules = rules
        self.calls: list[ToolCall] = []

    def call(self, name: str, raw_args: object) -> str:
        """Run one call; returns the JSON text to give back to the model (never raises)."""
        try:
            args = _parse_args(raw_args)
        except ToolArgError as exc:
            return self._record(name, {}, error=str(exc))
        handler = _HANDLERS.get(name)
        if handler is None:
            return self._record(
                name, args, error=f"unknown tool {clip(name, 40)!r}; available (read-only): {', '.join(TOOL_NAMES)}"
            )
        try:
            result = handler(self, args)
        except ToolArgError as exc:
            return self._record(name, args, error=str(exc))
        except XctlError as exc:
            return self._record(name, args, error=f"{exc.code}: {exc}")
        return self._record(name, args, result=result)

    def _record(
        self, name: str, args: dict[str, Any], *, result: Any = None, error: str | None = None
    ) -> str:
        shown_args = {k: (clip(v, 80) if isinstance(v, str) else v) for k, v in list(args.items())[:8]}
        self.calls.append(ToolCall(clip(name, 40), shown_args, error is None, error))
        if error is not None:
            log.debug("diag tool %s(%s) failed: %s", name, shown_args, error)
            return json.dumps({"error": error})
        text = _fit(result)
        self.refs.collect(json.loads(text))
        return text

    # ----------------------------------------------------------------- the tools
    def why(self, args: Mapping[str, Any]) -> Any:
        target = _str(args, "target", required=True)
        return compact_why(self.querier.request("why", {"target": target}))

    def ps(self, args: Mapping[str, Any]) -> Any:
        query = {"node": _str(args, "node"), "job": _str(args, "job")}
        data = self.querier.request("ps", {k: v for k, v in query.items() if v is not None})
        items = data.get("items", [])
        return _listing([_proc(p) for p in items[:MAX_PS_ITEMS]], len(items))

    def events(self, args: Mapping[str, Any]) -> Any:
        since_s = _int(args, "since_s", DEFAULT_SINCE_S, 1, MAX_SINCE_S)
        limit = _int(args, "limit", DEFAULT_EVENTS, 1, MAX_EVENTS)
        query: dict[str, Any] = {
            "node": _str(args, "node"),
            "entity": _str(args, "entity"),
            "type": _str(args, "type"),
            "since_ms": self.now_ms() - since_s * 1000,
            "limit": limit,
        }
        data = self.querier.request("events", {k: v for k, v in query.items() if v is not None})
        items = [compact_event(ev) for ev in data.get("items", [])[-limit:]]
        return _NewestLast({"since_s": since_s, "items": items, "count": len(items)})

    def job_ranks(self, args: Mapping[str, Any]) -> Any:
        job = _str(args, "job", required=True)
        if job is not None and job.startswith("job:"):
            job = job[4:]
        data = self.querier.request("ps", {"job": job})
        items = sorted(data.get("items", []), key=lambda p: (p.get("rank") is None, p.get("rank") or 0, p["node"]))
        return {"job": job, **_listing([_proc(p) for p in items[:MAX_RANKS]], len(items))}

    def node_liveness(self, args: Mapping[str, Any]) -> Any:
        data = self.querier.request("nodes", {})
        items = data.get("items", [])
        nodes = [
            {
                "node": n.get("node"),
                "state": n.get("state"),
                "last_seen": n.get("last_seen"),
                "resyncs": n.get("resyncs"),
                "errors": n.get("errors"),
                "probes": [
                    {"name": p.get("name"), "state": p.get("state"), **({"detail": clip(p["detail"], 120)}
                                                                          if p.get("detail") else {})}
                    for p in (n.get("probes") or [])[:12]
                ],
            }
            for n in items[:MAX_NODES]
        ]
        return _listing(nodes, len(items))

    def rule_search(self, args: Mapping[str, Any]) -> Any:
        code = _str(args, "code", required=True)
        return search_rules(code or "", self.rules)


_HANDLERS: Final[dict[str, Callable[[ToolBox, Mapping[str, Any]], Any]]] = {
    "why": ToolBox.why,
    "ps": ToolBox.ps,
    "events": ToolBox.events,
    "job_ranks": ToolBox.job_ranks,
    "node_liveness": ToolBox.node_liveness,
    "rule_search": ToolBox.rule_search,
}
assert set(_HANDLERS) == set(TOOL_NAMES)


def _parse_args(raw: object) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ToolArgError(f"arguments are not valid JSON: {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise ToolArgError("arguments must be a JSON object")
    return raw


def _str(args: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = args.get(key)
    if value is None or value == "":
        if required:
            raise ToolArgError(f"missing argument {key!r}")
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or len(value) > MAX_ARG_CHARS:
        raise ToolArgError(f"argument {key!r} must be a short string")
    return value


def _int(args: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = args.get(key)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ToolArgError(f"argument {key!r} must be an integer")
    return max(low, min(value, high))


def _proc(p: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: p.get(k) for k in ("node", "pid", "name", "job", "rank", "state", "verdict")}
    gpus = p.get("gpus") or []
    if gpus:
        out["gpus"] = [{"gpu": g.get("gpu"), "util": g.get("util")} for g in gpus[:8]]
    return out


def _listing(items: list[dict[str, Any]], total: int) -> dict[str, Any]:
    out: dict[str, Any] = {"items": items, "count": total}
    if total > len(items):
        out["truncated"] = total - len(items)
    return out


@dataclass(frozen=True, slots=True)
class _NewestLast:
    """A result whose ``items`` run oldest to newest: trimming keeps the newest."""

    result: dict[str, Any]


def _fit(result: Any) -> str:
    """JSON text of at most MAX_RESULT_CHARS: long ``items`` lists are cut (and say so)."""
    tail = isinstance(result, _NewestLast)
    if isinstance(result, _NewestLast):
        result = result.result
    text = json.dumps(result, separators=(",", ":"), default=str)
    if len(text) <= MAX_RESULT_CHARS:
        return text
    if isinstance(result, dict) and isinstance(result.get("items"), list):
        items = list(result["items"])
        while items and len(text) > MAX_RESULT_CHARS:
            keep = min(len(items) * 3 // 4, len(items) - 1)
            items = (items[len(items) - keep :] if tail else items[:keep]) if keep > 0 else []
            trimmed = {**result, "items": items, "trimmed_to": len(items)}
            text = json.dumps(trimmed, separators=(",", ":"), default=str)
        if len(text) <= MAX_RESULT_CHARS:
            return text
    return json.dumps({"error": "result too large to show; narrow the query", "preview": text[:1000]})
