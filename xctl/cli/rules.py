"""`xctl rules list | lint PATH | test PATH` — the knowledge base, locally (no aggregator)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from xctl.cli import render
from xctl.cli.common import guarded
from xctl.core.errors import RuleError
from xctl.rules import lint, list_rules, load_rules, run_tests

rules_dirs_option = click.option(
    "--rules",
    "rules_dirs",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    metavar="DIR",
    help="site rules directory or file (repeatable; later ones override earlier and built-in ids)",
)
json_option = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)


@click.group("rules")
def rules_group() -> None:
    """The rules knowledge base: list, lint and test rules."""


def _print_errors(errors: list[RuleError]) -> None:
    con = render.console(stderr=True)
    for error in errors:
        con.print(f"xctl: {error}", markup=False, style="red")


@rules_group.command("list")
@rules_dirs_option
@json_option
@guarded
def list_command(rules_dirs: tuple[Path, ...], output: str) -> None:
    """Every effective rule (built-in and site) and where it comes from."""
    ruleset = load_rules(list(rules_dirs))
    items = list_rules(ruleset)
    if output == "json":
        render.print_json(
            {"apiVersion": "xctl/v1", "kind": "RuleList", "items": items, "errors": [str(e) for e in ruleset.errors]}
        )
    else:
        render.render_rules(render.console(), items)
    if ruleset.errors:
        _print_errors(ruleset.errors)


@rules_group.command("lint")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@guarded
def lint_command(path: Path, output: str) -> None:
    """Check rule files (and rule test files) for schema errors; exit 1 if any."""
    errors = lint(path)
    if output == "json":
        render.print_json(
            {"apiVersion": "xctl/v1", "kind": "RuleLint", "ok": not errors, "errors": [str(e) for e in errors]}
        )
    elif errors:
        _print_errors(errors)
    else:
        render.console().print(f"{path}: ok")
    if errors:
        sys.exit(1)


@rules_group.command("test")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@rules_dirs_option
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@guarded
def test_command(path: Path, rules_dirs: tuple[Path, ...], output: str) -> None:
    """Run rule test cases (events + expected rule and root cause); exit 1 if any fails."""
    ruleset = load_rules(list(rules_dirs)) if rules_dirs else None
    report = run_tests(path, ruleset=ruleset)
    if output == "json":
        render.print_json(report.to_json())
    else:
        con = render.console()
        for result in report.results:
            mark = "PASS" if result.passed else "FAIL"
            where = f"{result.source}:{result.line}" if result.line else result.source
            con.print(
                f"{mark}  {result.name}  ({where})" + ("" if result.passed else f": {result.reason}"),
                markup=False,
                style="green" if result.passed else "red",
            )
        _print_errors(report.errors)
        con.print(f"{report.passed} passed, {report.failed} failed")
    if not report.ok:
        sys.exit(1)
