"""`why`: one deterministic, evidence-backed causal chain to the root cause (DESIGN §5).

The walk starts at the target process and follows its edges on its own node (errors that
name it, errors on what it consumes or waits on, its own state). When it belongs to a job,
the job's other ranks on every node are examined the same way, together with the liveness
of their nodes. Among the candidate anomalies ("findings") the earliest hard fault wins,
severity breaking ties; degradations (thermal, power caps, a slow link) win only when no
hard fault explains the job, and informational signals (corrected errors: XID 92, a remap
recorded, a corrected PCIe error) only when nothing else does. Sympathetic signals — XID 45,
XID 63 after an ECC error, XID 74 on the healthy end of a broken link, NCCL timeouts, stalled
transports on victim ranks, an OOM-killed victim — are reported as symptoms and never blamed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from xctl.core.catalog import APPLICATION_XIDS, CodeInfo, Kind, code_info
from xctl.core.cluster import ClusterGraph, Liveness
from xctl.core.errors import NotFoundError, TargetError
from xctl.core.events import Event, EventType
from xctl.core.graph import ENDED_STATES, ErrorVertex, NodeGraph, Process, base_entity
from xctl.core.targets import Target

API_VERSION: Final = "xctl/v1"
_MAX_ALTERNATIVES: Final = 5
_MAX_SYMPTOMS: Final = 20
_NCCL_PEER_SLACK_MS: Final = 5_000
_BUSY_UTIL_PCT: Final = 50.0


@dataclass(frozen=True, slots=True)
class Step:
    """One edge of the causal chain, with the events that establish it."""

    edge: str
    src: str
    dst: str
    evidence: tuple[Event, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "edge": self.edge,
            "from": self.src,
            "to": self.dst,
            "evidence": [_evidence(e) for e in self.evidence],
        }


@dataclass(frozen=True, slots=True)
class Finding:
    """A candidate root cause."""

    node: str
    entity: str
    code: str
    kind: Kind
    severity: int
    first_ts: int
    summary: str
    steps: tuple[Step, ...]
    degrading: bool = False
    pid: int | None = None
    rank: int | None = None
    via_wait: bool = False
    #: Only informs (a corrected error): ranks after every fault and every degradation.
    informational: bool = False

    @property
    def order(self) -> tuple[int, int, int, str, str]:
        # Hard faults, then degradations, then routine states, then what only informs; the
        # earliest first within a tier (the first fault causes the later ones).
        if self.informational:
            tier = 3
        elif self.degrading:
            tier = 2 if code_info(self.code).routine else 1
        else:
            tier = 0
        return (tier, self.first_ts, -self.severity, self.node, self.entity)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.node,
            "entity": self.entity,
            "kind": self.kind.value,
            "code": self.code,
            "first_seen": iso(self.first_ts),
            "first_seen_ms": self.first_ts,
            "summary": self.summary,
            "severity": self.severity,
        }
        if self.pid is not None:
            out["pid"] = self.pid
        if self.rank is not None:
            out["rank"] = self.rank
        return out


@dataclass(frozen=True, slots=True)
class Symptom:
    """A signal deliberately not blamed, and why."""

    node: str
    entity: str
    code: str
    reason: str
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node, "entity": self.entity, "code": self.code, "reason": self.reason}
        if self.pid is not None:
            out["pid"] = self.pid
        return out


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """The knowledge-base rule that matched (filled in by ``xctl.rules``)."""

    id: str
    severity: str
    action: str
    summary: str = ""
    steps: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity,
            "action": self.action,
            "summary": self.summary,
            "steps": list(self.steps),
        }


@dataclass(frozen=True, slots=True)
class TargetInfo:
    node: str | None
    pid: int | None
    name: str | None
    job: str | None
    rank: int | None
    state: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "pid": self.pid,
            "name": self.name,
            "job": self.job,
            "rank": self.rank,
            "state": self.state,
        }

    def label(self) -> str:
        if self.pid is None:
            return f"job:{self.job}"
        parts = [f"{self.node}:{self.pid}", self.name or "?"]
        if self.job:
            parts.append(f"({self.job}" + (f" rank {self.rank})" if self.rank is not None else ")"))
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Explanation:
    target: TargetInfo
    verdict: str
    root: Finding | None
    chain: tuple[Step, ...]
    alternatives: tuple[Finding, ...] = ()
    symptoms: tuple[Symptom, ...] = ()
    rule: RuleMatch | None = None
    asked_at: int = 0

    def with_rule(self, rule: RuleMatch | None) -> Explanation:
        return Explanation(
            self.target, self.verdict, self.root, self.chain, self.alternatives, self.symptoms, rule, self.asked_at
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": "Why",
            "target": self.target.to_json(),
            "verdict": self.verdict,
            "root_cause": self.root.to_json() if self.root else None,
            "chain": [s.to_json() for s in self.chain],
            "rule": self.rule.to_json() if self.rule else None,
            "alternatives": [a.to_json() for a in self.alternatives],
            "symptoms": [s.to_json() for s in self.symptoms],
        }

    def to_text(self) -> str:
        """A compact, plain-text rendering (the CLI adds colour)."""
        lines = [f"{self.target.label()}: {self.verdict.upper()}"]
        if self.root is None:
            lines.append("root cause: none found")
        else:
            r = self.root
            where = f"{r.node}/{r.entity}" + (f" pid {r.pid}" if r.pid is not None else "")
            lines.append(f"root cause: {where} {r.code} [{r.kind.value}] first seen {iso(r.first_ts)}")
            lines.append(f"  {r.summary}")
        if self.rule is not None:
            lines.append(f"rule: {self.rule.id} severity={self.rule.severity} action={self.rule.action}")
            lines.extend(f"  - {s}" for s in self.rule.steps)
        if self.chain:
            lines.append("chain:")
            for step in self.chain:
                ev = step.evidence[-1] if step.evidence else None
                suffix = f"   {ev.value} @{iso(ev.ts)}" if ev is not None else ""
                lines.append(f"  {step.src} -{step.edge}-> {step.dst}{suffix}")
        if self.alternatives:
            lines.append("alternatives: " + "; ".join(f"{a.node}/{a.entity} {a.code}" for a in self.alternatives))
        if self.symptoms:
            lines.append("not blamed:")
            lines.extend(f"  {s.node}/{s.entity} {s.code}: {s.reason}" for s in self.symptoms)
        return "\n".join(lines)


def iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _evidence(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {"ts": event.ts, "type": event.type.value, "entity": event.entity, "value": event.value}
    if event.pid is not None:
        out["pid"] = event.pid
    raw = event.attrs.get("raw")
    if isinstance(raw, str):
        out["raw"] = raw
    return out


# ---------------------------------------------------------------------- resolution
def resolve(cluster: ClusterGraph, target: Target) -> tuple[str, Process]:
    """Find the process a target names; raises NotFoundError / TargetError with what to do."""
    assert target.pid is not None
    if target.node is None:
        nodes = cluster.nodes_with_pid(target.pid)
        if not nodes:
            raise NotFoundError(f"no process {target.pid} on any node (see `xctl ps`)")
        if len(nodes) > 1:
            raise TargetError(f"pid {target.pid} exists on {', '.join(nodes)}: say which, e.g. {nodes[0]}:{target.pid}")
        node = nodes[0]
    else:
        node = target.node
        if node not in cluster.nodes:
            known = ", ".join(sorted(cluster.nodes)[:10]) or "none yet"
            raise NotFoundError(f"unknown node {node!r} (known: {known})")
    proc = cluster.find(node, target.pid)
    if proc is None:
        raise NotFoundError(f"no process {target.pid} on {node} (see `xctl ps --node {node}`)")
    return node, proc


# ---------------------------------------------------------------------- the walk
@dataclass
class _Local:
    findings: list[Finding] = field(default_factory=list)
    symptoms: list[Symptom] = field(default_factory=list)
    job_wait: list[Event] = field(default_factory=list)


def _pname(node: str, proc: Process) -> str:
    return f"{node}:{proc.pid}"


def _classify(graph: NodeGraph, err: ErrorVertex) -> tuple[CodeInfo, str | None]:
    """The error's meaning here, or the reason it is only a symptom."""
    info = code_info(err.code)
    if info.sympathetic:
        return info, f"{err.code} is a consequence, not a cause"
    siblings = graph.errors_on(err.entity)
    if info.follows and any(s.code in info.follows for s in siblings if s is not err):
        return info, f"{err.code} follows the ECC error on {base_entity(err.entity)}"
    if err.code == "XID_74":
        peer = _peer_gpu_fault(graph, err)
        if peer is not None:
            return info, f"NVLink error on the healthy end: {peer.entity} failed first ({peer.code})"
    if err.code in APPLICATION_XIDS:
        history = graph.history.get(base_entity(err.entity), {}).get(err.code)
        if history is not None and len(history.jobs) >= 2:
            jobs = ", ".join(history.jobs)
            summary = (
                f"{err.code} repeated on {base_entity(err.entity)} across {len(history.jobs)} jobs ({jobs}): "
                "the GPU, not the application"
            )
            return CodeInfo(Kind.HARDWARE, 80, summary, condition=info.condition), None
    return info, None


