"""Loading rule files: the built-in knowledge base, then site directories that override it.

Files are read in a fixed order — built-ins, then each directory in the order given, each
directory's ``*.yaml``/``*.yml`` files sorted by name — and a later rule with an id already
loaded replaces it (``RuleSet.overrides`` records that). A file with any error is reported
(file and line) and skipped whole; it never disables the other files. Rule-test files
(top-level ``cases:`` or ``expect:``) may live in the same directories and are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final

from xctl.core.errors import RuleError
from xctl.rules._yaml import RuleFileError, parse_yaml, read_yaml
from xctl.rules.schema import Rule, file_kind, parse_rule_file

log = logging.getLogger(__name__)

BUILTIN_PREFIX: Final = "builtin/"
SUFFIXES: Final = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class Override:
    id: str
    replaced: str
    by: str


@dataclass
class RuleSet:
    """The effective rules (ids unique), what went wrong, and where rules came from."""

    rules: list[Rule] = field(default_factory=list)
    errors: list[RuleError] = field(default_factory=list)
    #: Files that contributed rules, in load order (built-ins as ``builtin/NAME.yaml``).
    sources: list[str] = field(default_factory=list)
    overrides: list[Override] = field(default_factory=list)

    def get(self, rule_id: str) -> Rule | None:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        return None

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.rules]


def builtin_files() -> list[tuple[str, Traversable]]:
    """The built-in rule files, sorted: (``builtin/NAME.yaml``, resource)."""
    folder = resources.files("xctl.rules").joinpath("builtin")
    out = [
        (BUILTIN_PREFIX + item.name, item)
        for item in folder.iterdir()
        if item.is_file() and item.name.endswith(SUFFIXES) and not item.name.startswith(".")
    ]
    return sorted(out, key=lambda pair: pair[0])


def rule_files(path: Path) -> list[Path]:
    """A file itself, or a directory's YAML files sorted by name (not recursive)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith("."))
    return [path]


def _read_builtin(name: str, item: Traversable) -> Any:
    try:
        text = item.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError(name, None, f"cannot read built-in rules: {exc}") from exc
    return parse_yaml(text, name)


def _load_file(data: Any, source: str) -> tuple[list[Rule], list[RuleFileError]] | None:
    """None for a rule-test file (not rules); else the file's rules and problems."""
    kind = file_kind(data)
    if kind == "cases":
        log.debug("rules: %s holds rule tests, not rules; skipped", source)
        return None
    if kind == "unknown" and data is not None:
        return [], [RuleFileError(source, None, "not a rule file: expected a top-level `rules:` list")]
    return parse_rule_file(data, source)


def _sources(
    dirs: list[Path], *, builtin: bool, errors: list[RuleError]
) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(source name, reader) of every file to load, in load order."""
    if builtin:
        for name, item in builtin_files():
            yield name, partial(_read_builtin, name, item)
    for directory in dirs:
        if not directory.exists():
            errors.append(RuleFileError(str(directory), None, "no such file or directory"))
            continue
        for path in rule_files(directory):
            yield str(path), partial(read_yaml, path)


def load_rules(dirs: list[Path], *, builtin: bool = True) -> RuleSet:
    """Built-in rules (unless ``builtin=False``), overridden by the rules in ``dirs``
    (directories or single files, repeatable; later ones win)."""
    ruleset = RuleSet()
    by_id: dict[str, Rule] = {}
    for source, read in _sources(dirs, builtin=builtin, errors=ruleset.errors):
        try:
            data = read()
        except RuleFileError as exc:
            ruleset.errors.append(exc)
            log.warning("rules: %s skipped: %s", source, exc)
            continue
        result = _load_file(data, source)
        if result is None:
            continue
        rules, problems = result
        if problems:
            ruleset.errors.extend(problems)
            log.warning("rules: %s has %d error(s), skipped; first: %s", source, len(problems), problems[0])
            continue
        for rule in rules:
            old = by_id.get(rule.id)
            if old is not None:
                ruleset.overrides.append(Override(rule.id, old.location, rule.location))
                log.info("rules: %s overrides %s (from %s)", rule.location, rule.id, old.location)
            by_id[rule.id] = rule
        if rules:
            ruleset.sources.append(source)
    ruleset.rules = list(by_id.values())
    return ruleset


def lint(path: Path) -> list[RuleError]:
    """Every schema problem of a rule file, or of the rule and rule-test files in a directory,
    each with file and line. An empty list means the rules would load."""
    from xctl.rules.testing import check_case_file

    if not path.exists():
        return [RuleFileError(str(path), None, "no such file or directory")]
    files = rule_files(path)
    if not files:
        return [RuleFileError(str(path), None, "no rule files (*.yaml, *.yml) here")]
    errors: list[RuleError] = []
    first_seen: dict[str, str] = {}
    for file in files:
        try:
            data = read_yaml(file)
        except RuleFileError as exc:
            errors.append(exc)
            continue
        if file_kind(data) == "cases":
            errors.extend(check_case_file(data, str(file)))
            continue
        result = _load_file(data, str(file))
        assert result is not None
        rules, problems = result
        errors.extend(problems)
        for rule in rules:
            if rule.id in first_seen:
                errors.append(
                    RuleFileError(str(file), rule.line, f"rule id {rule.id!r} is also defined at {first_seen[rule.id]}")
                )
            else:
                first_seen[rule.id] = rule.location
    return errors


def list_rules(ruleset: RuleSet) -> list[dict[str, Any]]:
    """The ``rules list`` items (DESIGN §7): {id, scene, severity, action, source} plus line,
    priority, description and, for a site rule that replaced another, ``overrides``."""
    replaced = {o.id: o.replaced for o in ruleset.overrides}
    items: list[dict[str, Any]] = []
    for rule in sorted(ruleset.rules, key=lambda r: r.id):
        item = rule.to_json()
        if rule.id in replaced:
            item["overrides"] = replaced[rule.id]
        items.append(item)
    return items
