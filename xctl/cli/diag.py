"""`xctl diag TARGET`: rules first, then an LLM with read-only tools (xctl.diag)."""

from __future__ import annotations

import sys
from typing import Any

import click

from xctl.cli import render
from xctl.cli.common import client_options, guarded, make_client
from xctl.core.targets import parse_target
from xctl.diag import DEFAULT_MODEL, DiagCache, Diagnosis, LLMConfig, LLMError, diagnose
from xctl.diag.llm import DEFAULT_MAX_STEPS, DEFAULT_TIMEOUT_S
from xctl.diag.report import iso_ms

_TS_MIN = 10**11  # refs at least this large are ms timestamps; smaller ints never occur


@click.command()
@click.argument("target")
@click.option("--node", default=None, help="node for a bare pid target")
@click.option("--explain", is_flag=True, help="ask the model for a narrative even when a rule matched")
@click.option("--model", default=None, metavar="M", help=f"LLM model name (default {DEFAULT_MODEL})")
@click.option(
    "--base-url",
    default=None,
    metavar="URL",
    help="OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1 (env OPENAI_BASE_URL; key: OPENAI_API_KEY)",
)
@click.option(
    "--max-steps",
    type=click.IntRange(0, 20),
    default=DEFAULT_MAX_STEPS,
    show_default=True,
    help="most tool turns before the final answer",
)
@click.option(
    "--llm-timeout",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    metavar="SECONDS",
    help="give the LLM step at most this long in all",
)
@click.option("--no-cache", is_flag=True, help="do not use or fill the 60 s diagnosis cache")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@client_options
@guarded
def diag(
    target: str,
    node: str | None,
    explain: bool,
    model: str | None,
    base_url: str | None,
    max_steps: int,
    llm_timeout: float,
    no_cache: bool,
    output: str,
    aggregator: str | None,
    timeout: float | None,
    keys: str | None,
) -> None:
    """Diagnose TARGET (node:pid, pid or job:ID): root cause, evidence, confidence, actions.

    The deterministic causal chain and the rules come first; when a rule matched, that is
    the answer and no model is asked (unless --explain). Otherwise a model gets the findings
    and read-only tools (why, ps, events, job ranks, node liveness, rule search) — it can
    change nothing, and its recommended actions are never executed.
    """
    parse_target(target, default_node=node)  # a malformed target is a usage error before any network
    config = LLMConfig.resolve(model=model, base_url=base_url, max_steps=max_steps, timeout_s=llm_timeout)
    cache = None if no_cache else DiagCache.default()
    with make_client(aggregator, timeout) as client:
        try:
            result = diagnose(client, target, node=node, explain=explain, config=config, cache=cache)
        except LLMError as exc:
            if exc.fallback is not None:
                _show(exc.fallback, output, error=str(exc))
            raise
    _show(result, output)


def _show(result: Diagnosis, output: str, *, error: str | None = None) -> None:
    if output == "json":
        data: dict[str, Any] = result.to_json()
        if error is not None:
            data["error"] = {"code": LLMError.code, "message": error}
        render.print_json(data)
    else:
        con = render.console()
        for line in diagnosis_lines(result, error=error):
            con.print(line, markup=False, highlight=False)
    sys.stdout.flush()


def _ref(ref: object) -> str:
    if isinstance(ref, int) and ref >= _TS_MIN:
        return iso_ms(ref)
    return str(ref)


def diagnosis_lines(d: Diagnosis, *, error: str | None = None) -> list[str]:
    """The compact text report."""
    if d.source == "llm":
        source = f"llm {d.model}"
    else:
        source = "rules" if d.rule else "causal chain; no rule matched"
    extra = [f"{d.steps} tool turn{'s' if d.steps != 1 else ''}"] if d.source == "llm" or d.narrative else []
    if d.cached:
        extra.append("cached")
    head = f"{d.target}: {(d.verdict or 'unknown').upper()}   [{', '.join([source, *extra])}]"
    lines = [head, f"root cause: {d.root_cause}", f"confidence: {d.confidence:.2f}"]
    if d.rule:
        lines.append(f"rule: {d.rule.get('id')} severity={d.rule.get('severity')}")
    lines.extend(_evidence_lines(d.evidence))
    if d.actions:
        lines.append("actions (not executed):")
        lines.extend(f"  {i}. {a}" for i, a in enumerate(d.actions, 1))
    if d.narrative is not None:
        lines.append(f"narrative ({d.model}): {d.narrative.text}")
        lines.extend("  " + line for line in _evidence_lines(d.narrative.evidence))
        if d.narrative.actions:
            lines.append("  suggested (not executed): " + "; ".join(d.narrative.actions))
    if d.tools_called:
        calls = [f"{t['name']}({_args(t.get('args') or {})})" + ("" if t.get("ok") else "!") for t in d.tools_called]
        lines.append("tools: " + " ".join(calls))
    lines.extend(f"note: {n}" for n in d.notes)
    if error is not None:  # the message itself goes to stderr
        lines.append("llm: no report (the step failed; the findings above are xctl's own)")
    return lines


def _evidence_lines(evidence: tuple[Any, ...]) -> list[str]:
    if not evidence:
        return []
    lines = ["evidence:"]
    for e in evidence:
        refs = ", ".join(_ref(r) for r in e.refs)
        mark = "  (UNSUPPORTED: cites no event it was shown)" if e.unsupported else f"  [{refs}]"
        lines.append(f"  - {e.claim}{mark}")
    return lines


def _args(args: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in args.items())