def _peer_gpu_fault(graph: NodeGraph, err: ErrorVertex) -> ErrorVertex | None:
    own = base_entity(err.entity)
    for other in graph.active_errors():
        other_base = base_entity(other.entity)
        if other_base == own or not other_base.startswith("gpu-") or other.code == "XID_74":
            continue
        info = code_info(other.code)
        if not info.sympathetic and not info.degrading and other.first.ts <= err.first.ts + _NCCL_PEER_SLACK_MS:
            return other
    return None


def _error_finding(
    node: str, graph: NodeGraph, proc: Process | None, err: ErrorVertex, steps: tuple[Step, ...], out: _Local
) -> None:
    info, symptom = _classify(graph, err)
    if symptom is not None:
        out.symptoms.append(Symptom(node, err.entity, err.code, symptom, proc.pid if proc else None))
        return
    raw = err.first.attrs.get("raw")
    detail = f" ({err.count}x)" if err.count > 1 else ""
    summary = info.summary + detail
    if isinstance(raw, str) and len(raw) < 240:
        summary = f"{summary}: {raw}"
    out.findings.append(
        Finding(
            node,
            err.entity,
            err.code,
            info.kind,
            info.severity,
            err.first.ts,
            summary,
            steps,
            info.degrading,
            pid=proc.pid if proc is not None and proc.pid in err.pids else None,
            rank=proc.rank if proc is not None else None,
            informational=info.informational,
        )
    )


