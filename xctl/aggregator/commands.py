"""Command routing on the aggregator: the ``zap`` query op (DESIGN §6 "Commands", issue 7).

``zap`` with ``dry_run`` answers at once with the tree the aggregator knows from the node's
graph (pids, names, states, GPU memory held) — a preview; the agent is authoritative when it
executes. Otherwise the command goes to the agent of that node over the control ROUTER and
the query is answered **later** (the handler returns :class:`Deferred`; the server keeps the
REQ envelope): when the agent's result arrives, or with ``outcome: TIMEOUT`` when the deadline
passes first. The ack is tracked and reported (``acked``), so a TIMEOUT says whether the agent
ever received the command.

A repeated command id (the CLI's idempotency key; its Lazy Pirate retries reuse it) is
answered with the first answer from a bounded cache, or joins the wait for it while it runs;
it is never sent twice. Every command and outcome is appended to the audit log (JSON lines):
one ``command`` line when it is sent, one ``outcome`` line when it ends (result, TIMEOUT, a
refusal here), and ``late_result`` when an agent answers after the TIMEOUT was reported — the
kill may still have happened, and the record must say so.

Authorisation: with CURVE (:attr:`CommandRouter.secure`) the server sets
:attr:`CommandRouter.requester` to the authenticated identity of the query being handled; a
zap (other than a dry run) needs an admin key, else it is refused with NOT_AUTHORISED and an
audit line ``refused``. Every audit line records that authenticated ``user`` (and its
``user_role``) next to the CLI-supplied ``requested_by``, which is kept but never trusted;
the command carries ``user`` / ``user_role`` in its ``args`` so the agent's audit log has
them too. Without CURVE ``user`` is null.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from xctl.audit import AuditLog
from xctl.core.clock import Clock
from xctl.core.cluster import ClusterGraph, Liveness
from xctl.core.errors import NotAuthorisedError, NotFoundError, UsageError, XctlError
from xctl.core.graph import ENDED_STATES, NodeGraph, Process
from xctl.core.why import API_VERSION, iso
from xctl.wire.curve import ADMIN, Identity
from xctl.wire.messages import MAX_IDENT_LEN, Ack, Command, Result

log = logging.getLogger(__name__)

#: Added to the grace period for the default deadline: SIGKILL, verification, the round trip.
DEADLINE_MARGIN_S: Final = 5.0
DEFAULT_GRACE_S: Final = 10.0
MAX_GRACE_S: Final = 3600.0
MAX_DEADLINE_S: Final = MAX_GRACE_S + 120.0
#: Finished commands remembered for repeated ids.
RESULT_CACHE: Final = 1024
#: Commands in flight at once, and REQ envelopes waiting on one command.
MAX_PENDING: Final = 256
MAX_WAITERS: Final = 8
#: Most processes shown in a preview.
MAX_PREVIEW: Final = 4096

_ZAP_ARGS: Final[dict[str, type | tuple[type, ...]]] = {
    "command_id": str,
    "target": dict,
    "signal": (str, int),
    "grace_s": (int, float),
    "deadline_s": (int, float),
    "dry_run": bool,
    "requested_by": str,
}


@dataclass(frozen=True, slots=True)
class Deferred:
    """Returned by a query handler: "the reply comes later, under ``key``" (see the server)."""

    key: str


class NodeUnavailableError(XctlError):
    """The target's node is known but its agent cannot be reached now (exit 1)."""

    code = "NODE_DOWN"


@dataclass
class _Pending:
    command: Command
    node: str
    sent_ms: int
    deadline_mono: float
    sent_mono: float
    acked_ms: int | None = None
    signal: str = "TERM"
    grace_s: float = DEFAULT_GRACE_S
    extra: dict[str, Any] = field(default_factory=dict)
    user: str | None = None
    user_role: str | None = None



#: Sends a command to a node's agent; returns None when sent, else why it could not be.
Route = Callable[[str, Command], str | None]
#: Delivers the answer of a deferred query (the server replies to every REQ waiting on ``key``).
Complete = Callable[[str, dict[str, Any]], None]


