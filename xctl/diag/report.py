"""The diagnosis report (DESIGN §7 ``kind: Diagnosis``) and the errors of the diag step.

``source`` says who wrote the report: ``"rules"`` is xctl's deterministic engine (the `why`
causal chain plus the knowledge-base rule that matched it, if any); ``"llm"`` is a model that
was given those findings first and could call read-only tools. Every evidence item cites
the events it rests on (``refs``: event timestamps in ms, or event ids such as ``"e85"``
from the aggregator's event log); a claim whose refs were not among the events actually
shown to the model is kept but marked ``unsupported``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

from xctl.core.errors import XctlError

API_VERSION: Final = "xctl/v1"
SOURCES: Final = ("rules", "llm")

Ref = int | str


@dataclass(frozen=True, slots=True)
class Evidence:
    """One claim and the events it rests on."""

    claim: str
    refs: tuple[Ref, ...] = ()
    unsupported: bool = False
    invalid_refs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"claim": self.claim, "refs": list(self.refs), "unsupported": self.unsupported}
        if self.invalid_refs:
            out["invalid_refs"] = list(self.invalid_refs)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evidence:
        return cls(
            claim=str(data["claim"]),
            refs=tuple(data.get("refs", ())),
            unsupported=bool(data.get("unsupported", False)),
            invalid_refs=tuple(str(r) for r in data.get("invalid_refs", ())),
        )


@dataclass(frozen=True, slots=True)
class Narrative:
    """What the model said when asked to explain a rules diagnosis (``--explain``)."""

    text: str
    evidence: tuple[Evidence, ...] = ()
    confidence: float = 0.0
    actions: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "evidence": [e.to_json() for e in self.evidence],
            "confidence": self.confidence,
            "actions": list(self.actions),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Narrative:
        return cls(
            text=str(data.get("text", "")),
            evidence=tuple(Evidence.from_json(e) for e in data.get("evidence", ())),
            confidence=float(data.get("confidence", 0.0)),
            actions=tuple(str(a) for a in data.get("actions", ())),
        )


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The report. ``to_json`` is the ``-o json`` object."""

    target: str
    source: str
    root_cause: str
    evidence: tuple[Evidence, ...]
    confidence: float
    actions: tuple[str, ...]
    tools_called: tuple[dict[str, Any], ...] = ()
    verdict: str | None = None
    rule: dict[str, Any] | None = None
    why_root_cause: dict[str, Any] | None = None
    model: str | None = None
    steps: int = 0
    cached: bool = False
    narrative: Narrative | None = None
    notes: tuple[str, ...] = field(default=())

    def with_cached(self, cached: bool = True) -> Diagnosis:
        return replace(self, cached=cached)

    def to_json(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": "Diagnosis",
            "target": self.target,
            "source": self.source,
            "verdict": self.verdict,
            "root_cause": self.root_cause,
            "evidence": [e.to_json() for e in self.evidence],
            "confidence": self.confidence,
            "actions": list(self.actions),
            "tools_called": [dict(t) for t in self.tools_called],
            "rule": self.rule,
            "why_root_cause": self.why_root_cause,
            "model": self.model,
            "steps": self.steps,
            "cached": self.cached,
            "narrative": self.narrative.to_json() if self.narrative else None,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Diagnosis:
        """Read back what :meth:`to_json` wrote (the disk cache). Raises KeyError/TypeError/
        ValueError on anything else."""
        if data.get("kind") != "Diagnosis" or data.get("source") not in SOURCES:
            raise ValueError("not a Diagnosis")
        narrative = data.get("narrative")
        return cls(
            target=str(data["target"]),
            source=str(data["source"]),
            root_cause=str(data["root_cause"]),
            evidence=tuple(Evidence.from_json(e) for e in data["evidence"]),
            confidence=float(data["confidence"]),
            actions=tuple(str(a) for a in data["actions"]),
            tools_called=tuple(dict(t) for t in data.get("tools_called", ())),
            verdict=data.get("verdict"),
            rule=data.get("rule"),
            why_root_cause=data.get("why_root_cause"),
            model=data.get("model"),
            steps=int(data.get("steps", 0)),
            cached=bool(data.get("cached", False)),
            narrative=Narrative.from_json(narrative) if isinstance(narrative, dict) else None,
            notes=tuple(str(n) for n in data.get("notes", ())),
        )


class LLMError(XctlError):
    """The LLM step failed (no package, no key, unreachable, timeout, refused, malformed answer).

    ``fallback`` is the deterministic diagnosis, to be shown anyway; ``status`` the HTTP
    status when the server answered with an error.
    """

    code = "LLM"
    exit_code = 1

    def __init__(self, message: str, *, status: int | None = None, fallback: Diagnosis | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.fallback = fallback


def iso_ms(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