def _err_name(node: str, err: ErrorVertex) -> str:
    return f"{node}/{err.entity}/{err.code}"


def local_findings(cluster: ClusterGraph, node: str, proc: Process) -> _Local:
    """Everything on ``proc``'s own node that could explain it."""
    graph = cluster.nodes[node]
    graph.expire_due()  # windows of the nodes we look at, not of the whole cluster
    out = _Local()
    me = _pname(node, proc)
    seen: set[tuple[str, str]] = set()
    for err in graph.errors_of(proc.pid, created=proc.create_time):
        seen.add(err.key)
        if err.code == "NCCL_TIMEOUT":
            out.job_wait.append(err.first)
        _error_finding(node, graph, proc, err, (Step("BlockedBy", me, _err_name(node, err), (err.first,)),), out)
    for entity, usage in proc.consumes.items():
        res = f"{node}/{entity}"
        evidence = tuple(e for e in (usage.util, usage.mem) if e is not None)
        wait = proc.waits.get(entity)
        for err in graph.errors_on(entity):
            if err.key in seen:
                continue
            seen.add(err.key)
            edge = "WaitsOn" if wait is not None else "Consumes"
            steps = (Step(edge, me, res, evidence), Step("BlockedBy", res, _err_name(node, err), (err.first,)))
            _error_finding(node, graph, proc, err, steps, out)
    for target, wait in proc.waits.items():
        if target.startswith("job:"):
            out.job_wait.append(wait.first)
            continue
        errors = [e for e in graph.errors_on(target) if e.key not in seen]
        for err in errors:
            seen.add(err.key)
            steps = (
                Step("WaitsOn", me, f"{node}/{target}", (wait.first,)),
                Step("BlockedBy", f"{node}/{target}", _err_name(node, err), (err.first,)),
            )
            _error_finding(node, graph, proc, err, steps, out)
        if any(err.entity == target or base_entity(err.entity) == target for err in errors):
            continue
        slow = _slow_storage(graph, target)
        if slow is not None:
            info = code_info("STORAGE_SLOW")
            summary = f"{target} is slow: {slow.attrs.get('await_ms')} ms average I/O wait ({slow.value} ops/s)"
            steps = (
                Step("WaitsOn", me, f"{node}/{target}", (wait.first,)),
                Step("Slow", f"{node}/{target}", "", (slow,)),
            )
            out.findings.append(
                Finding(node, target, "STORAGE_SLOW", info.kind, info.severity, slow.ts, summary, steps, True)
            )
        elif wait.reason == "stalled":
            if proc.job:
                out.job_wait.append(wait.first)
            out.symptoms.append(Symptom(node, target, "STALLED", "transport stalled on a victim rank", proc.pid))
    _state_findings(node, graph, proc, out)
    return out


