"""Rule schema: every error located by file and line; matchers, trees and templates."""

from __future__ import annotations

import textwrap

import pytest

from xctl.core.errors import RuleError
from xctl.rules._yaml import RuleFileError, parse_yaml
from xctl.rules.facts import Facts
from xctl.rules.schema import Problems, Rule, parse_conditions, parse_rule_file, parse_template

GOOD_RULE = """\
rules:
  - id: gpu-gone
    scene: GpuError
    severity: fatal
    conditions:
      - root.code: XID_79
    summary: "{root.gpu} fell off the bus"
    action: RESTART_BM
    steps: ["drain {root.node}"]
"""


def parse(text: str) -> tuple[list[Rule], list[RuleFileError]]:
    return parse_rule_file(parse_yaml(textwrap.dedent(text), "site.yaml"), "site.yaml")


def errors_of(text: str) -> list[tuple[int | None, str]]:
    rules, errors = parse(text)
    assert errors, f"expected errors, parsed {[r.id for r in rules]}"
    return [(e.line, e.detail) for e in errors]


def cond(text: str) -> object:
    problems = Problems("c.yaml")
    data = parse_yaml(textwrap.dedent(text), "c.yaml")
    node = parse_conditions(data, 1, problems)
    assert not problems, [str(p) for p in problems.items]
    assert node is not None
    return node


def holds(text: str, **facts: object) -> int | None:
    node = cond(text)
    values = {k.replace("__", "."): v for k, v in facts.items()}
    return node.evaluate(Facts(values))  # type: ignore[attr-defined, arg-type]


def test_good_rule_parses() -> None:
    rules, errors = parse(GOOD_RULE)
    assert errors == []
    (rule,) = rules
    assert (rule.id, rule.scene, rule.severity, rule.action, rule.line) == ("gpu-gone", "GpuError", "fatal",
                                                                            "RESTART_BM", 2)
    assert rule.source == "site.yaml"


def test_errors_are_rule_errors_with_file_and_line() -> None:
    _, errors = parse(GOOD_RULE.replace("RESTART_BM", "REBOOT_IT"))
    (error,) = errors
    assert isinstance(error, RuleError)
    assert str(error).startswith("site.yaml:8: ")
    assert "unknown action 'REBOOT_IT'" in str(error)
    assert error.to_json() == {"path": "site.yaml", "line": 8, "message": error.detail}


def test_missing_id() -> None:
    assert errors_of(GOOD_RULE.replace("  - id: gpu-gone\n    scene", "  - scene")) == [(2, "rule: missing id")]


def test_bad_regex_names_the_line() -> None:
    ((line, detail),) = errors_of(GOOD_RULE.replace("root.code: XID_79", 'root.code: "re:^XID_(48|63$"'))
    assert line == 6
    assert "bad regular expression" in detail


def test_unknown_fact_suggests_the_right_one() -> None:
    ((line, detail),) = errors_of(GOOD_RULE.replace("root.code: XID_79", "root.cdoe: XID_79"))
    assert line == 6
    assert "unknown fact 'root.cdoe'" in detail
    assert "did you mean 'root.code'" in detail


def test_unknown_fact_in_a_template() -> None:
    ((line, detail),) = errors_of(GOOD_RULE.replace("{root.gpu} fell", "{root.gpux} fell"))
    assert line == 7
    assert "unknown fact {root.gpux}" in detail


def test_unknown_action_scene_severity() -> None:
    text = GOOD_RULE.replace("RESTART_BM", "reboot").replace("GpuError", "Gpu").replace("fatal", "high")
    found = errors_of(text)
    assert [line for line, _ in found] == [3, 4, 8]
    assert "unknown scene 'Gpu'" in found[0][1]
    assert "unknown severity 'high'" in found[1][1]
    assert "unknown action 'reboot'" in found[2][1]


def test_site_actions_are_accepted() -> None:
    rules, errors = parse(GOOD_RULE.replace("RESTART_BM", "SITE_OPEN_TICKET"))
    assert errors == []
    assert rules[0].action == "SITE_OPEN_TICKET"


