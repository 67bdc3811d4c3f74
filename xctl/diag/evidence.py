"""Evidence checking: a model's claims may only cite events it was actually shown.

:class:`Refs` records every event put in front of the model — by timestamp (ms since the
epoch) and, for events from the aggregator's log, by id (``"e<cursor>"``). :func:`check_report`
turns the model's raw JSON answer into validated fields: refs that name no such event are
moved to ``invalid_refs`` and a claim left with no valid ref is marked ``unsupported``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from xctl.diag.report import Evidence, Ref

MAX_CLAIMS: Final = 12
MAX_REFS_PER_CLAIM: Final = 12
MAX_CLAIM_CHARS: Final = 500
MAX_ACTIONS: Final = 10
MAX_ACTION_CHARS: Final = 300
MAX_ROOT_CAUSE_CHARS: Final = 1000
#: When no claim has valid evidence, the report's confidence is capped at this.
UNSUPPORTED_CONFIDENCE_CAP: Final = 0.3

_ID = re.compile(r"^e(\d{1,12})$", re.IGNORECASE)
_ID_IN = re.compile(r"\be(\d{1,12})\b", re.IGNORECASE)
_TS_IN = re.compile(r"(?<!\d)(\d{12,14})(?!\d)")
_ISO_IN = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?")


@dataclass
class Refs:
    """The events shown to the model, by timestamp and by id."""

    ts: set[int] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)

    def add(self, ts: object = None, event_id: object = None) -> None:
        if isinstance(ts, int) and not isinstance(ts, bool):
            self.ts.add(ts)
        if isinstance(event_id, str) and _ID.match(event_id):
            self.ids.add(event_id.lower())

    def collect(self, shown: object) -> None:
        """Register every event in ``shown`` (JSON as given to the model): any object with an
        integer ``ts`` / ``first_seen_ts`` or an ``id`` like ``e85``."""
        stack = [shown]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                self.add(item.get("ts"), item.get("id"))
                self.add(item.get("first_seen_ts"))
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)

    def __len__(self) -> int:
        return len(self.ts) + len(self.ids)

    def resolve(self, ref: object) -> Ref | None:
        """The canonical form of ``ref`` (an int ts or an ``"e<n>"`` id) when it names a
        known event, else None. Accepts ints, numeric strings, ids, ISO-8601 times, and
        short strings that contain exactly one of those (``"ts=1732350000123"``)."""
        if isinstance(ref, bool):
            return None
        if isinstance(ref, int):
            return ref if ref in self.ts else None
        if isinstance(ref, float):
            return int(ref) if math.isfinite(ref) and ref.is_integer() and int(ref) in self.ts else None
        if not isinstance(ref, str) or len(ref) > 200:
            return None
        text = ref.strip()
        if text.isdigit():
            return self.resolve(int(text))
        match = _ID.match(text)
        if match:
            canonical = f"e{int(match.group(1))}"
            return canonical if canonical in self.ids else None
        iso = _iso_ms(text)
        if iso is not None:
            return iso if iso in self.ts else None
        found: list[Ref] = []
        for m in _ID_IN.finditer(text):
            canonical = f"e{int(m.group(1))}"
            if canonical in self.ids:
                found.append(canonical)
        for m in _TS_IN.finditer(text):
            if int(m.group(1)) in self.ts:
                found.append(int(m.group(1)))
        for m in _ISO_IN.finditer(text):
            value = _iso_ms(m.group(0))
            if value is not None and value in self.ts:
                found.append(value)
        return found[0] if len(set(found)) == 1 else None


def _iso_ms(text: str) -> int | None:
    if not _ISO_IN.fullmatch(text):
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return round(parsed.timestamp() * 1000)


class MalformedAnswerError(ValueError):
    """The model's final answer is not the JSON report that was asked for."""


@dataclass(frozen=True, slots=True)
class CheckedReport:
    root_cause: str
    evidence: tuple[Evidence, ...]
    confidence: float
    actions: tuple[str, ...]

    @property
    def supported(self) -> int:
        return sum(1 for e in self.evidence if not e.unsupported)


