"""Sending one zap command and waiting for its result (shared by `zap node:pid` and `zap job:ID`)."""

from __future__ import annotations

import getpass
import os
import socket
import uuid
from typing import Any, Final

from xctl.aggregator.commands import DEADLINE_MARGIN_S
from xctl.cli.common import make_client

#: The CLI waits this much longer than the command's deadline (the aggregator's TIMEOUT reply).
CLIENT_MARGIN_S: Final = 3.0


def execute(
    aggregator: str | None, base_timeout: float, node: str, pid: int, create_time: float, signal: str, grace: float
) -> dict[str, Any]:
    """Send one zap (a fresh command id: the idempotency key) and wait for its result."""
    deadline_s = grace + DEADLINE_MARGIN_S
    args = {
        "command_id": uuid.uuid4().hex,
        "target": {"node": node, "pid": pid, "create_time": create_time},
        "signal": signal,
        "grace_s": grace,
        "deadline_s": deadline_s,
        "requested_by": requester(),
    }
    with make_client(aggregator, max(base_timeout, deadline_s + CLIENT_MARGIN_S)) as client:
        result: dict[str, Any] = client.request("zap", args)
    return result


def requester() -> str:
    """Who asks, for the audit logs: user@host (authenticated identities come with CURVE keys)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname().split('.')[0]}"
