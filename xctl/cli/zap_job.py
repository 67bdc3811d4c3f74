"""`xctl zap job:ID` — end every process tree of a job, on every node, with one command.

The job's live processes come from the aggregator (``ps`` for the job). Those whose parent is
not itself in the job on the same node are the roots (the ranks: a rank's dataloader workers
inherit its job and end with its tree); each root is zapped as ``xctl zap node:pid`` would,
with its create time, so a reused pid is never hit. The commands run in parallel (each with
its own client and command id, each audited by the aggregator and the agent).

Confirmation is stronger than for one process: on a terminal the job id must be typed back;
elsewhere ``--yes`` is required. Exit 0 only when every tree of the job is gone.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import click
from rich.console import Console
from rich.text import Text

from xctl.cli import render
from xctl.cli.common import make_client
from xctl.cli.zap_exec import execute
from xctl.core.errors import NotFoundError, UsageError, XctlError
from xctl.core.why import API_VERSION

#: Commands in flight at once (each a REQ socket and a deferred reply at the aggregator).
MAX_PARALLEL: Final = 16


def job_roots(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The processes whose parent is not in the job on the same node, ordered by node and rank."""
    members = {(r["node"], r["pid"]) for r in rows}
    roots = [r for r in rows if (r["node"], r.get("ppid")) not in members]
    return sorted(roots, key=lambda r: (str(r["node"]), r.get("rank") is None, r.get("rank") or 0, r["pid"]))


class JobZap:
    def __init__(self, job: str, signal: str, grace: float, aggregator: str | None, timeout: float) -> None:
        self.job = job
        self.signal = signal
        self.grace = grace
        self.aggregator = aggregator
        self.timeout = timeout

    def run(self, *, dry_run: bool, yes: bool, output: str) -> int:
        with make_client(self.aggregator, self.timeout) as client:
            rows = client.request("ps", {"job": self.job, "all": False})["items"]
        if not rows:
            raise NotFoundError(f"job {self.job}: no live process of it is known (see `xctl jobs`)")
        roots = job_roots(rows)
        shown = render.console(stderr=output == "json")
        if dry_run and output == "json":
            render.print_json(self._preview(rows, roots))
            return 0
        render_job_preview(shown, self.job, rows, roots)
        if dry_run:
            return 0
        unknown = [r for r in roots if r.get("create_time") is None]
        if unknown:
            names = ", ".join(f"{r['node']}:{r['pid']}" for r in unknown[:5])
            raise UsageError(
                f"the aggregator does not know when {names} started: zap them one by one with --create-time"
            )
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError(
                    "stdin is not a terminal: pass --yes to zap a job without confirmation (nothing was done)"
                )
            typed = click.prompt(f"type the job id ({self.job}) to zap {len(roots)} process trees", default="")
            if typed != self.job:
                shown.print("nothing was done")
                return 1
        results = self._execute(roots)
        ok = all(r.get("ok") for r in results)
        if output == "json":
            render.print_json(
                {"apiVersion": API_VERSION, "kind": "ZapJobResult", "job": self.job, "ok": ok, "results": results}
            )
        else:
            render_job_result(render.console(), self.job, results)
        return 0 if ok else 1

    def _preview(self, rows: Sequence[Mapping[str, Any]], roots: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": "ZapJobPreview",
            "job": self.job,
            "nodes": sorted({str(r["node"]) for r in rows}),
            "processes": len(rows),
            "roots": [{k: r.get(k) for k in ("node", "pid", "rank", "name", "state", "create_time")} for r in roots],
        }

    def _execute(self, roots: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        def one(root: Mapping[str, Any]) -> dict[str, Any]:
            node, pid = str(root["node"]), int(root["pid"])
            try:
                return execute(
                    self.aggregator, self.timeout, node, pid, float(root["create_time"]), self.signal, self.grace
                )
            except XctlError as exc:  # one node's refusal or silence must not hide the others' results
                return {
                    "kind": "ZapResult",
                    "node": node,
                    "target": {"node": node, "pid": pid},
                    "ok": False,
                    "outcome": exc.code,
                    "reason": str(exc),
                }

        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(roots))) as pool:
            return list(pool.map(one, roots))


def render_job_preview(
    con: Console, job: str, rows: Sequence[Mapping[str, Any]], roots: Sequence[Mapping[str, Any]]
) -> None:
    nodes = sorted({str(r["node"]) for r in rows})
    con.print(
        f"job {job}: {len(roots)} process tree{'s' if len(roots) != 1 else ''} ({len(rows)} processes) "
        f"on {len(nodes)} node{'s' if len(nodes) != 1 else ''}",
        markup=False,
    )
    table = render.simple_table(["NODE", "PID", "RANK", "NAME", "STATE", "GPUS"])
    for r in roots:
        gpus = ", ".join(str(g["gpu"]) for g in r.get("gpus") or []) or "-"
        rank = "-" if r.get("rank") is None else str(r["rank"])
        table.add_row(str(r["node"]), str(r["pid"]), rank, str(r.get("name")), str(r.get("state")), gpus)
    con.print(table)


def render_job_result(con: Console, job: str, results: Sequence[Mapping[str, Any]]) -> None:
    table = render.simple_table(["NODE", "PID", "OUTCOME", "PROCESSES", "DETAIL"])
    for r in results:
        tgt = r.get("target") or {}
        style = "green" if r.get("ok") else "bold red"
        tree = r.get("tree") or []
        detail = "" if r.get("ok") else str(r.get("reason") or "")
        table.add_row(
            str(r.get("node")), str(tgt.get("pid")), Text(str(r.get("outcome")), style=style), str(len(tree)), detail
        )
    con.print(table)
    failed = [r for r in results if not r.get("ok")]
    if failed:
        con.print(f"job {job}: {len(failed)} of {len(results)} trees not fully gone", style="bold red", markup=False)
    else:
        con.print(f"job {job}: all {len(results)} trees gone", style="green", markup=False)
