"""Shared CLI plumbing: error → exit-code translation, client options, the query client."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from xctl.cli import config, render
from xctl.core.errors import UsageError, XctlError
from xctl.wire.client import QueryClient
from xctl.wire.curve import ClientKeys, load_client_keys
from xctl.wire.sockets import endpoints, parse_address

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


def fail(exc: XctlError) -> None:
    render.console(stderr=True).print(f"xctl: error: {exc}", markup=False, style="red")
    sys.exit(exc.exit_code)


def guarded(fn: F) -> F:
    """Turn xctl errors into a one-line message and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except XctlError as exc:
            fail(exc)
        except KeyboardInterrupt:
            sys.exit(130)
        return None

    return wrapper  # type: ignore[return-value]


def client_options(fn: F) -> F:
    fn = click.option(
        "--aggregator",
        "aggregator",
        metavar="HOST[:P]",
        default=None,
        help="aggregator address (env XCTL_AGGREGATOR; default 127.0.0.1:7400)",
    )(fn)
    fn = click.option(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up after this long (env XCTL_TIMEOUT; default 5)",
    )(fn)
    return click.option("--keys", "keys", default=None, metavar="DIR", help="CURVE keys directory (env XCTL_KEYS)")(fn)


def client_keys(keys: str | None = None) -> ClientKeys | None:
    """The CLI's CURVE keys: ``--keys`` of the running command (``keys``, else the current click
    command's ``--keys``), then XCTL_KEYS, then the config file; None: plaintext."""
    if keys is None:
        ctx = click.get_current_context(silent=True)
        while ctx is not None and keys is None:
            keys = ctx.params.get("keys")
            ctx = ctx.parent
    where = config.resolve("keys", keys, None)
    if not where:
        return None
    found = load_client_keys(str(where))
    if found is None:
        log.warning("--keys %s holds no key files: querying the aggregator in plaintext", where)
    return found


def make_client(aggregator: str | None, timeout: float | None, keys: str | None = None) -> QueryClient:
    host, port = parse_address(str(config.resolve("aggregator", aggregator, config.DEFAULT_AGGREGATOR)))
    try:
        timeout_s = float(config.resolve("timeout", timeout, config.DEFAULT_TIMEOUT_S))
    except ValueError as exc:
        raise UsageError(f"timeout must be a number of seconds: {exc}") from exc
    return QueryClient(endpoints(host, port).query, timeout_s=timeout_s, keys=client_keys(keys))


def query(aggregator: str | None, timeout: float | None, op: str, args: dict[str, Any] | None = None) -> Any:
    with make_client(aggregator, timeout) as client:
        return client.request(op, args or {})
