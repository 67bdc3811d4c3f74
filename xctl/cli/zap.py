"""`xctl zap TARGET` — end a process tree on a node, safely, once, with a record (issue 7).

1. Preview: ask the aggregator (``zap`` with ``dry_run``) for the tree it knows — pids,
   names, states, GPU memory held — and show it. ``--dry-run`` stops here.
2. Confirm: on a terminal ask; elsewhere ``--yes`` is required (else exit 2, nothing done).
3. Execute: a fresh command id (uuid4, the idempotency key: retries reuse it), the target's
   pid **and** create time (from the preview, or ``--create-time``), the signal and grace
   period. The aggregator answers when the agent's result arrives or at the deadline
   (grace + :data:`~xctl.aggregator.commands.DEADLINE_MARGIN_S`) with TIMEOUT; this client
   waits a little longer than that deadline.

Exit codes: 0 when everything in the tree is gone; 1 when something is left (zombie, D state,
GPU memory still held), was refused, or the outcome is unknown (TIMEOUT), or the node is down;
2 usage (including a missing ``--yes``); 3 aggregator unreachable; 4 unknown node or process.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Final

import click
from rich.console import Console
from rich.text import Text

from xctl.agent.actuator import MAX_GRACE_S, parse_signal
from xctl.cli import config, render
from xctl.cli.common import client_options, guarded, make_client
from xctl.cli.zap_exec import execute
from xctl.cli.zap_job import JobZap
from xctl.core.errors import NotFoundError, UsageError
from xctl.core.targets import parse_target

_OUTCOME_STYLE: Final = {
    "terminated": "green",
    "killed": "yellow",
    "already_gone": "dim",
    "zombie": "bold red",
    "d_state": "bold red",
    "survived": "bold red",
    "refused": "red",
}
_OUTCOME_LABEL: Final = {"already_gone": "already gone", "d_state": "D state"}


@click.command()
@click.argument("target")
@click.option("--node", default=None, help="node for a bare pid target")
@click.option(
    "--signal",
    "signal_name",
    default="TERM",
    show_default=True,
    help="first signal (TERM, INT, HUP, QUIT, ABRT, USR1, USR2, KILL); SIGKILL follows after the grace period",
)
@click.option(
    "--grace", type=float, default=10.0, show_default=True, metavar="SECONDS", help="wait this long before SIGKILL"
)
@click.option("--dry-run", is_flag=True, help="only show what would be ended")
@click.option("-y", "--yes", is_flag=True, help="do not ask (required when stdin is not a terminal)")
@click.option(
    "--create-time",
    type=float,
    default=None,
    metavar="EPOCH_S",
    help="the target's start time (seconds since the epoch), for a process no probe reports",
)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@client_options
@guarded
def zap(
    target: str,
    node: str | None,
    signal_name: str,
    grace: float,
    dry_run: bool,
    yes: bool,
    create_time: float | None,
    output: str,
    aggregator: str | None,
    timeout: float | None,
    keys: str | None,
) -> None:
    """End the process tree of TARGET (node:pid, pid or job:ID): SIGTERM, then SIGKILL after the grace period.

    Shows the tree first and asks; reports what happened to every process (zombies and
    processes stuck in D state are reported, not hidden). Exit 0 only when the whole tree is gone.
    job:ID ends every rank's tree of the job on every node (type the job id back to confirm).
    """
    parsed = parse_target(target, default_node=node)
    sig = parse_signal(signal_name)
    if not 0 <= grace <= MAX_GRACE_S:
        raise UsageError(f"--grace: expected seconds between 0 and {MAX_GRACE_S:g}")
    base_timeout = _timeout(timeout)
    if parsed.job is not None:
        if create_time is not None:
            raise UsageError("--create-time is for one process (node:pid), not a job")
        plan = JobZap(parsed.job, sig.name.removeprefix("SIG"), grace, aggregator, base_timeout)
        sys.exit(plan.run(dry_run=dry_run, yes=yes, output=output))
    if parsed.pid is None:
        raise UsageError("zap takes node:pid, pid or job:ID")
    want: dict[str, Any] = {"node": parsed.node, "pid": parsed.pid}
    if create_time is not None:
        want["create_time"] = create_time

    preview: dict[str, Any] | None
    try:
        with make_client(aggregator, base_timeout) as client:
            preview = client.request("zap", {"target": want, "dry_run": True})
    except NotFoundError:
        if create_time is None or dry_run:
            raise
        preview = None

    shown = render.console(stderr=output == "json")
    if preview is not None:
        if output == "json" and dry_run:
            render.print_json(preview)
            return
        render_preview(shown, preview)
    else:
        shown.print(
            f"{parsed}: not a process the aggregator knows; the agent resolves its tree when it executes",
            markup=False,
        )
    if dry_run:
        return

    tgt = (preview or {}).get("target") or {}
    node_name = str(tgt.get("node") or parsed.node or "")
    ctime = create_time if create_time is not None else tgt.get("create_time")
    if ctime is None:
        raise UsageError(
            f"the aggregator does not know when {node_name}:{parsed.pid} started, and a zap needs the create time "
            "(so a reused pid is never killed): pass --create-time"
        )
    if preview is not None and preview.get("create_time_matches") is False:
        shown.print(
            "warning: --create-time differs from the start time the aggregator knows; the agent checks it",
            style="yellow",
        )
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("stdin is not a terminal: pass --yes to zap without confirmation (nothing was done)")
        count = len((preview or {}).get("tree") or [])
        what = f"{count} process{'es' if count != 1 else ''}" if count else "the process tree"
        question = f"zap {what} of {node_name}:{parsed.pid} with {sig.name}, SIGKILL after {grace:g}s?"
        if not click.confirm(question):
            shown.print("nothing was done")
            sys.exit(1)

    result = execute(aggregator, base_timeout, node_name, parsed.pid, float(ctime), sig.name.removeprefix("SIG"), grace)
    if output == "json":
        render.print_json(result)
    else:
        render_result(render.console(), result)
    sys.exit(0 if result.get("ok") else 1)


def _timeout(flag: float | None) -> float:
    try:
        return float(config.resolve("timeout", flag, config.DEFAULT_TIMEOUT_S))
    except ValueError as exc:
        raise UsageError(f"timeout must be a number of seconds: {exc}") from exc


# ------------------------------------------------------------------------------ rendering


def _mib(value: Any) -> str:
    return f"{value:,.0f} MiB" if isinstance(value, int | float) else "?"


def render_preview(con: Console, data: Mapping[str, Any]) -> None:
    tree = data.get("tree") or []
    tgt = data.get("target") or {}
    gpu_total = data.get("gpu_mem_mib") or 0
    job = f", job {tgt['job']}" if tgt.get("job") else ""
    others = len(tree) - 1
    tail = f" and {others} descendant{'s' if others != 1 else ''}" if others else ""
    gpu = f", {_mib(gpu_total)} of GPU memory" if gpu_total else ""
    con.print(
        f"{data.get('node')}:{tgt.get('pid')} {tgt.get('name')}{job}{tail}: "
        f"{len(tree)} process{'es' if len(tree) != 1 else ''}{gpu}",
        markup=False,
    )
    if not tgt.get("alive", True):
        con.print(f"  the aggregator saw it end ({tgt.get('state')}): the agent will check", markup=False)
    if data.get("node_state") != "alive" or not data.get("connected", True):
        con.print(
            f"  node {data.get('node')} is {data.get('node_state')}"
            + ("" if data.get("connected", True) else ", not connected"),
            style="yellow",
            markup=False,
        )
    table = render.simple_table(["PID", "PPID", "NAME", "STATE", "GPU MEMORY"])
    for row in tree:
        gpus = ", ".join(f"{g['gpu']} {_mib(g.get('mem_used_mib'))}" for g in row.get("gpus") or []) or "-"
        table.add_row(
            str(row["pid"]),
            str(row.get("ppid") if row.get("ppid") is not None else "-"),
            "  " * int(row.get("depth") or 0) + str(row.get("name")),
            str(row.get("state")),
            gpus,
        )
    con.print(table)


def render_result(con: Console, data: Mapping[str, Any]) -> None:
    tgt = data.get("target") or {}
    outcome = str(data.get("outcome"))
    took = data.get("elapsed_ms")
    took_text = f" in {took / 1000:.2f}s" if isinstance(took, int | float) else ""
    style = "green" if data.get("ok") else "bold red"
    head = Text(f"zap {str(data.get('command_id'))[:8]} {data.get('node')}:{tgt.get('pid')}: ")
    head.append(outcome, style=style)
    head.append(f"{took_text} (SIG{str(data.get('signal', 'TERM')).removeprefix('SIG')}, grace {data.get('grace_s')}s)")
    con.print(head)
    tree = data.get("tree") or []
    if tree:
        table = render.simple_table(["PID", "NAME", "OUTCOME", "DETAIL"])
        for row in tree:
            out = str(row.get("outcome"))
            detail = row.get("detail") or row.get("reason") or ""
            if out == "killed" and not detail:
                detail = f"SIGKILL after the {data.get('grace_s')}s grace period"
            if row.get("gpu_mem_held"):
                detail = (detail + "; " if detail else "") + "still holds GPU memory"
            table.add_row(
                str(row["pid"]), str(row.get("name") or "?"), Text(_OUTCOME_LABEL.get(out, out),
                style=_OUTCOME_STYLE.get(out, "")), str(detail)
            )
        con.print(table)
    gpu = data.get("gpu") or {}
    if gpu.get("gpus") or gpu.get("released") is not None:
        held = ", ".join(f"{g['gpu']} {_mib(g.get('mem_used_mib'))} (pid {g['pid']})" for g in gpu.get("gpus") or [])
        con.print(f"GPU: {gpu.get('detail')}" + (f"; it held {held}" if held else ""), markup=False)
    if data.get("ok"):
        gone = sum(1 for r in tree if r.get("outcome") in ("terminated", "killed", "already_gone"))
        if outcome == "ALREADY_GONE":
            con.print("the process had already ended: nothing to do", markup=False)
        else:
            con.print(f"all {gone} process{'es' if gone != 1 else ''} gone", style="green", markup=False)
    else:
        con.print(str(data.get("reason") or "not everything is gone"), style="bold red", markup=False)