def _slow_storage(graph: NodeGraph, entity: str) -> Event | None:
    res = graph.resources.get(entity)
    if res is None:
        return None
    sample = res.metrics.get(EventType.STORAGE_IOPS)
    if sample is None:
        return None
    await_ms = sample.attrs.get("await_ms")
    if isinstance(await_ms, int | float) and not isinstance(await_ms, bool) and await_ms > graph.limits.slow_await_ms:
        return sample
    return None


def _state_findings(node: str, graph: NodeGraph, proc: Process, out: _Local) -> None:
    me = _pname(node, proc)
    state = proc.state
    ev = proc.state_event
    if state == "oom_killed":
        out.symptoms.append(Symptom(node, me, "OOM_KILLED", "the OOM killer's victim is not the cause", proc.pid))
        summary = f"host out of memory: the kernel killed {proc.name} ({proc.pid})"
        steps: tuple[Step, ...] = (Step("KilledBy", me, f"{node}/sysmem", (ev,)),)
        culprit = proc.pid
        hog = _memory_hog(graph, proc)
        if hog is not None:
            hog_proc, sample = hog
            culprit = hog_proc.pid
            summary += f", but {hog_proc.name} ({hog_proc.pid}) held {sample.value}% of host memory"
            steps = (*steps, Step("Consumes", f"{node}:{hog_proc.pid}", f"{node}/sysmem", (sample,)))
        info = code_info("HOST_OOM")
        out.findings.append(
            Finding(node, "sysmem", "HOST_OOM", info.kind, info.severity, ev.ts, summary, steps, pid=culprit)
        )
        return
    if state == "zombie":
        held = [(u.entity, u.mem_used_mib) for u in proc.gpus() if u.mem_used_mib]
        if held:
            entity, mib = held[0]
            info = code_info("ZOMBIE_GPU_MEMORY")
            ppid = proc.attrs.get("ppid", "?")
            summary = (
                f"{proc.name} ({proc.pid}) is a zombie still holding {mib:.0f} MiB on {entity}; "
                f"its parent {ppid} has not reaped it"
            )
            usage = proc.consumes[entity]
            steps = (Step("Consumes", me, f"{node}/{entity}", tuple(e for e in (usage.mem,) if e is not None)),)
            out.findings.append(
                Finding(
                    node,
                    entity,
                    "ZOMBIE_GPU_MEMORY",
                    info.kind,
                    info.severity,
                    ev.ts,
                    summary,
                    steps,
                    pid=proc.pid,
                    rank=proc.rank,
                )
            )
        return
    if state in ("exit", "killed", "hung"):
        cause = next((f for f in out.findings if not f.degrading and f.first_ts <= ev.ts), None)
        if cause is not None:
            reason = f"{state} follows {cause.code} on {cause.entity}"
            out.symptoms.append(Symptom(node, f"pid:{proc.pid}", state.upper(), reason, proc.pid))
            return
    if state in ("exit", "killed"):
        code = "PROCESS_KILLED" if state == "killed" else "PROCESS_EXITED"
        exit_code = proc.attrs.get("exit_code")
        if state == "exit" and exit_code in (0, "0"):
            return
        info = code_info(code)
        rank = f" rank {proc.rank}" if proc.rank is not None else ""
        summary = f"{proc.name} ({proc.pid}){rank} {'was killed' if state == 'killed' else 'exited'}"
        if exit_code is not None:
            summary += f" with code {exit_code}"
        out.findings.append(
            Finding(
                node,
                f"pid:{proc.pid}",
                code,
                info.kind,
                info.severity,
                ev.ts,
                summary,
                (Step("Ended", me, "", (ev,)),),
                pid=proc.pid,
                rank=proc.rank,
            )
        )
        return
    if state == "hung":
        info = code_info("PROCESS_HUNG")
        rank = f" rank {proc.rank}" if proc.rank is not None else ""
        summary = f"{proc.name} ({proc.pid}){rank} stopped making progress"
        out.findings.append(
            Finding(
                node,
                f"pid:{proc.pid}",
                "PROCESS_HUNG",
                info.kind,
                info.severity,
                ev.ts,
                summary,
                (Step("Hung", me, "", (ev,)),),
                pid=proc.pid,
                rank=proc.rank,
            )
        )