def parse_answer(content: object) -> dict[str, Any]:
    """The JSON object in a model's answer: plain, or fenced in ```json … ```."""
    if not isinstance(content, str) or not content.strip():
        raise MalformedAnswerError("the answer is empty")
    text = content.strip()
    fenced = re.search(r"```(?:json)?\s*(\{.*\})\s*```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    elif not text.startswith("{"):
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            raise MalformedAnswerError(f"no JSON object in the answer: {_preview(content)}")
        text = text[start : end + 1]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        detail = f"{exc.msg} at char {exc.pos}"
        raise MalformedAnswerError(f"the answer is not valid JSON ({detail}): {_preview(content)}") from exc
    if not isinstance(data, dict):
        raise MalformedAnswerError(f"the answer is JSON but not an object: {_preview(content)}")
    return data


def check_report(data: dict[str, Any], refs: Refs) -> CheckedReport:
    """Validate a parsed answer against the schema and ``refs``; raises MalformedAnswerError."""
    root = data.get("root_cause")
    if isinstance(root, dict):
        root = root.get("summary") or root.get("description") or json.dumps(root, sort_keys=True)
    if not isinstance(root, str) or not root.strip():
        raise MalformedAnswerError("the report has no root_cause text")
    evidence = tuple(check_claims(data.get("evidence"), refs))
    confidence = _confidence(data.get("confidence"))
    if all(e.unsupported for e in evidence):  # also when there is no evidence at all
        confidence = min(confidence, UNSUPPORTED_CONFIDENCE_CAP)
    return CheckedReport(
        root_cause=_clip(root.strip(), MAX_ROOT_CAUSE_CHARS),
        evidence=evidence,
        confidence=confidence,
        actions=_actions(data.get("actions")),
    )


def check_claims(items: object, refs: Refs) -> list[Evidence]:
    """Each claim with its refs resolved; unknown refs recorded, unsupported claims marked."""
    if items is None:
        return []
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise MalformedAnswerError(f"evidence must be a list, got {type(items).__name__}")
    out: list[Evidence] = []
    for item in items[:MAX_CLAIMS]:
        claim: object
        raw_refs: object
        if isinstance(item, str):
            claim, raw_refs = item, []
        elif isinstance(item, dict):
            claim = item.get("claim")
            raw_refs = item.get("refs", item.get("ref", []))
        else:
            continue
        if not isinstance(claim, str) or not claim.strip():
            continue
        if not isinstance(raw_refs, list):
            raw_refs = [raw_refs]
        valid: list[Ref] = []
        invalid: list[str] = []
        for raw in raw_refs[:MAX_REFS_PER_CLAIM]:
            resolved = refs.resolve(raw)
            if resolved is None:
                invalid.append(_clip(str(raw), 80))
            elif resolved not in valid:
                valid.append(resolved)
        out.append(
            Evidence(
                claim=_clip(claim.strip(), MAX_CLAIM_CHARS),
                refs=tuple(valid),
                unsupported=not valid,
                invalid_refs=tuple(invalid),
            )
        )
    return out


def _confidence(value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip().rstrip("%"))
        except ValueError:
            return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    number = float(value)
    if 1.0 < number <= 100.0:
        number /= 100.0
    return round(min(max(number, 0.0), 1.0), 3)


def _actions(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise MalformedAnswerError(f"actions must be a list of strings, got {type(value).__name__}")
    out: list[str] = []
    for item in value:
        text = item.get("action") or item.get("description") if isinstance(item, dict) else item
        if isinstance(text, str) and text.strip():
            out.append(_clip(text.strip(), MAX_ACTION_CHARS))
        if len(out) >= MAX_ACTIONS:
            break
    return tuple(out)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _preview(content: object) -> str:
    text = " ".join(str(content).split())
    return repr(_clip(text, 120))