class CommandRouter:
    """Owned by the aggregator's socket thread, like the cluster graph it reads."""

    def __init__(
        self,
        cluster: ClusterGraph,
        route: Route,
        complete: Complete,
        *,
        clock: Clock,
        audit_log: str | os.PathLike[str] | None = None,
        connected: Callable[[str], bool] | None = None,
        cache_size: int = RESULT_CACHE,
    ) -> None:
        self.cluster = cluster
        self.route = route
        self.complete = complete
        self.clock = clock
        self.audit = AuditLog(audit_log) if audit_log else None
        self.connected = connected or (lambda _node: True)
        self.cache_size = cache_size
        #: CURVE in use: zap needs an admin ``requester`` (set by the server per query).
        self.secure = False
        #: The authenticated identity of the query being handled (None without CURVE).
        self.requester: Identity | None = None
        self.pending: dict[str, _Pending] = {}
        self.answers: OrderedDict[str, dict[str, Any]] = OrderedDict()
        #: What the router did (sent, repeat, timeout, late_result, …), for ``health``.
        self.counts: dict[str, int] = {}
        #: Commands by final result (done, partial, refused, already_gone, expired, timeout,
        #: node_down, failed), exported as ``xctl_zap_results_total`` (see docs/operations.md).
        self.results: dict[str, int] = {}

    # ---------------------------------------------------------------- the query op
    def op_zap(self, _state: object, args: Mapping[str, Any]) -> Any:
        a = _zap_args(args)
        node, pid, ctime = self._target(a["target"])
        if a.get("dry_run"):
            return self.preview(node, pid, ctime)
        self._check_admin(a, node, pid, ctime)
        command_id = a.get("command_id")
        if not command_id:
            raise UsageError("zap needs a command_id (the idempotency key; the CLI makes one per zap)")
        if len(command_id) > MAX_IDENT_LEN:
            raise UsageError(f"command_id: at most {MAX_IDENT_LEN} characters")
        answer = self.answers.get(command_id)
        if answer is not None:
            self._count("repeat")
            self._audit("repeat", command_id, answer.get("requested_by", ""), node, {**answer, **self._user()})
            return answer
        if command_id in self.pending:
            self._count("repeat")
            return Deferred(command_id)
        if ctime is None:
            raise UsageError(
                "target.create_time: missing: a zap names the process by pid and create time, so a reused pid "
                "is never killed (xctl zap takes it from the aggregator's view, or --create-time)"
            )
        signal_name = str(a.get("signal", "TERM"))
        grace = float(a.get("grace_s", DEFAULT_GRACE_S))
        if not 0 <= grace <= MAX_GRACE_S:
            raise UsageError(f"grace_s: expected seconds between 0 and {MAX_GRACE_S:g}, got {grace:g}")
        deadline_s = float(a.get("deadline_s", grace + DEADLINE_MARGIN_S))
        if not 0 < deadline_s <= MAX_DEADLINE_S:
            raise UsageError(f"deadline_s: expected seconds between 0 and {MAX_DEADLINE_S:g}, got {deadline_s:g}")
        requested_by = str(a.get("requested_by") or "unknown")[:MAX_IDENT_LEN]
        user = self._user()
        if len(self.pending) >= MAX_PENDING:
            raise XctlError(f"{len(self.pending)} commands are in flight: try again when some have finished")
        target = {"node": node, "pid": pid, "create_time": ctime}
        self._check_node(node, command_id, requested_by, target)
        now = self.clock()
        command = Command(
            id=command_id,
            op="zap",
            target=target,
            deadline=now + int(deadline_s * 1000),
            requested_by=requested_by,
            args={"signal": signal_name, "grace_s": grace, **({k: v for k, v in user.items() if v is not None})},
        )
        why_not = self.route(node, command)
        if why_not is not None:
            self._refuse(command_id, requested_by, target, why_not)
        mono = time.monotonic()
        self.pending[command_id] = _Pending(
            command,
            node,
            now,
            mono + deadline_s,
            mono,
            signal=signal_name,
            grace_s=grace,
            user=user["user"],
            user_role=user["user_role"],
        )
        self._count("sent")
        self._audit(
            "command",
            command_id,
            requested_by,
            node,
            {"target": target, "signal": signal_name, "grace_s": grace, "deadline_ms": command.deadline, **user},
        )
        who = f"{user['user']} ({user['user_role']}), says {requested_by}" if user["user"] else requested_by
        log.info("zap %s → %s:%d (by %s, %s, grace %gs)", command_id, node, pid, who, signal_name, grace)
        return Deferred(command_id)

    def _user(self) -> dict[str, str | None]:
        """The authenticated requester, for commands and audit lines (nulls without CURVE)."""
        who = self.requester
        return {"user": who.name if who else None, "user_role": who.role if who else None}

    def _check_admin(self, a: Mapping[str, Any], node: str, pid: int, ctime: float | None) -> None:
        """With CURVE only an admin key may zap; a refusal is audited and raises NOT_AUTHORISED."""
        if not self.secure:
            return
        who = self.requester
        if who is not None and who.role == ADMIN:
            return
        self._count("not_authorised")
        self.results["not_authorised"] = self.results.get("not_authorised", 0) + 1
        command_id = str(a.get("command_id") or "")[:MAX_IDENT_LEN]
        requested_by = str(a.get("requested_by") or "unknown")[:MAX_IDENT_LEN]
        whom = who.label if who is not None else "an unknown key"
        reason = f"zap needs an admin key; {whom} may not zap"
        target = {"node": node, "pid": pid, "create_time": ctime}
        data = {"target": target, "ok": False, "result": "NOT_AUTHORISED", "reason": reason, **self._user()}
        self._audit("refused", command_id, requested_by, node, data)
        log.warning("zap %s of %s:%d refused: %s", command_id, node, pid, reason)
        raise NotAuthorisedError(f"not authorised: {reason}")

    def _target(self, raw: Mapping[str, Any]) -> tuple[str, int, float | None]:
        node, pid, ctime = raw.get("node"), raw.get("pid"), raw.get("create_time")
        unknown = set(raw) - {"node", "pid", "create_time"}
        if unknown:
            names = ", ".join(sorted(map(str, unknown)))
            raise UsageError(f"target: unknown field(s) {names} (allowed: node, pid, create_time)")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 1 <= pid < 2**31:
            raise UsageError("target.pid: expected a pid (a positive integer)")
        if ctime is not None and (not isinstance(ctime, int | float) or isinstance(ctime, bool)):
            raise UsageError("target.create_time: expected seconds since the epoch (a number)")
        if node is None:
            nodes = sorted(set(self.cluster.status) | set(self.cluster.nodes))
            if len(nodes) != 1:
                raise UsageError(f"pid {pid} without a node, and there are {len(nodes)} nodes: use node:pid")
            node = nodes[0]
        if not isinstance(node, str) or not node:
            raise UsageError("target.node: expected a node name")
        if node not in self.cluster.status and node not in self.cluster.nodes:
            known = ", ".join(sorted(self.cluster.status)[:10]) or "none yet"
            raise NotFoundError(f"unknown node {node!r} (known: {known})")
        return node, pid, None if ctime is None else float(ctime)

    def _check_node(self, node: str, command_id: str, requested_by: str, target: dict[str, Any]) -> None:
        status = self.cluster.status.get(node)
        silent_s = (self.clock() - status.last_seen) / 1000 if status is not None else None
        ago = f" (last heard {silent_s:.0f}s ago)" if silent_s is not None else ""
        if self.cluster.liveness(node) is Liveness.DEAD:
            why = f"node {node} is dead{ago}: its agent is down or unreachable"
            self._refuse(command_id, requested_by, target, why)
        if not self.connected(node):
            why = f"node {node} is not connected{ago}: its agent is down or unreachable"
            self._refuse(command_id, requested_by, target, why)

    def _refuse(self, command_id: str, requested_by: str, target: dict[str, Any], why: str) -> None:
        self._count("node_down")
        self.results["node_down"] = self.results.get("node_down", 0) + 1
        message = f"{why}; nothing was done"
        self._audit(
            "outcome",
            command_id,
            requested_by,
            str(target.get("node")),
            {"target": target, "ok": False, "result": "NODE_DOWN", "reason": message, **self._user()},
        )
        raise NodeUnavailableError(message)

    # ---------------------------------------------------------------- preview
    def preview(self, node: str, pid: int, ctime: float | None) -> dict[str, Any]:
        graph = self.cluster.nodes.get(node)
        proc = graph.find(pid) if graph is not None else None
        if graph is None or proc is None:
            raise NotFoundError(
                f"{node}:{pid} is not a process the aggregator knows (xctl ps --node {node} lists them; "
                "give --create-time to zap a process no probe reports)"
            )
        tree = _tree(graph, proc)
        rows = [_row(p, depth) for p, depth in tree]
        gpu_total = sum(g["mem_used_mib"] or 0 for r in rows for g in r["gpus"])
        matches = None
        if ctime is not None and proc.create_time is not None:
            matches = abs(proc.create_time - ctime) <= 0.05
        return {
            "apiVersion": API_VERSION,
            "kind": "ZapPreview",
            "node": node,
            "node_state": self.cluster.liveness(node).value,
            "connected": self.connected(node),
            "target": {"node": node, **rows[0]},
            "tree": rows,
            "gpu_mem_mib": gpu_total,
            "create_time_matches": matches,
            "complete": len(rows) < MAX_PREVIEW,
        }

    # ---------------------------------------------------------------- control plane
    def on_ack(self, ack: Ack) -> None:
        pending = self.pending.get(ack.id)
        if pending is None or pending.node != ack.node:
            self._count("ack_unknown")
            return
        if pending.acked_ms is None:
            pending.acked_ms = self.clock()

    def on_result(self, result: Result) -> None:
        pending = self.pending.get(result.id)
        if pending is not None and pending.node != result.node:
            log.warning("result for %s from %s, but it was sent to %s: ignored", result.id, result.node, pending.node)
            self._count("result_wrong_node")
            return
        if pending is None:
            earlier = self.answers.get(result.id)
            if earlier is None or earlier.get("node") != result.node:
                self._count("result_unknown")
                log.info("result %s from %s for no command in flight: ignored", result.id, result.node)
                return
            if earlier.get("outcome") != "TIMEOUT":
                return  # a duplicate of a result we already have
            # The agent answered after the TIMEOUT was reported: record what really happened.
            answer = _answer(earlier, earlier, result, acked=True)
            self._remember(result.id, answer)
            self._count("late_result")
            self._audit("late_result", result.id, answer["requested_by"], result.node, answer)
            log.warning("zap %s: result from %s came after its TIMEOUT: %s", result.id, result.node, answer["outcome"])
            return
        del self.pending[result.id]
        elapsed = int((time.monotonic() - pending.sent_mono) * 1000)
        answer = _answer(_command_view(pending), {"elapsed_ms": elapsed}, result, acked=True)
        self._finish(result.id, answer)

    def tick(self) -> None:
        """Report TIMEOUT for commands whose deadline passed without a result."""
        if not self.pending:
            return
        now = time.monotonic()
        for command_id in [c for c, p in self.pending.items() if now >= p.deadline_mono]:
            pending = self.pending.pop(command_id)
            acked = pending.acked_ms is not None
            waited = now - pending.sent_mono
            if acked:
                why = "it acknowledged the command: the zap may still complete; see the agent's audit log"
            else:
                why = "the agent never acknowledged the command: it is stopped, overloaded or unreachable"
            reason = f"no result from {pending.node} within {waited:.1f}s ({why})"
            view = _command_view(pending)
            answer = {
                **_base(view),
                "ok": False,
                "outcome": "TIMEOUT",
                "reason": reason,
                "acked": acked,
                "tree": [],
                "signals": [],
                "gpu": None,
                "elapsed_ms": int(waited * 1000),
                "duration_ms": None,
            }
            self._count("timeout")
            log.warning("zap %s on %s: TIMEOUT (acked: %s)", command_id, pending.node, acked)
            self._finish(command_id, answer)

    def _finish(self, command_id: str, answer: dict[str, Any]) -> None:
        self._remember(command_id, answer)
        result = str(answer.get("outcome") or ("DONE" if answer["ok"] else "FAILED")).lower()
        self.results[result] = self.results.get(result, 0) + 1
        self._audit("outcome", command_id, answer["requested_by"], answer["node"], answer)
        self.complete(command_id, answer)

    def _remember(self, command_id: str, answer: dict[str, Any]) -> None:
        self.answers[command_id] = answer
        self.answers.move_to_end(command_id)
        while len(self.answers) > self.cache_size:
            self.answers.popitem(last=False)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _audit(self, event: str, command_id: str, requested_by: str, node: str, data: Mapping[str, Any]) -> None:
        if self.audit is None:
            return
        now = self.clock()
        record: dict[str, Any] = {
            "ts": now,
            "time": iso(now),
            "source": "aggregator",
            "event": event,
            "command_id": command_id,
            "user": data.get("user"),
            "user_role": data.get("user_role"),
            "requested_by": requested_by,
            "node": node,
            "target": data.get("target"),
        }
        if event == "command":
            record.update({k: data.get(k) for k in ("signal", "grace_s", "deadline_ms")})
        else:
            record.update(
                {
                    "result": data.get("result", data.get("outcome")),
                    "ok": data.get("ok"),
                    "reason": data.get("reason"),
                    "acked": data.get("acked"),
                    "tree": data.get("tree", []),
                    "signals": data.get("signals", []),
                    "gpu": data.get("gpu"),
                    "elapsed_ms": data.get("elapsed_ms"),
                }
            )
        self.audit.write(record)


