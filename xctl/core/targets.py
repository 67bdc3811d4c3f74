"""Targets of `why`, `zap` and `diag`: ``node:pid``, a bare ``pid``, or ``job:ID``."""

from __future__ import annotations

from dataclasses import dataclass

from xctl.core.errors import TargetError


@dataclass(frozen=True, slots=True)
class Target:
    node: str | None = None
    pid: int | None = None
    job: str | None = None

    def __str__(self) -> str:
        if self.job is not None:
            return f"job:{self.job}"
        return f"{self.node}:{self.pid}" if self.node else str(self.pid)


def parse_target(text: str, *, default_node: str | None = None) -> Target:
    """Parse a target string; raises :class:`TargetError` with a message a user can act on."""
    raw = text.strip()
    if not raw:
        raise TargetError("empty target: use node:pid, pid or job:ID")
    if raw.startswith("job:"):
        job = raw[4:]
        if not job:
            raise TargetError(f"{text!r}: job id is empty (use job:ID)")
        return Target(job=job)
    node, sep, pid_text = raw.rpartition(":")
    if not sep:
        node, pid_text = "", raw
    elif not node:
        raise TargetError(f"{text!r}: node name is empty (use node:pid)")
    if not pid_text.isdigit() or not pid_text.isascii():
        raise TargetError(f"{text!r}: pid must be a number (use node:pid, pid or job:ID)")
    pid = int(pid_text)
    if not 0 < pid < 2**31:
        raise TargetError(f"{text!r}: pid {pid} is out of range")
    return Target(node=node or default_node, pid=pid)
