"""The deterministic step: `why` (and the rule it matched) as a diagnosis, and compact views
of query results for the model's context.

The compact views register nothing themselves: whatever is finally shown to the model is
walked by :meth:`xctl.diag.evidence.Refs.collect`, so the model's citations are checked
against exactly what it saw (not against what was cut to keep the context small).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

from xctl.diag.report import Diagnosis, Evidence, iso_ms

MAX_CHAIN_EVIDENCE: Final = 4
MAX_ALTERNATIVES: Final = 3
MAX_SYMPTOMS: Final = 6
MAX_RAW_CHARS: Final = 200
MAX_SUMMARY_CHARS: Final = 300
#: Confidence of a deterministic diagnosis: a rule matched the causal chain / only a chain.
RULE_CONFIDENCE: Final = 0.9
CHAIN_CONFIDENCE: Final = 0.7


def clip(value: object, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def compact_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """One event as the model sees it: id (when from the event log), ts, where, what."""
    out: dict[str, Any] = {}
    cursor = event.get("cursor")
    if isinstance(cursor, int) and not isinstance(cursor, bool):
        out["id"] = f"e{cursor}"
    ts = event.get("ts")
    out["ts"] = ts
    for key in ("node", "type", "entity", "value", "pid", "job"):
        if event.get(key) is not None:
            out[key] = event[key]
    attrs = event.get("attrs")
    raw = event.get("raw")
    if raw is None and isinstance(attrs, Mapping):
        raw = attrs.get("raw")
    if isinstance(attrs, Mapping) and attrs.get("rank") is not None:
        out["rank"] = attrs["rank"]
    if isinstance(raw, str) and raw:
        out["raw"] = clip(raw, MAX_RAW_CHARS)
    return out


def compact_finding(finding: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: finding[k] for k in ("node", "entity", "kind", "code", "pid", "rank") if finding.get(k) is not None}
    first = finding.get("first_seen_ms")
    if isinstance(first, int):
        out["first_seen_ts"] = first
    if finding.get("summary"):
        out["summary"] = clip(finding["summary"], MAX_SUMMARY_CHARS)
    return out


def compact_why(why: Mapping[str, Any]) -> dict[str, Any]:
    """The `why` answer trimmed for a model: target, verdict, root cause, the chain with a
    few evidence events per step, the rule, top alternatives and symptoms."""
    root = why.get("root_cause")
    chain = []
    for step in why.get("chain") or []:
        seen: set[tuple[Any, ...]] = set()
        evidence = []
        for ev in step.get("evidence") or []:
            key = (ev.get("type"), ev.get("entity"), ev.get("value"), ev.get("pid"))
            if key in seen:
                continue
            seen.add(key)
            evidence.append(compact_event(ev))
            if len(evidence) >= MAX_CHAIN_EVIDENCE:
                break
        chain.append({"edge": step.get("edge"), "from": step.get("from"), "to": step.get("to"), "evidence": evidence})
    rule = why.get("rule")
    alternatives = why.get("alternatives") or []
    symptoms = why.get("symptoms") or []
    out: dict[str, Any] = {
        "target": why.get("target"),
        "verdict": why.get("verdict"),
        "root_cause": compact_finding(root) if isinstance(root, Mapping) else None,
        "chain": chain,
        "rule": {k: rule.get(k) for k in ("id", "severity", "action", "summary")}
        if isinstance(rule, Mapping)
        else None,
        "alternatives": [compact_finding(a) for a in alternatives[:MAX_ALTERNATIVES]],
        "symptoms_not_blamed": [
            {
                **{k: s[k] for k in ("node", "entity", "code", "pid") if s.get(k) is not None},
                "reason": clip(s.get("reason", ""), 160),
            }
            for s in symptoms[:MAX_SYMPTOMS]
        ],
    }
    if len(alternatives) > MAX_ALTERNATIVES:
        out["more_alternatives"] = len(alternatives) - MAX_ALTERNATIVES
    if len(symptoms) > MAX_SYMPTOMS:
        out["more_symptoms"] = len(symptoms) - MAX_SYMPTOMS
    return out


def fingerprint(why: Mapping[str, Any]) -> str:
    """What the causal graph says about the target, hashed: verdict, root cause, the chain's
    edges and the counts of alternatives and symptoms — not the individual samples, which
    change every second without changing the diagnosis."""
    root = why.get("root_cause") or {}
    rule = why.get("rule") or {}
    shape = {
        "target": why.get("target"),
        "verdict": why.get("verdict"),
        "root": [root.get(k) for k in ("node", "entity", "code", "first_seen_ms")] if root else None,
        "chain": [[s.get("edge"), s.get("from"), s.get("to")] for s in why.get("chain") or []],
        "rule": rule.get("id"),
        "counts": [len(why.get("alternatives") or []), len(why.get("symptoms") or [])],
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:20]


def target_label(why: Mapping[str, Any], fallback: str) -> str:
    target = why.get("target") or {}
    if target.get("pid") is None:
        return f"job:{target['job']}" if target.get("job") else fallback
    return f"{target.get('node')}:{target.get('pid')}"


def deterministic(why: Mapping[str, Any], target: str) -> Diagnosis:
    """The diagnosis xctl makes without a model: the rule's summary and action when one
    matched, else the causal chain's root cause. Its evidence is the chain's own events."""
    root = why.get("root_cause")
    rule = why.get("rule")
    evidence: list[Evidence] = []
    if isinstance(root, Mapping):
        first = root.get("first_seen_ms")
        where = f"{root.get('node')}/{root.get('entity')}" + (f" pid {root['pid']}" if root.get("pid") else "")
        seen = f" first seen {iso_ms(first)}" if isinstance(first, int) else ""
        evidence.append(
            Evidence(
                claim=f"{root.get('code')} on {where}{seen}",
                refs=(first,) if isinstance(first, int) else (),
                unsupported=not isinstance(first, int),
            )
        )
    for step in why.get("chain") or []:
        stamps = sorted({ev["ts"] for ev in step.get("evidence") or [] if isinstance(ev.get("ts"), int)})
        if not stamps:
            continue  # structural edges (job membership) carry no events of their own
        values = sorted({str(ev.get("value")) for ev in step.get("evidence") or []})
        evidence.append(
            Evidence(
                claim=f"{step.get('from')} {step.get('edge')} {step.get('to')} ({', '.join(values)[:120]})",
                refs=tuple(stamps[:MAX_CHAIN_EVIDENCE]),
            )
        )
    if isinstance(rule, Mapping):
        summary = str(rule.get("summary") or "") or _root_text(root)
        actions = [_action_text(str(rule.get("action", "")))] if rule.get("action") else []
        actions += [str(s) for s in rule.get("steps") or []]
        confidence = RULE_CONFIDENCE if root else CHAIN_CONFIDENCE
    else:
        summary = _root_text(root)
        actions = []
        confidence = CHAIN_CONFIDENCE if root else 0.0
    return Diagnosis(
        target=target_label(why, target),
        source="rules",
        root_cause=summary,
        evidence=tuple(evidence),
        confidence=confidence,
        actions=tuple(actions),
        verdict=why.get("verdict"),
        rule=dict(rule) if isinstance(rule, Mapping) else None,
        why_root_cause=dict(root) if isinstance(root, Mapping) else None,
    )


def _root_text(root: object) -> str:
    if not isinstance(root, Mapping):
        return "no root cause found by the causal engine"
    where = f"{root.get('node')}/{root.get('entity')}"
    summary = root.get("summary") or ""
    return f"{root.get('code')} on {where} [{root.get('kind')}]" + (f": {summary}" if summary else "")


def _action_text(action: str) -> str:
    """``DRAIN_AND_RESET`` → ``DRAIN_AND_RESET: drain the node's jobs, then reset the GPU(s)``."""
    try:
        from xctl.rules.schema import ACTIONS
    except ImportError:  # the rules package is optional for diag
        return action
    meaning = ACTIONS.get(action)
    return f"{action}: {meaning}" if meaning else action