def _zap_args(args: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in args.items():
        kind = _ZAP_ARGS.get(key)
        if kind is None:
            raise UsageError(f"unknown argument {key!r} (allowed: {', '.join(sorted(_ZAP_ARGS))})")
        if value is None:
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise UsageError(f"argument {key!r} has the wrong type ({type(value).__name__})")
        out[key] = value
    if "target" not in out:
        raise UsageError("zap needs a target: {node, pid, create_time}")
    return out


def _command_view(pending: _Pending) -> dict[str, Any]:
    cmd = pending.command
    return {
        "command_id": cmd.id,
        "node": pending.node,
        "target": dict(cmd.target),
        "requested_by": cmd.requested_by,
        "user": pending.user,
        "user_role": pending.user_role,
        "signal": pending.signal,
        "grace_s": pending.grace_s,
    }


def _base(view: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ZapResult",
        "command_id": view["command_id"],
        "node": view["node"],
        "target": view["target"],
        "requested_by": view["requested_by"],
        "user": view.get("user"),
        "user_role": view.get("user_role"),
        "signal": view["signal"],
        "grace_s": view["grace_s"],
    }


def _answer(view: Mapping[str, Any], prior: Mapping[str, Any], result: Result, *, acked: bool) -> dict[str, Any]:
    data = result.data
    target = {**view["target"], **{k: v for k, v in (data.get("target") or {}).items() if v is not None}}
    return {
        **_base({**view, "target": target}),
        "ok": result.ok,
        "outcome": data.get("outcome") or ("DONE" if result.ok else "FAILED"),
        "reason": data.get("reason") or result.error,
        "acked": acked,
        "signal": data.get("signal", view["signal"]),
        "grace_s": data.get("grace_s", view["grace_s"]),
        "tree": list(data.get("tree") or []),
        "signals": list(data.get("signals") or []),
        "gpu": data.get("gpu"),
        "duration_ms": data.get("duration_ms"),
        "elapsed_ms": prior.get("elapsed_ms"),
    }


def _tree(graph: NodeGraph, root: Process) -> list[tuple[Process, int]]:
    """``root`` and its live descendants as the graph knows them (by the ``ppid`` attribute)."""
    if not root.alive:
        return [(root, 0)]
    children: dict[int, list[Process]] = {}
    for proc in graph.processes.values():
        ppid = proc.attrs.get("ppid")
        if isinstance(ppid, int) and not isinstance(ppid, bool) and proc.pid != root.pid:
            children.setdefault(ppid, []).append(proc)
    out: list[tuple[Process, int]] = []
    stack = [(root, 0)]
    seen = {root.pid}
    while stack and len(out) < MAX_PREVIEW:  # depth first, parents before their children
        proc, depth = stack.pop()
        out.append((proc, depth))
        for child in sorted(children.get(proc.pid, ()), key=lambda p: p.pid, reverse=True):
            if child.pid not in seen:
                seen.add(child.pid)
                stack.append((child, depth + 1))
    return out


def _row(proc: Process, depth: int) -> dict[str, Any]:
    ppid = proc.attrs.get("ppid")
    gpus = sorted(
        ({"gpu": u.entity, "mem_used_mib": u.mem_used_mib} for u in proc.gpus()), key=lambda g: str(g["gpu"])
    )
    return {
        "pid": proc.pid,
        "ppid": ppid if isinstance(ppid, int) else None,
        "name": proc.name,
        "state": "running" if proc.state == "start" else proc.state,
        "alive": proc.alive and proc.state not in ENDED_STATES,
        "create_time": proc.create_time,
        "job": proc.job,
        "rank": proc.rank,
        "gpus": gpus,
        "depth": depth,
    }
