"""`diagnose`: rules first, then (only when needed or asked) the LLM with read-only tools."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from xctl.core.errors import XctlError
from xctl.diag.cache import DiagCache, cache_key
from xctl.diag.evidence import Refs
from xctl.diag.findings import compact_event, compact_why, deterministic, fingerprint, target_label
from xctl.diag.llm import LLMConfig, Send, openai_sender, run_loop
from xctl.diag.report import Diagnosis, LLMError, Narrative
from xctl.diag.tools import Querier, ToolBox

log = logging.getLogger(__name__)

TOP_EVENTS: Final = 10
TOP_EVENTS_WINDOW_S: Final = 900


def diagnose(
    querier: Querier,
    target: str,
    *,
    node: str | None = None,
    explain: bool = False,
    config: LLMConfig | None = None,
    cache: DiagCache | None = None,
    send: Send | None = None,
    rules: Any = None,
    now_ms: Callable[[], int] | None = None,
) -> Diagnosis:
    """Diagnose ``target`` (``node:pid``, ``pid``, ``job:ID``).

    1. `why` through ``querier``. When a rule matched, its diagnosis (``source: "rules"``) is
       the answer and no model is asked — unless ``explain``, which adds the model's
       ``narrative``.
    2. Otherwise the model (``send``, default :func:`~xctl.diag.llm.openai_sender`) gets the
       findings and read-only tools; its checked report is the answer (``source: "llm"``).

    Query errors (unreachable, not found, bad target) propagate. Every failure of the LLM
    step raises :class:`LLMError` whose ``fallback`` is the deterministic diagnosis.
    ``rules`` overrides the rules ``rule_search`` looks in (default: the built-ins).
    """
    config = config or LLMConfig()
    clock_ms = now_ms or (lambda: int(time.time() * 1000))
    args: dict[str, Any] = {"target": target}
    if node is not None:
        args["node"] = node
    why = querier.request("why", args)
    base = deterministic(why, target)
    if why.get("rule") and not explain:
        return base

    key = cache_key(
        target=target_label(why, target),
        fingerprint=fingerprint(why),
        explain=explain,
        model=config.model,
        url=config.url,
        max_steps=config.max_steps,
    )
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            log.debug("diag: %s served from the cache", target)
            return hit

    try:
        sender = send or openai_sender(config)
        findings: dict[str, Any] = {"why": compact_why(why), "top_events": _top_events(querier, why, clock_ms)}
        toolbox = ToolBox(querier, Refs(), now_ms=clock_ms, rules=rules)
        task = (
            f"Explain this diagnosis of {base.target} for an operator, checking it with the tools if useful."
            if why.get("rule")
            else f"Find the root cause of the problem of {base.target}."
        )
        result = run_loop(sender, findings, toolbox, config, task=task)
    except LLMError as exc:
        exc.fallback = base
        raise
    report = result.report
    notes = tuple(result.notes)
    unsupported = sum(1 for e in report.evidence if e.unsupported)
    if unsupported:
        notes += (f"{unsupported} claim(s) cite no event the model was shown: marked unsupported",)
    if why.get("rule"):
        diagnosis = replace(
            base,
            narrative=Narrative(report.root_cause, report.evidence, report.confidence, report.actions),
            tools_called=tuple(result.tools_called),
            model=config.model,
            steps=result.steps,
            notes=notes,
        )
    else:
        diagnosis = replace(
            base,
            source="llm",
            root_cause=report.root_cause,
            evidence=report.evidence,
            confidence=report.confidence,
            actions=report.actions,
            tools_called=tuple(result.tools_called),
            model=config.model,
            steps=result.steps,
            notes=notes,
        )
    if cache is not None:
        cache.put(key, diagnosis)
    return diagnosis


def _top_events(querier: Querier, why: dict[str, Any], now_ms: Callable[[], int]) -> list[dict[str, Any]]:
    """The most recent error events on the target's node (or the root cause's), compact."""
    target = why.get("target") or {}
    root = why.get("root_cause") or {}
    args: dict[str, Any] = {"type": "error", "limit": TOP_EVENTS, "since_ms": now_ms() - TOP_EVENTS_WINDOW_S * 1000}
    node = target.get("node") or root.get("node")
    if node:
        args["node"] = node
    try:
        data = querier.request("events", args)
    except XctlError as exc:  # the findings are still worth giving without them
        log.info("diag: could not read recent events: %s", exc)
        return []
    return [compact_event(ev) for ev in data.get("items", [])[-TOP_EVENTS:]]
