"""Text rendering of query results: compact, aligned tables like `docker ps`.

Colour only on a TTY; rich honours NO_COLOR. JSON output bypasses this module entirely.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

_VERDICT_STYLE = {
    "blocked": "bold red",
    "exited": "red",
    "waiting": "yellow",
    "degraded": "yellow",
    "running": "green",
    "unknown": "dim",
}
_NODE_STYLE = {"alive": "green", "suspect": "yellow", "dead": "bold red"}


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def simple_table(columns: Sequence[str]) -> Table:
    """A borderless table with bold headers: every listing the CLI prints."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 2, 0, 0))
    for col in columns:
        table.add_column(col, no_wrap=True, overflow="ellipsis")
    return table


def _s(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}"
    return str(value)


def _styled(value: str, styles: Mapping[str, str]) -> Text:
    return Text(value, style=styles.get(value, ""))


def render_ps(con: Console, data: Mapping[str, Any], *, wide: bool = False) -> None:
    items = data.get("items", [])
    if not items:
        con.print("no processes")
        return
    cols = ["NODE", "PID", "NAME", "JOB", "RANK", "STATE", "GPU", "UTIL%", "MEM(MiB)", "VERDICT"]
    if wide:
        cols += ["STARTED", "CMDLINE"]
    table = simple_table(cols)
    for row in items:
        gpus = row.get("gpus") or []
        gpu = ",".join(g["gpu"] for g in gpus) or "-"
        util = ",".join(_s(g.get("util")) for g in gpus) or "-"
        mem = ",".join(_s(g.get("mem_used_mib")) for g in gpus) or "-"
        cells: list[Any] = [
            row["node"],
            str(row["pid"]),
            _s(row.get("name")),
            _s(row.get("job")),
            _s(row.get("rank")),
            _s(row.get("state")),
            gpu,
            util,
            mem,
            _styled(_s(row.get("verdict")), _VERDICT_STYLE),
        ]
        if wide:
            ctime = row.get("create_time")
            started = datetime.fromtimestamp(ctime, tz=UTC).strftime("%H:%M:%S") if ctime else "-"
            cells += [started, _s(row.get("cmdline"))]
        table.add_row(*cells)
    con.print(table)


def render_nodes(con: Console, data: Mapping[str, Any]) -> None:
    items = data.get("items", [])
    if not items:
        con.print("no nodes have reported yet")
        return
    table = simple_table(["NODE", "STATE", "LAST SEEN", "EPOCH", "EVENTS", "RESYNCS", "PROCS", "ERRORS", "PROBES"])
    for row in items:
        probes = " ".join(
            f"{p['name']}" + ("" if p.get("state") == "running" else f"({p.get('state')})")
            for p in row.get("probes", [])
        )
        table.add_row(
            row["node"],
            _styled(row["state"], _NODE_STYLE),
            row["last_seen"][11:19],
            _s(row.get("epoch"))[:14],
            str(row.get("events", 0)),
            str(row.get("resyncs", 0)),
            str(row.get("processes", 0)),
            str(row.get("errors", 0)),
            probes or "-",
        )
    con.print(table)


def render_jobs(con: Console, data: Mapping[str, Any]) -> None:
    items = data.get("items", [])
    if not items:
        con.print("no jobs")
        return
    table = simple_table(["JOB", "RANKS", "WORLD", "NODES", "STATE"])
    for row in items:
        nodes = row.get("nodes", [])
        shown = ",".join(nodes[:4]) + (f",+{len(nodes) - 4}" if len(nodes) > 4 else "")
        table.add_row(
            row["job"], str(row["ranks"]), _s(row.get("world_size")), shown, _styled(row["state"], _VERDICT_STYLE)
        )
    con.print(table)


def event_line(item: Mapping[str, Any]) -> str:
    ts = datetime.fromtimestamp(item["ts"] / 1000, tz=UTC).strftime("%H:%M:%S.%f")[:-3]
    pid = f" pid={item['pid']}" if item.get("pid") is not None else ""
    job = f" job={item['job']}" if item.get("job") else ""
    return f"{ts}  {item['node']:<12} {item['type']:<15} {item['entity']:<16} {item['value']}{pid}{job}"


def render_events(con: Console, items: Iterable[Mapping[str, Any]]) -> None:
    for item in items:
        con.print(event_line(item), markup=False)


def render_why(con: Console, data: Mapping[str, Any]) -> None:
    target = data["target"]
    verdict = data["verdict"]
    if target.get("pid") is None:
        label = f"job:{target.get('job')}"
    else:
        label = f"{target['node']}:{target['pid']} {target.get('name') or '?'}"
        if target.get("job"):
            label += f" ({target['job']}" + (f" rank {target['rank']})" if target.get("rank") is not None else ")")
    head = Text(label + "  ")
    head.append(verdict.upper(), style=_VERDICT_STYLE.get(verdict, ""))
    con.print(head)
    root = data.get("root_cause")
    if root is None:
        con.print("root cause: none found" + (" — nothing looks wrong" if verdict == "running" else ""))
    else:
        where = f"{root['node']}/{root['entity']}" + (f" pid {root['pid']}" if root.get("pid") is not None else "")
        line = Text("root cause: ")
        line.append(f"{where} {root['code']}", style="bold")
        line.append(f" [{root['kind']}] since {root['first_seen'][11:23]}")
        con.print(line)
        con.print(f"  {root['summary']}", markup=False)
    rule = data.get("rule")
    if rule:
        con.print(f"action: {rule['action']} (rule {rule['id']}, severity {rule['severity']})", markup=False)
        for step in rule.get("steps", []):
            con.print(f"  - {step}", markup=False)
    chain = data.get("chain") or []
    if chain:
        con.print("chain:")
        for step in chain:
            ev = step["evidence"][-1] if step.get("evidence") else None
            when = ""
            if ev is not None:
                when = f"  {ev['value']} @" + datetime.fromtimestamp(ev["ts"] / 1000, tz=UTC).strftime("%H:%M:%S")
            dst = f" {step['to']}" if step.get("to") else ""
            con.print(f"  {step['from']} ─{step['edge']}→{dst}{when}", markup=False)
    alternatives = data.get("alternatives") or []
    if alternatives:
        con.print(
            "alternatives: " + "; ".join(f"{a['node']}/{a['entity']} {a['code']}" for a in alternatives[:3]),
            markup=False,
        )
    symptoms = data.get("symptoms") or []
    if symptoms:
        con.print("not blamed:")
        for s in symptoms[:8]:
            con.print(f"  {s['code']} on {s['node']}/{s['entity']}: {s['reason']}", markup=False, style="dim")


def render_rules(con: Console, items: Sequence[Mapping[str, Any]]) -> None:
    table = simple_table(["ID", "SCENE", "SEVERITY", "ACTION", "SOURCE"])
    for row in items:
        table.add_row(row["id"], row["scene"], row["severity"], row["action"], str(row["source"]))
    con.print(table)
