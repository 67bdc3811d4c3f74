"""`xctl` — the command line (DESIGN §7).

Exit codes: 0 success; 1 the operation failed; 2 usage error; 3 aggregator unreachable;
4 target not found; 5 not authorised.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import click

from xctl import __version__
from xctl.cli import daemons, render
from xctl.cli.common import client_options, guarded, make_client, query
from xctl.cli.diag import diag
from xctl.cli.keys import keys_group
from xctl.cli.rules import rules_group
from xctl.cli.zap import zap
from xctl.core.errors import UsageError, XctlError
from xctl.core.targets import parse_target
from xctl.probes._spec import parse_duration

output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "wide", "json"]),
    default="table",
    show_default=True,
    help="output format",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="xctl")
@click.option(
    "--log-level",
    default="warning",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="log verbosity (to stderr)",
)
def main(log_level: str) -> None:
    """Why is this GPU process stuck, slow or dead — and what to do about it."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


@main.command()
@click.option("--node", default=None, help="only this node")
@click.option("--job", default=None, help="only this job")
@output_option
@client_options
@guarded
def ps(
    node: str | None, job: str | None, output: str, aggregator: str | None, timeout: float | None, keys: str | None
) -> None:
    """Every GPU process on every node, with job, rank and verdict."""
    data = query(aggregator, timeout, "ps", {"node": node, "job": job})
    if output == "json":
        render.print_json(data)
    else:
        render.render_ps(render.console(), data, wide=output == "wide")


@main.command()
@click.argument("target")
@click.option("--node", default=None, help="node for a bare pid target")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@client_options
@guarded
def why(
    target: str, node: str | None, output: str, aggregator: str | None, timeout: float | None, keys: str | None
) -> None:
    """The causal chain to the root cause of TARGET (node:pid, pid or job:ID)."""
    parse_target(target, default_node=node)  # a malformed target is a usage error before any network
    data = query(aggregator, timeout, "why", {"target": target, "node": node})
    if output == "json":
        render.print_json(data)
    else:
        render.render_why(render.console(), data)


@main.command()
@output_option
@client_options
@guarded
def nodes(output: str, aggregator: str | None, timeout: float | None, keys: str | None) -> None:
    """Nodes, their liveness and their probes."""
    data = query(aggregator, timeout, "nodes")
    if output == "json":
        render.print_json(data)
    else:
        render.render_nodes(render.console(), data)


@main.command()
@output_option
@client_options
@guarded
def jobs(output: str, aggregator: str | None, timeout: float | None, keys: str | None) -> None:
    """Jobs seen across the cluster, with ranks and state."""
    data = query(aggregator, timeout, "jobs")
    if output == "json":
        render.print_json(data)
    else:
        render.render_jobs(render.console(), data)


@main.command()
@click.option("-f", "--follow", is_flag=True, help="keep printing new events until Ctrl-C")
@click.option("--node", default=None)
@click.option("--type", "etype", default=None, help="event type or prefix (e.g. error)")
@click.option("--entity", default=None)
@click.option("--since", default=None, metavar="DURATION", help="only events newer than this (e.g. 5m)")
@click.option("--limit", type=int, default=200, show_default=True)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@client_options
@guarded
def events(
    follow: bool,
    node: str | None,
    etype: str | None,
    entity: str | None,
    since: str | None,
    limit: int,
    output: str,
    aggregator: str | None,
    timeout: float | None,
    keys: str | None,
) -> None:
    """Recent events held by the aggregator."""
    args: dict[str, Any] = {"node": node, "type": etype, "entity": entity, "limit": limit}
    if since is not None:
        try:
            args["since_ms"] = int((time.time() - parse_duration(since, what="--since")) * 1000)
        except XctlError as exc:
            raise UsageError(str(exc)) from exc
    with make_client(aggregator, timeout) as client:
        data = client.request("events", args)
        if output == "json" and not follow:
            render.print_json(data)
            return
        _print_events(data["items"], output)
        while follow:
            time.sleep(0.5)  # polling cadence of -f, not synchronisation
            data = client.request("events", {**args, "after": data["cursor"]})
            _print_events(data["items"], output)


def _print_events(items: list[dict[str, Any]], output: str) -> None:
    """Text lines, or JSON lines when following (one object per event)."""
    if output == "json":
        sys.stdout.writelines(json.dumps(item, separators=(",", ":")) + "\n" for item in items)
        sys.stdout.flush()
    else:
        render.render_events(render.console(), items)


for _command in daemons.COMMANDS:
    main.add_command(_command)
main.add_command(diag)
main.add_command(zap)
main.add_command(rules_group)
main.add_command(keys_group)


if __name__ == "__main__":  # pragma: no cover
    main()