@pytest.mark.parametrize(
    ("old", "new", "line", "fragment"),
    [
        ('steps: ["drain {root.node}"]', "steps: drain", None, None),  # a single string is fine
        ('steps: ["drain {root.node}"]', "steps: []", 9, "steps must be a non-empty list"),
        ('steps: ["drain {root.node}"]', "steps: [1, 2]", 9, "each of steps must be a non-empty string"),
        ('summary: "{root.gpu} fell off the bus"', "summary: 42", 7, "summary must be a non-empty string"),
        ("severity: fatal", "severity: fatal\n    priority: high", 5, "priority must be an integer"),
        ("root.code: XID_79", "root.xid: {gte: many}", 6, "gte needs a number"),
        ("root.code: XID_79", "root.xid: {gtee: 2}", 6, "unknown comparison 'gtee'"),
        ("root.code: XID_79", "root.code: {in: XID_79}", 6, "in needs a list of values"),
        ("root.code: XID_79", "root.code: [[XID_79]]", 6, "a list inside a list"),
        ("root.code: XID_79", "root.code: 2024-01-01", 6, "expected a value"),
        ("- root.code: XID_79", "- 42", 6, "each condition is"),
        ("id: gpu-gone", "id: Gpu Gone!", 2, "not a valid rule id"),
        ("action: RESTART_BM", "action: RESTART_BM\n    colour: red", 9, "unknown rule key 'colour'"),
    ],
)
def test_wrong_types_are_reported_at_their_line(old: str, new: str, line: int | None, fragment: str | None) -> None:
    assert old in GOOD_RULE
    _, errors = parse(GOOD_RULE.replace(old, new))
    if fragment is None:
        assert errors == []
        return
    assert {e.line for e in errors} == {line}, [str(e) for e in errors]
    assert fragment in errors[0].detail


def test_every_problem_of_a_file_is_reported_in_line_order() -> None:
    text = GOOD_RULE + textwrap.indent(
        textwrap.dedent("""\
            - id: second
              scene: Nope
              severity: fatal
              conditions: []
              summary: "x {"
              action: RESTART_BM
              steps: [go]
            """),
        "  ",
    )
    found = errors_of(text)
    assert [line for line, _ in found] == sorted(line for line, _ in found)
    details = " | ".join(d for _, d in found)
    assert "unknown scene 'Nope'" in details
    assert "conditions: required" in details
    assert "unbalanced '{'" in details


def test_duplicate_keys_and_ids() -> None:
    with pytest.raises(RuleFileError) as info:
        parse(GOOD_RULE.replace("    action: RESTART_BM\n", "    action: RESTART_BM\n    action: IGNORE\n"))
    assert info.value.line == 9
    assert "duplicate key 'action' (first on line 8)" in info.value.detail
    twice = GOOD_RULE + GOOD_RULE.split("rules:\n", 1)[1]
    ((line, detail),) = errors_of(twice)
    assert line == 10
    assert "duplicate rule id 'gpu-gone'" in detail


def test_yaml_syntax_error_has_a_line() -> None:
    with pytest.raises(RuleFileError) as info:
        parse_yaml("rules:\n  - id: x\n    steps: [a, b\n", "broken.yaml")
    assert info.value.path == "broken.yaml"
    assert info.value.line is not None and info.value.line >= 3
    assert "invalid YAML" in info.value.detail


def test_top_level_shape() -> None:
    assert errors_of("rules: nope\n") == [(1, "rules: expected a list of rules, got str 'nope'")]
    assert "unknown top-level key 'rule'" in errors_of("rule: []\nrules: []\n")[0][1]
    assert "version: 2 is not supported" in errors_of("version: 2\nrules: []\n")[0][1]
    rules, errors = parse(GOOD_RULE.split("rules:\n", 1)[1].replace("\n  ", "\n").lstrip())
    assert errors == [] and len(rules) == 1  # a bare list of rules is a rule file too