def _memory_hog(graph: NodeGraph, victim: Process) -> tuple[Process, Event] | None:
    best: tuple[float, Process, Event] | None = None
    for pid in graph.resource_consumers("sysmem"):
        proc = graph.processes[pid]
        usage = proc.consumes.get("sysmem")
        if pid == victim.pid or usage is None or usage.mem is None:
            continue
        try:
            pct = float(usage.mem.value)
        except ValueError:
            continue
        if best is None or pct > best[0]:
            best = (pct, proc, usage.mem)
    return None if best is None else (best[1], best[2])


def _node_down(cluster: ClusterGraph, node: str, job: str, via: str) -> Finding | None:
    state = cluster.liveness(node)
    if state is Liveness.ALIVE:
        return None
    status = cluster.status[node]
    code = "NODE_DOWN" if state is Liveness.DEAD else "NODE_SUSPECT"
    silent_s = (cluster.clock() - status.last_seen) / 1000
    summary = f"{node} silent since {iso(status.last_seen)} ({silent_s:.0f} s): {state.value}"
    steps = (Step("Member", via, f"{node}", ()),)
    return Finding(
        node,
        "node",
        code,
        Kind.NODE_DOWN,
        95 if code == "NODE_DOWN" else 40,
        status.last_seen,
        summary,
        steps,
        degrading=code == "NODE_SUSPECT",
    )


def explain(cluster: ClusterGraph, target: Target) -> Explanation:
    """Explain a process (``node:pid`` / ``pid``) or a whole job (``job:ID``)."""
    if target.job is not None:
        return _explain_job(cluster, target.job)
    node, proc = resolve(cluster, target)
    me = _pname(node, proc)
    local = local_findings(cluster, node, proc)
    findings = list(local.findings)
    symptoms = list(local.symptoms)
    remote: dict[int, tuple[Step, ...]] = {}
    if proc.job is not None and _needs_peers(proc, local):
        job_step = Step("WaitsOn", me, f"job:{proc.job}", tuple(local.job_wait[:3]))
        peers = _job_findings(cluster, proc.job, exclude=(node, proc.pid), symptoms=symptoms)
        for f in peers:
            findings.append(f)
            remote[id(f)] = (job_step, *f.steps)
    down = _node_down(cluster, node, proc.job or "", me)
    if down is not None:
        findings.append(down)
    root, alternatives = _pick(findings)
    chain: tuple[Step, ...] = ()
    if root is not None:
        chain = remote.get(id(root), root.steps)
    verdict = _verdict(proc, root, id(root) in remote if root else False)
    info = TargetInfo(node, proc.pid, proc.name, proc.job, proc.rank, proc.state)
    return Explanation(info, verdict, root, chain, alternatives, _dedupe(symptoms, root), None, cluster.clock())


def _needs_peers(proc: Process, local: _Local) -> bool:
    """Look at the job's other ranks only when this one waits, stalls or stopped — a rank
    computing at full speed is not explained by a peer's harmless corrected error."""
    if proc.state not in ("start", "running") or proc.waits or local.job_wait:
        return True
    utils = [u.util_pct for u in proc.gpus()]
    if not utils or any(u is None for u in utils):
        return True
    return any(u is not None and u < _BUSY_UTIL_PCT for u in utils)


