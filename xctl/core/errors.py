"""The one exception hierarchy of xctl.

Every layer raises one of these (translating foreign exceptions with ``raise ... from``),
so callers at a boundary (the CLI, a query handler) can map them to exit codes and
error replies without knowing which library failed underneath.
"""

from __future__ import annotations


class XctlError(Exception):
    """Base of every error xctl raises on purpose."""

    #: Stable machine-readable code, used in query error replies and JSON output.
    code = "ERROR"
    #: CLI exit code (DESIGN §7): 1 = the operation failed.
    exit_code = 1


class UsageError(XctlError):
    """The caller asked for something malformed (exit 2)."""

    code = "BAD_REQUEST"
    exit_code = 2


class EventError(UsageError):
    """A probe line or wire event that does not follow the event format.

    ``field`` names the offending field (or ``line`` for the whole line) so the
    message can say exactly what was expected: ``pid: expected integer, got "abc"``.
    """

    code = "BAD_EVENT"

    def __init__(self, field: str, expected: str, got: object = None, *, detail: str | None = None) -> None:
        self.field = field
        self.expected = expected
        self.got = got
        if detail is not None:
            message = f"{field}: {detail}"
        else:
            message = f"{field}: expected {expected}, got {_show(got)}"
        super().__init__(message)


class TargetError(UsageError):
    """A target string (``node:pid``, ``pid``, ``job:ID``) that cannot be parsed."""

    code = "BAD_TARGET"


class NotFoundError(XctlError):
    """The target, node or job does not exist in the cluster view (exit 4)."""

    code = "NOT_FOUND"
    exit_code = 4


class UnreachableError(XctlError):
    """The aggregator did not answer in time (exit 3)."""

    code = "UNREACHABLE"
    exit_code = 3


class NotAuthorisedError(XctlError):
    """The aggregator refused our key or role (exit 5)."""

    code = "NOT_AUTHORISED"
    exit_code = 5


class ProtocolError(XctlError):
    """A message that is not valid xctl wire protocol (bad frame, schema, version)."""

    code = "PROTOCOL"

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class ProbeError(XctlError):
    """A probe could not be configured or started."""

    code = "PROBE"


class RuleError(XctlError):
    """A rule file that does not follow the rule schema."""

    code = "BAD_RULE"


class ConfigError(UsageError):
    """A configuration value that cannot be used."""

    code = "BAD_CONFIG"


def _show(value: object) -> str:
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f'"{shown}"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return type(value).__name__