# ---------------------------------------------------------------------- matching
def test_exact_list_regex_and_comparisons() -> None:
    assert holds("root.code: XID_79", root__code="XID_79") == 1
    assert holds("root.code: XID_79", root__code="XID_48") is None
    assert holds("root.code: [XID_48, XID_63]", root__code="XID_63") == 1
    assert holds('root.code: "re:^XID_(48|63)$"', root__code="XID_63") == 1
    assert holds('root.code: "re:^XID_(48|63)$"', root__code="XID_630") is None
    assert holds("root.xid: {gte: 2, lt: 100}", root__xid=79) == 1
    assert holds("root.xid: {gte: 2, lt: 79}", root__xid=79) is None
    assert holds("root.xid: 79", root__xid=79) == 1
    assert holds("root.xid: 79", root__xid="79") == 1  # numeric strings compare as numbers
    assert holds("root.xid: [13, {gt: 100}]", root__xid=154) == 1
    assert holds("root.code: {in: [XID_13, XID_31]}", root__code="XID_31") == 1
    assert holds("root.code: {not_in: [XID_13, XID_31]}", root__code="XID_31") is None
    assert holds("root.code: {ne: XID_13}", root__code="XID_31") == 1
    assert holds('root.code: {re: "^XID_"}', root__code="XID_31") == 1


def test_booleans_are_strict() -> None:
    assert holds("has_root: true", has_root=True) == 1
    assert holds("has_root: true", has_root=1) is None
    assert holds("root.xid: 1", root__xid=True) is None


def test_missing_facts_fail_everything_but_null_and_exists_false() -> None:
    assert holds("root.xid: {lt: 100}") is None
    assert holds("root.xid: {ne: 79}") is None
    assert holds("root.xid: null") == 1
    assert holds("root.xid: {exists: false}") == 1
    assert holds("root.xid: {exists: true}", root__xid=79) == 1
    # family facts that count or flag default to 0 / false instead of missing
    assert holds("cooccurs.XID_63: false") == 1
    assert holds("node.count.XID_79: 0") == 1


def test_list_facts_match_any_element_and_compare_their_length() -> None:
    assert holds("symptoms: NCCL_TIMEOUT", symptoms=("NCCL_TIMEOUT", "STALLED")) == 1
    assert holds('symptoms: "re:^XID_"', symptoms=("NCCL_TIMEOUT",)) is None
    assert holds("symptoms: {gte: 2}", symptoms=("NCCL_TIMEOUT", "STALLED")) == 1
    assert holds("symptoms: {not_in: [XID_45]}", symptoms=("NCCL_TIMEOUT",)) == 1


def test_all_any_not_trees_and_their_specificity() -> None:
    tree = """\
    all:
      - root.code: "re:^XID_(13|31|43)$"
      - any:
          - root.repeat_jobs: {gte: 2}
          - all:
              - job.gpus_with_root_code: {gte: 2}
              - root.kind: application
      - not:
          root.entity_class: nvlink
    """
    assert holds(tree, root__code="XID_31", root__repeat_jobs=3, root__entity_class="gpu") == 3
    assert holds(tree, root__code="XID_31", job__gpus_with_root_code=4, root__kind="application",
                 root__entity_class="gpu") == 4
    assert holds(tree, root__code="XID_31", root__repeat_jobs=3, root__entity_class="nvlink") is None
    assert holds(tree, root__code="XID_31", root__repeat_jobs=1, root__entity_class="gpu") is None
    leaves = [leaf.describe() for leaf in cond(tree).leaves()]  # type: ignore[attr-defined]
    assert leaves == [
        "root.code: re:^XID_(13|31|43)$",
        "root.repeat_jobs: {gte: 2}",
        "job.gpus_with_root_code: {gte: 2}",
        "root.kind: 'application'",
        "root.entity_class: 'nvlink'",
    ]
    # a mapping of several facts is all of them; `any:` also takes a mapping
    assert holds("{root.code: XID_79, root.node: node3}", root__code="XID_79", root__node="node3") == 2
    assert holds("any: {root.code: XID_79, root.node: node3}", root__code="XID_79", root__node="node1") == 1


def test_templates_fill_facts_and_never_crash_on_missing_ones() -> None:
    problems = Problems("t.yaml")
    template = parse_template("{root.gpu} on {root.node}: {root.age_s:.0f}s, {{literal}}, {symptoms}, "
                              "{root.attr.width}, {root.xid:>5}", 1, problems, "summary")
    assert not problems
    facts = Facts({"root.gpu": "gpu-3", "root.age_s": 12.6, "symptoms": ("A", "B"), "root.xid": "n/a"})
    assert template.render(facts) == "gpu-3 on ?: 13s, {literal}, A, B, ?,   n/a"
    bad_spec = parse_template("{root.age_s:d}", 1, problems, "summary")
    assert bad_spec.render(Facts({"root.age_s": 1.5})) == "1.5"