def _job_findings(
    cluster: ClusterGraph, job: str, *, exclude: tuple[str, int] | None, symptoms: list[Symptom]
) -> list[Finding]:
    """Findings on every other rank of ``job``, each prefixed with its Member step."""
    out: list[Finding] = []
    nodes_seen: set[str] = set()
    for rank in cluster.ranks(job):
        proc = rank.process
        if exclude is not None and (rank.node, proc.pid) == exclude:
            continue
        member = Step(
            "Member",
            f"job:{job}",
            f"{_pname(rank.node, proc)}" + (f" (rank {proc.rank})" if proc.rank is not None else ""),
            (),
        )
        local = local_findings(cluster, rank.node, proc)
        symptoms.extend(local.symptoms)
        for f in local.findings:
            out.append(_with_steps(f, (member, *f.steps)))
        nodes_seen.add(rank.node)
    for node in sorted(nodes_seen):
        down = _node_down(cluster, node, job, f"job:{job}")
        if down is not None:
            out.append(down)
    return out


def _with_steps(f: Finding, steps: tuple[Step, ...]) -> Finding:
    return Finding(
        f.node,
        f.entity,
        f.code,
        f.kind,
        f.severity,
        f.first_ts,
        f.summary,
        steps,
        f.degrading,
        f.pid,
        f.rank,
        f.via_wait,
        f.informational,
    )


def _explain_job(cluster: ClusterGraph, job: str) -> Explanation:
    ranks = cluster.ranks(job)
    if not ranks:
        known = ", ".join(cluster.jobs()[:10]) or "none yet"
        raise NotFoundError(f"unknown job {job!r} (known: {known})")
    symptoms: list[Symptom] = []
    findings = _job_findings(cluster, job, exclude=None, symptoms=symptoms)
    root, alternatives = _pick(findings)
    if root is None:
        verdict = "running"
    else:
        verdict = "degraded" if root.degrading else "blocked"
    states = {r.process.state for r in ranks}
    state = "running" if states <= {"start", "running"} else ",".join(sorted(states))
    info = TargetInfo(None, None, None, job, None, state)
    chain = root.steps if root else ()
    return Explanation(info, verdict, root, chain, alternatives, _dedupe(symptoms, root), None, cluster.clock())


def _pick(findings: list[Finding]) -> tuple[Finding | None, tuple[Finding, ...]]:
    if not findings:
        return None, ()
    ordered = sorted(findings, key=lambda f: f.order)
    root = ordered[0]
    alternatives: list[Finding] = []
    seen = {(root.node, root.entity, root.code)}
    for f in ordered[1:]:
        key = (f.node, f.entity, f.code)
        if key not in seen:
            seen.add(key)
            alternatives.append(f)
        if len(alternatives) >= _MAX_ALTERNATIVES:
            break
    return root, tuple(alternatives)


def _verdict(proc: Process, root: Finding | None, remote: bool) -> str:
    if proc.state in ENDED_STATES or proc.state == "zombie":
        return "exited"
    if root is None:
        return "waiting" if proc.waits or proc.state in ("hung", "d_state") else "running"
    if remote or root.code in ("NODE_DOWN", "NODE_SUSPECT") or root.code == "STORAGE_SLOW":
        return "waiting"
    if any(s.edge == "WaitsOn" for s in root.steps):
        return "waiting"
    return "degraded" if root.degrading else "blocked"


def _dedupe(symptoms: Iterable[Symptom], root: Finding | None) -> tuple[Symptom, ...]:
    """Group symptoms by (code, reason) so 31 victim ranks read as one line."""
    groups: dict[tuple[str, str], list[Symptom]] = {}
    for s in symptoms:
        if root is not None and (s.node, s.entity, s.code) == (root.node, root.entity, root.code):
            continue
        groups.setdefault((s.code, s.reason), []).append(s)
    out: list[Symptom] = []
    for (code, reason), items in groups.items():
        first = items[0]
        if len(items) == 1:
            out.append(first)
        else:
            nodes = sorted({s.node for s in items})
            where = (
                f"{len(items)} places on {len(nodes)} node(s) ({', '.join(nodes[:4])}{'…' if len(nodes) > 4 else ''})"
            )
            out.append(Symptom(first.node, first.entity, code, f"{reason} [{where}]", first.pid))
        if len(out) >= _MAX_SYMPTOMS:
            break
    return tuple(out)
