"""The rules engine (pure) and the built-in knowledge base (``builtin/*.yaml``).

Public API::

    ruleset = load_rules([Path("/etc/xctl/rules")])     # built-ins + site rules; errors collected
    engine = Engine(ruleset)                              # engine.enrich is the aggregator's Enricher
    explanation = engine.enrich(explanation, cluster)     # fills Explanation.rule, or leaves it
    list_rules(ruleset)                                   # `xctl rules list` items
    lint(Path("rules/"))                                  # `xctl rules lint`: [RuleError], file:line
    run_tests(Path("rules/tests/"))                       # `xctl rules test`: TestReport

The schema, the facts conditions can use and the test-case format: docs/rules.md.
"""

from xctl.rules._yaml import RuleFileError
from xctl.rules.engine import Engine, Match
from xctl.rules.facts import FACTS, FAMILIES, Facts, compute, entity_class, fact_specs
from xctl.rules.loader import Override, RuleSet, builtin_files, lint, list_rules, load_rules
from xctl.rules.schema import ACTIONS, SCENES, SEVERITIES, Rule
from xctl.rules.testing import CaseResult, RuleCase, TestReport, load_cases, run_case, run_tests

__all__ = [
    "ACTIONS",
    "FACTS",
    "FAMILIES",
    "SCENES",
    "SEVERITIES",
    "CaseResult",
    "Engine",
    "Facts",
    "Match",
    "Override",
    "Rule",
    "RuleCase",
    "RuleFileError",
    "RuleSet",
    "TestReport",
    "builtin_files",
    "compute",
    "entity_class",
    "fact_specs",
    "lint",
    "list_rules",
    "load_cases",
    "load_rules",
    "run_case",
    "run_tests",
]
