"""Matching: the best rule for an explanation, rendered into a :class:`RuleMatch`.

Best = most specific (most leaf conditions satisfied, see schema), then highest ``priority``,
then most severe, then the smallest id — a total order, so the answer never depends on load
order or hash seeds. ``Engine.enrich`` is the aggregator's ``Enricher`` hook: it never raises;
a failure is logged and the explanation is returned unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from xctl.core.cluster import ClusterGraph
from xctl.core.why import Explanation, RuleMatch
from xctl.rules.facts import COOCCUR_WINDOW_MS, Facts, compute
from xctl.rules.schema import Rule

log = logging.getLogger(__name__)


class HasRules(Protocol):
    @property
    def rules(self) -> list[Rule]: ...


@dataclass(frozen=True, slots=True)
class Match:
    rule: Rule
    specificity: int

    @property
    def rank(self) -> tuple[int, int, int, str]:
        """Sort key: smaller is better."""
        return (-self.specificity, -self.rule.priority, -self.rule.severity_rank, self.rule.id)


class Engine:
    """Matches rules against explanations. Immutable after construction; safe to share."""

    def __init__(self, rules: HasRules | Iterable[Rule], *, cooccur_window_ms: int = COOCCUR_WINDOW_MS) -> None:
        items = rules.rules if hasattr(rules, "rules") else rules
        self._rules: tuple[Rule, ...] = tuple(sorted(items, key=lambda r: r.id))
        self.cooccur_window_ms = cooccur_window_ms

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    def facts(self, explanation: Explanation, cluster: ClusterGraph) -> Facts:
        return compute(explanation, cluster, cooccur_window_ms=self.cooccur_window_ms)

    def matches(self, facts: Facts) -> list[Match]:
        """Every matching rule, best first."""
        found: list[Match] = []
        for rule in self._rules:
            score = rule.conditions.evaluate(facts)
            if score is not None:
                found.append(Match(rule, score))
        found.sort(key=lambda m: m.rank)
        return found

    def best(self, facts: Facts) -> Match | None:
        best: Match | None = None
        for rule in self._rules:
            score = rule.conditions.evaluate(facts)
            if score is None:
                continue
            candidate = Match(rule, score)
            if best is None or candidate.rank < best.rank:
                best = candidate
        return best

    @staticmethod
    def render(rule: Rule, facts: Facts) -> RuleMatch:
        return RuleMatch(
            id=rule.id,
            severity=rule.severity,
            action=rule.action,
            summary=rule.summary.render(facts),
            steps=tuple(step.render(facts) for step in rule.steps),
        )

    def match(self, explanation: Explanation, cluster: ClusterGraph) -> RuleMatch | None:
        """The rendered best rule, or None. May raise on a bug; ``enrich`` never does."""
        facts = self.facts(explanation, cluster)
        best = self.best(facts)
        if best is None:
            return None
        return self.render(best.rule, facts)

    def enrich(self, explanation: Explanation, cluster: ClusterGraph) -> Explanation:
        """The Enricher hook: the explanation with its best rule, or unchanged."""
        try:
            found = self.match(explanation, cluster)
        except Exception:  # a rule bug must never break `why`
            log.exception("rules: matching failed for %s; answering without a rule", explanation.target.label())
            return explanation
        if found is None:
            return explanation
        log.debug("rules: %s matched %s", found.id, explanation.target.label())
        return explanation.with_rule(found)

    __call__ = enrich
