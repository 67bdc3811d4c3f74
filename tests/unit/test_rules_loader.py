"""Loading: built-ins, site directories that override them, broken files skipped, lint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from xctl.rules import RuleFileError, lint, list_rules, load_rules

SITE_RULE = """\
rules:
  - id: {id}
    scene: GpuError
    severity: {severity}
    conditions:
      - root.code: XID_79
    summary: "site says: {{root.gpu}} is gone"
    action: {action}
    steps: ["page the hardware on-call"]
"""

BROKEN = """\
rules:
  - id: broken-one
    scene: GpuError
    severity: fatal
    conditions:
      - root.codez: XID_79
    summary: "x"
    action: RESTART_BM
    steps: [x]
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def site_rule(rule_id: str, *, action: str = "SITE_PAGE_ONCALL", severity: str = "critical") -> str:
    return SITE_RULE.format(id=rule_id, action=action, severity=severity)


def test_builtin_rules_load_cleanly() -> None:
    ruleset = load_rules([])
    assert ruleset.errors == []
    assert len(ruleset.rules) >= 60
    assert all(s.startswith("builtin/") for s in ruleset.sources)
    assert len(set(ruleset.ids)) == len(ruleset.ids)
    assert load_rules([], builtin=False).rules == []


def test_site_rule_overrides_a_builtin_with_the_same_id(tmp_path: Path) -> None:
    path = write(tmp_path / "site", "overrides.yaml", site_rule("xid-79-fell-off-bus"))
    ruleset = load_rules([tmp_path / "site"])
    assert ruleset.errors == []
    rule = ruleset.get("xid-79-fell-off-bus")
    assert rule is not None
    assert rule.action == "SITE_PAGE_ONCALL"
    assert rule.source == str(path)
    assert ruleset.ids.count("xid-79-fell-off-bus") == 1
    (override,) = ruleset.overrides
    assert override.replaced.startswith("builtin/xid.yaml:")
    assert override.by == f"{path}:2"
    item = next(i for i in list_rules(ruleset) if i["id"] == "xid-79-fell-off-bus")
    assert item["source"] == str(path)
    assert item["overrides"] == override.replaced


def test_later_directories_win(tmp_path: Path) -> None:
    write(tmp_path / "a", "r.yaml", site_rule("site-79", action="SITE_A"))
    write(tmp_path / "b", "r.yaml", site_rule("site-79", action="SITE_B"))
    ruleset = load_rules([tmp_path / "a", tmp_path / "b"], builtin=False)
    rule = ruleset.get("site-79")
    assert rule is not None and rule.action == "SITE_B"


def test_a_broken_file_is_reported_and_skipped_while_the_others_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = tmp_path / "site"
    write(site, "a_good.yaml", site_rule("site-good"))
    bad = write(site, "b_broken.yaml", BROKEN)
    write(site, "c_syntax.yaml", "rules:\n  - id: [unclosed\n")
    write(site, "d_good.yml", site_rule("site-good-too"))
    with caplog.at_level(logging.WARNING, logger="xctl.rules.loader"):
        ruleset = load_rules([site])
    assert {"site-good", "site-good-too"} <= set(ruleset.ids)
    assert "broken-one" not in ruleset.ids
    assert ruleset.get("xid-79-fell-off-bus") is not None  # built-ins untouched
    messages = [str(e) for e in ruleset.errors]
    assert messages[0] == (
        f"{bad}:6: conditions: unknown fact 'root.codez' (did you mean 'root.code'?) (see docs/rules.md)"
    )
    assert messages[1].startswith(f"{site / 'c_syntax.yaml'}:3: invalid YAML")
    assert all(isinstance(e, RuleFileError) for e in ruleset.errors)
    assert str(bad) in caplog.text
    assert ruleset.sources[-2:] == [str(site / "a_good.yaml"), str(site / "d_good.yml")]


def test_missing_directory_is_an_error_not_a_crash(tmp_path: Path) -> None:
    ruleset = load_rules([tmp_path / "nope"])
    assert [str(e) for e in ruleset.errors] == [f"{tmp_path / 'nope'}: no such file or directory"]
    assert ruleset.rules  # built-ins still there


def test_rule_test_files_next_to_rules_are_not_rules(tmp_path: Path) -> None:
    write(tmp_path, "rules.yaml", site_rule("site-79"))
    write(tmp_path, "tests.yaml", "cases:\n  - name: x\n")
    write(tmp_path, "notes.yaml", "hello: world\n")
    ruleset = load_rules([tmp_path], builtin=False)
    assert ruleset.ids == ["site-79"]
    assert [str(e) for e in ruleset.errors] == [
        f"{tmp_path / 'notes.yaml'}: not a rule file: expected a top-level `rules:` list"
    ]


def test_list_rules_items() -> None:
    items = list_rules(load_rules([]))
    assert items == sorted(items, key=lambda i: i["id"])
    first = items[0]
    assert {"id", "scene", "severity", "action", "source"} <= set(first)
    assert all(i["source"].startswith("builtin/") for i in items)


def test_lint_reports_every_problem_with_line_numbers(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", BROKEN)
    write(tmp_path, "b.yaml", site_rule("site-79"))
    write(tmp_path, "c.yaml", site_rule("site-79"))
    write(tmp_path, "d.yaml", "cases:\n  - name: no target\n    events: []\n    expect: {rule: x}\n")
    errors = lint(tmp_path)
    text = [str(e) for e in errors]
    assert text[0] == f"{tmp_path / 'a.yaml'}:6: conditions: unknown fact 'root.codez' (did you mean 'root.code'?) " \
        "(see docs/rules.md)"
    assert text[1] == f"{tmp_path / 'c.yaml'}:2: rule id 'site-79' is also defined at {tmp_path / 'b.yaml'}:2"
    assert text[2] == f"{tmp_path / 'd.yaml'}:2: target: required, as node:pid or job:ID"
    assert len(errors) == 3


def test_lint_clean_and_missing(tmp_path: Path) -> None:
    path = write(tmp_path, "ok.yaml", site_rule("site-79"))
    assert lint(path) == []
    assert lint(tmp_path) == []
    assert [str(e) for e in lint(tmp_path / "none")] == [f"{tmp_path / 'none'}: no such file or directory"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no rule files" in str(lint(empty)[0])


def test_lint_of_the_builtin_directory_and_fixtures_is_clean() -> None:
    import xctl.rules

    builtin = Path(xctl.rules.__file__).parent / "builtin"
    assert lint(builtin) == []
    assert lint(Path(__file__).parents[1] / "fixtures" / "rules" / "cases") == []
