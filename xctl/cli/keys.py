"""`xctl keys new | server | list` — CURVE key pairs and the aggregator's allow-lists (issue 10).

Layout (see :mod:`xctl.wire.curve` and docs/security.md):

- the aggregator's directory: ``server.key`` + ``server.key_secret``, and the allow-lists
  ``agents/``, ``operators/``, ``admins/`` holding public certificates (``NAME.key``);
- an agent's or a user's directory: its own ``NAME.key`` + ``NAME.key_secret`` and
  ``server.key`` (the aggregator's public certificate).

``xctl keys new --register AGGDIR`` does the copying for the usual case where one admin holds
the aggregator's directory: the new public certificate goes into ``AGGDIR/<role>s/`` and
``AGGDIR/server.key`` next to the new pair.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from xctl.cli import config, render
from xctl.cli.common import guarded
from xctl.core.errors import ConfigError, UsageError
from xctl.core.why import API_VERSION
from xctl.wire.curve import (
    ROLE_DIRS,
    SERVER,
    SERVER_PUBLIC,
    SERVER_SECRET,
    check_name,
    read_certificate,
    write_key_pair,
)

ROLE_CHOICES = click.Choice([*ROLE_DIRS, SERVER])


def _default_dir(directory: str | None) -> Path:
    return Path(str(config.resolve("keys", directory, ".")))


@click.group("keys")
def keys_group() -> None:
    """CURVE keys: make key pairs, list them and the aggregator's allow-lists."""


@keys_group.command("new")
@click.option("--role", type=ROLE_CHOICES, required=True, help="agent (one per node), operator (queries), admin (+zap)")
@click.option("--name", default=None, help="the node name for an agent; a user name for operators and admins")
@click.option(
    "--register",
    "register",
    default=None,
    metavar="AGGDIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="also list the new public key in the aggregator's directory AGGDIR (AGGDIR/<role>s/) and copy "
    "AGGDIR/server.key next to the new pair",
)
@click.argument("directory", required=False)
@guarded
def new(role: str, name: str | None, register: Path | None, directory: str | None) -> None:
    """Write a key pair NAME.key / NAME.key_secret into DIRECTORY (default: XCTL_KEYS, else .)."""
    out = _default_dir(directory)
    if role == SERVER:
        _server(out)
        return
    if not name:
        raise UsageError(f"--name is required for --role {role} (the node name of an agent, a user name otherwise)")
    check_name(name)
    if register is not None and not (register / SERVER_PUBLIC).exists():
        raise UsageError(f"--register {register}: no {SERVER_PUBLIC} there (make it with: xctl keys server {register})")
    public, secret = write_key_pair(out, name, role)
    con = render.console(stderr=True)
    con.print(f"wrote {secret} (keep it secret: it is the {role} key of {name}) and {public}", markup=False)
    if register is not None:
        allow = register / ROLE_DIRS[role]
        allow.mkdir(mode=0o755, parents=True, exist_ok=True)
        listed = allow / public.name
        if listed.exists():
            raise UsageError(f"{listed} exists: remove it first (another key has that name)")
        shutil.copyfile(public, listed)
        server = out / SERVER_PUBLIC
        if not server.exists():
            shutil.copyfile(register / SERVER_PUBLIC, server)
        con.print(f"listed it as {listed}; copied {server}; reload the aggregator (SIGHUP) to accept it", markup=False)
    else:
        con.print(
            f"next: copy {public} into the aggregator's {ROLE_DIRS[role]}/ and send it SIGHUP; put the aggregator's "
            f"{SERVER_PUBLIC} into {out}",
            markup=False,
        )


@keys_group.command("server")
@click.argument("directory", required=False)
@guarded
def server(directory: str | None) -> None:
    """Write the aggregator's key pair (server.key, server.key_secret) and empty allow-lists
    agents/, operators/, admins/ into DIRECTORY (default: XCTL_KEYS, else .)."""
    _server(_default_dir(directory))


def _server(out: Path) -> None:
    public, secret = write_key_pair(out, SERVER, SERVER)
    for sub in ROLE_DIRS.values():
        (out / sub).mkdir(mode=0o755, exist_ok=True)
    con = render.console(stderr=True)
    con.print(f"wrote {secret} (the aggregator's secret) and {public}; allow-lists: agents/ operators/ admins/",
              markup=False)
    con.print(f"give {public} to every agent and user (their --keys DIR holds it as {SERVER_PUBLIC})", markup=False)


def key_items(directory: Path) -> list[dict[str, Any]]:
    """Every certificate in ``directory``: own pairs, server.key, and the allow-lists' entries."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such directory")
    items: list[dict[str, Any]] = []

    def add(path: Path, kind: str, listed_as: str | None = None) -> None:
        try:
            cert = read_certificate(path)
        except ConfigError as exc:
            items.append({"kind": "unreadable", "path": str(path), "role": None, "name": None,
                          "public_key": None, "secret": False, "problem": str(exc)})
            return
        role = listed_as or cert.role
        problem = None
        if listed_as is not None and cert.role is not None and cert.role != listed_as:
            problem = f"made for role {cert.role}, listed as {listed_as}"
        if listed_as is not None and cert.secret_key is not None:
            problem = "an allow-list entry holds a secret key"
        items.append({
            "kind": kind,
            "path": str(path),
            "role": role,
            "name": cert.name,
            "public_key": cert.public_key,
            "secret": cert.secret_key is not None,
            "problem": problem,
        })

    secrets = sorted(directory.glob("*.key_secret"))
    for path in secrets:
        add(path, "server_pair" if path.name == SERVER_SECRET else "key_pair")
    paired = {p.name.removesuffix("_secret") for p in secrets}
    for path in sorted(directory.glob("*.key")):
        if path.name in paired and path.name != SERVER_PUBLIC:
            continue
        if path.name == SERVER_PUBLIC:
            if SERVER_SECRET in {p.name for p in secrets}:
                continue
            add(path, "server_key")
        else:
            add(path, "public")
    for role, sub in ROLE_DIRS.items():
        for path in sorted((directory / sub).glob("*.key")) if (directory / sub).is_dir() else []:
            add(path, "allowed", listed_as=role)
    return items


@keys_group.command("list")
@click.argument("directory", required=False)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@guarded
def list_keys(directory: str | None, output: str) -> None:
    """The keys in DIRECTORY (default: XCTL_KEYS, else .): key pairs, the server key, allow-lists."""
    where = _default_dir(directory)
    items = key_items(where)
    if output == "json":
        render.print_json({"apiVersion": API_VERSION, "kind": "KeyList", "directory": str(where), "items": items})
        return
    con = render.console()
    if not items:
        con.print(f"no keys in {where} (xctl keys server DIR, xctl keys new --role ROLE --name NAME DIR)", markup=False)
        return
    labels = {"server_pair": "server pair", "key_pair": "key pair", "server_key": "server key",
              "public": "public", "allowed": "allowed", "unreadable": "unreadable"}
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 2, 0, 0))
    for column in ("KIND", "ROLE", "NAME", "PUBLIC KEY", "FILE", "PROBLEM"):
        table.add_column(column, no_wrap=column != "PROBLEM")
    for item in items:
        table.add_row(
            labels.get(item["kind"], item["kind"]),
            str(item["role"] or "-"),
            str(item["name"] or "-"),
            str(item["public_key"] or "-"),
            str(Path(item["path"]).relative_to(where)),
            str(item["problem"] or ""),
        )
    con.print(table)
