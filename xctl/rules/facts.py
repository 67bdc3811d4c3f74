"""What rule conditions can see: facts computed from an Explanation and the cluster graph.

A fact is a named value — a string, number, boolean or a tuple of strings — such as
``root.code`` (``"XID_79"``), ``root.repeat_jobs`` (3) or ``cooccurs.XID_63`` (True). The
fixed names are listed in :data:`FACTS`; families such as ``cooccurs.<CODE>`` are listed in
:data:`FAMILIES`. A fact that does not apply (``root.xid`` of a link flap, ``job.*`` of a
process outside any job) is *missing*: every test on it fails except ``null`` and
``{exists: false}``. Family facts that count or flag something default to 0 / false.

Windows: "active" errors are those the graph still holds — within the error window (5 min by
default) or conditions still in force. Co-occurrence compares first-seen times on the
sender's clock, with a default window of 60 s.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from xctl.core.catalog import code_info, xid_number
from xctl.core.cluster import ClusterGraph, Rank
from xctl.core.events import Event, EventType
from xctl.core.graph import ENDED_STATES, ErrorVertex, NodeGraph, Process, as_float, base_entity
from xctl.core.why import Explanation, Finding, iso

FactValue = str | int | float | bool | tuple[str, ...]

#: Two errors on one node co-occur when their first-seen times are at most this far apart.
COOCCUR_WINDOW_MS: Final = 60_000
#: A rank whose busiest GPU is at or below this utilisation (%) counts as idle.
IDLE_UTIL_PCT: Final = 20.0
#: A rank whose busiest GPU is at or above this utilisation (%) counts as busy.
BUSY_UTIL_PCT: Final = 80.0


@dataclass(frozen=True, slots=True)
class FactSpec:
    name: str
    type: str
    help: str


def _specs(*items: tuple[str, str, str]) -> dict[str, FactSpec]:
    return {name: FactSpec(name, kind, text) for name, kind, text in items}


FACTS: Final[dict[str, FactSpec]] = _specs(
    ("verdict", "str", "blocked | waiting | degraded | exited | running | unknown"),
    ("has_root", "bool", "why found a root cause"),
    # the target
    ("target.kind", "str", "process | job"),
    ("target.node", "str", "node of the target process"),
    ("target.pid", "int", "pid of the target process"),
    ("target.name", "str", "process name"),
    ("target.job", "str", "job of the target"),
    ("target.rank", "int", "rank of the target process"),
    ("target.state", "str", "process state (start, running, exit, zombie, d_state, oom_killed, killed, hung)"),
    ("target.exit_code", "int", "exit code of an ended target process"),
    ("target.node_liveness", "str", "alive | suspect | dead: the target's node"),
    ("target.gpu_util", "float", "highest GPU utilisation (%) of the target process"),
    ("target.gpu_mem_pct", "float", "highest GPU memory use (%) of the target process"),
    ("target.cpu_util", "float", "CPU use of the target process (% of one core; can exceed 100)"),
    ("target.sysmem_pct", "float", "host memory use of the target process (%)"),
    ("target.waits", "list", "what the target waits for: reasons (stalled, d_state, NCCL_TIMEOUT, ...)"),
    ("target.waiting_on_job", "bool", "the target waits on its job's peers"),
    # the root cause
    ("root.code", "str", "root-cause code: XID_79, NVLINK_DOWN, STORAGE_SLOW, NODE_DOWN, ..."),
    ("root.kind", "str", "hardware | application | interconnect | network | storage | thermal | power | "
     "firmware | scheduler | operator | node-down | unknown (XID 13/31/43 repeated across jobs read hardware)"),
    ("root.entity", "str", "entity of the root cause: gpu-3, gpu-1/nvlink-0, mlx5_4, nvme0n1, node, pid:4812"),
    ("root.entity_class", "str", "gpu | nvlink | pcie | nvswitch | nic | storage | node | process | sysmem | "
     "cpu | psu | probe | job | other"),
    ("root.node", "str", "node of the root cause"),
    ("root.node_liveness", "str", "alive | suspect | dead: the root cause's node"),
    ("root.xid", "int", "the XID number when the code is XID_<n>"),
    ("root.gpu", "str", "the GPU of the root cause (gpu-3 for gpu-3/nvlink-0)"),
    ("root.gpu_index", "int", "its index (3)"),
    ("root.pid", "int", "pid named by the root cause (for HOST_OOM: the memory hog)"),
    ("root.rank", "int", "rank of the process the root cause was found on"),
    ("root.severity", "int", "catalogue severity, 0-100"),
    ("root.degrading", "bool", "the root cause only slows things down"),
    ("root.condition", "bool", "a lasting condition (GPU lost, link down) rather than a blip"),
    ("root.summary", "str", "why's one-line summary"),
    ("root.first_seen", "str", "first seen, ISO 8601 UTC (sender's clock)"),
    ("root.first_seen_ms", "int", "first seen, ms since the epoch (sender's clock)"),
    ("root.age_s", "float", "seconds from first seen to the question"),
    ("root.count", "int", "occurrences of this code on this entity in the active window"),
    ("root.node_count", "int", "occurrences of the root code on the root's node (all entities, active window)"),
    ("root.node_entities", "int", "entities of the root's node with the root code active"),
    ("root.repeat_count", "int", "occurrences of the root code on this GPU over hours (history)"),
    ("root.repeat_jobs", "int", "distinct jobs the root code hit on this GPU (history; up to 8)"),
    ("root.raw", "str", "the raw log line behind the root cause, when a probe sent one"),
    ("root.recovery_action", "str", "XID 154's recovery action: NONE, GPU_RESET, NODE_REBOOT, DRAIN_P2P, "
     "DRAIN_AND_RESET, RECOVER_IMEX_DOMAIN, BUS_RESET, SYSTEM_REBOOT"),
    ("root.gpu_recovery_action", "str", "the latest XID 154 recovery action active on the root's GPU"),
    ("root.on_target", "bool", "the root cause was found on the target's own edges (not through its job)"),
    ("root.is_target", "bool", "the root cause names the target process itself (root.pid is the target)"),
    ("root.first_exit", "bool", "the root cause is the job's first rank to end"),
    ("root.actions", "list", "operator actions (action.exec values) recorded on the root's entity"),
    ("root.process.name", "str", "process the root cause names (root.pid)"),
    ("root.process.state", "str", "its state"),
    ("root.process.exit_code", "int", "its exit code"),
    ("root.process.ppid", "int", "its parent pid"),
    ("root.process.gpu_mem_pct", "float", "its highest GPU memory use (%)"),
    # the node of the root cause
    ("node.actions", "list", "operator actions (action.exec values) recorded on the root's node"),
    # the job
    ("job.id", "str", "the job (target's, else the root process's)"),
    ("job.ranks_total", "int", "ranks of the job known (live and ended)"),
    ("job.nodes", "int", "nodes the job runs on"),
    ("job.world_size", "int", "world size the ranks report"),
    ("job.ranks_waiting", "int", "live ranks waiting on peers or a resource (stalled, d_state, NCCL timeout); "
     "hung ranks are counted in job.ranks_hung"),
    ("job.ranks_exited", "int", "ranks that ended (exit, killed, oom_killed)"),
    ("job.ranks_hung", "int", "ranks in state hung"),
    ("job.ranks_idle", "int", f"live ranks whose GPUs are at most {IDLE_UTIL_PCT:.0f}% busy"),
    ("job.ranks_busy", "int", f"live ranks with a GPU at least {BUSY_UTIL_PCT:.0f}% busy"),
    ("job.first_exit_rank", "int", "rank that ended first"),
    ("job.first_exit_node", "str", "its node"),
    ("job.first_exit_pid", "int", "its pid"),
    ("job.nodes_dead", "int", "nodes of the job that went silent (dead)"),
    ("job.nodes_suspect", "int", "nodes of the job that missed heartbeats (suspect)"),
    ("job.checkpointing", "bool", "a CHECKPOINT_BEGIN intent without a later CHECKPOINT_END"),
    ("job.gpus_with_root_code", "int", "GPUs of the job (any node) that saw the root code"),
    ("job.nodes_with_root_code", "int", "nodes of the job where the root code was seen"),
    # what else why reported
    ("symptoms", "list", "codes why reported as symptoms (not blamed)"),
    ("symptoms.count", "int", "number of symptom lines"),
    ("alternatives", "list", "codes of the ranked alternative causes"),
)

FAMILIES: Final[dict[str, FactSpec]] = {
    spec.name.split("<", 1)[0]: spec
    for spec in _specs(
        ("cooccurs.<CODE>", "bool", "CODE was first seen on the root's node within 60 s of the root cause"),
        ("cooccurs_entity.<CODE>", "bool", "same, on the root's entity or its GPU (gpu-1 and gpu-1/nvlink-0)"),
        ("gap_s.<CODE>", "float", "seconds between the root cause and the nearest CODE on its node (absent: missing)"),
        ("offset_s.<CODE>", "float", "signed seconds from the root cause to that CODE (negative: CODE came first)"),
        ("node.count.<CODE>", "int", "occurrences of CODE on the root's node (active window)"),
        ("node.action.<VALUE>", "bool", "an operator action VALUE (POWER_LIMIT, ...) was recorded on the root's node"),
        ("root.action.<VALUE>", "bool", "an operator action VALUE was recorded on the root's entity"),
        ("symptom.<CODE>", "bool", "why reported CODE as a symptom"),
        ("alternative.<CODE>", "bool", "CODE is among the alternatives"),
        ("root.attr.<KEY>", "any", "attribute KEY of the root cause's event (width, max_width, temp_c, ...)"),
    ).values()
}

#: Family facts that default to a value instead of being missing.
_FAMILY_DEFAULTS: Final[dict[str, FactValue]] = {
    "cooccurs.": False,
    "cooccurs_entity.": False,
    "node.count.": 0,
    "node.action.": False,
    "root.action.": False,
    "symptom.": False,
    "alternative.": False,
}

_SUFFIX = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def is_known_fact(name: str) -> bool:
    """A fixed fact name, or a family prefix followed by a code/key."""
    if name in FACTS:
        return True
    return any(name.startswith(prefix) and _SUFFIX.match(name[len(prefix) :]) for prefix in FAMILIES)


def fact_specs() -> list[FactSpec]:
    """Every fact and family, for documentation and ``rules`` tooling."""
    return [*FACTS.values(), *FAMILIES.values()]


class Facts:
    """The facts of one explanation. ``get`` returns None for a missing fact."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, FactValue]) -> None:
        self._values = dict(values)

    def get(self, name: str) -> FactValue | None:
        value = self._values.get(name)
        if value is not None:
            return value
        for prefix, default in _FAMILY_DEFAULTS.items():
            if name.startswith(prefix):
                return default
        return None

    def as_dict(self) -> dict[str, FactValue]:
        return dict(sorted(self._values.items()))

    def __repr__(self) -> str:
        return f"Facts({len(self._values)} values)"


# ---------------------------------------------------------------------- entity classes
_NIC = re.compile(r"^(mlx\d*_\d+|ib[a-z]*\d+|eth\d+|en[a-z0-9]+|bond\d+|hsn\d+|efa\d*|ice\d*|bnxt\w*|roce\w*)$")
_STORAGE = re.compile(
    r"^(nvme\d+(n\d+)?(p\d+)?|sd[a-z]+\d*|vd[a-z]+\d*|md\d+|dm-\d+|(nfs|lustre|gpfs|beegfs|weka):.*)$"
)
_PCI = re.compile(r"^([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


def entity_class(entity: str, *, job: str | None = None) -> str:
    """The class of an entity name, as rules see it (``root.entity_class``)."""
    if entity == "node":
        return "node"
    if entity.startswith("pid:"):
        return "process"
    if entity in ("sysmem", "cpu"):
        return entity
    if job is not None and entity == job:
        return "job"
    base, _, sub = entity.partition("/")
    if base.startswith("gpu-"):
        if sub.startswith("nvlink"):
            return "nvlink"
        if sub.startswith("pcie"):
            return "pcie"
        return "gpu"
    if base.startswith("nvswitch"):
        return "nvswitch"
    if _NIC.match(base):
        return "nic"
    if _STORAGE.match(entity):
        return "storage"
    if _PCI.match(base):
        return "pcie"
    if base.startswith("psu"):
        return "psu"
    if base.startswith("probe:"):
        return "probe"
    return "other"


# ---------------------------------------------------------------------- XID 154
#: nvmlDeviceGpuRecoveryAction_t values (NVML API reference).
RECOVERY_ACTIONS: Final[dict[int, str]] = {
    0: "NONE",
    1: "GPU_RESET",
    2: "NODE_REBOOT",
    3: "DRAIN_P2P",
    4: "DRAIN_AND_RESET",
    5: "RECOVER_IMEX_DOMAIN",
    6: "BUS_RESET",
    7: "SYSTEM_REBOOT",
}
_RECOVERY_TEXT: Final = re.compile(r"\bto\s+0x([0-9a-fA-F]+)")
_RECOVERY_WORDS: Final = (
    ("drain and reset", "DRAIN_AND_RESET"),
    ("drain p2p", "DRAIN_P2P"),
    ("node reboot", "NODE_REBOOT"),
    ("system reboot", "SYSTEM_REBOOT"),
    ("bus reset", "BUS_RESET"),
    ("gpu reset", "GPU_RESET"),
    ("imex", "RECOVER_IMEX_DOMAIN"),
)


def recovery_action(attrs: Mapping[str, object]) -> str | None:
    """XID 154's new recovery action, from ``attrs.recovery_action`` or the raw driver line
    ("GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)")."""
    given = attrs.get("recovery_action")
    if isinstance(given, int) and not isinstance(given, bool):
        return RECOVERY_ACTIONS.get(given, f"UNKNOWN_{given}")
    if isinstance(given, str) and given:
        text = given.strip()
        if text.isdigit():
            return RECOVERY_ACTIONS.get(int(text), f"UNKNOWN_{text}")
        return text.upper().replace(" ", "_")
    raw = attrs.get("raw")
    if not isinstance(raw, str):
        return None
    match = _RECOVERY_TEXT.search(raw)
    if match is not None:
        number = int(match.group(1), 16)
        return RECOVERY_ACTIONS.get(number, f"UNKNOWN_{number}")
    lowered = raw.lower()
    for words, action in _RECOVERY_WORDS:
        if words in lowered:
            return action
    return None


# ---------------------------------------------------------------------- computing
def compute(
    explanation: Explanation, cluster: ClusterGraph, *, cooccur_window_ms: int = COOCCUR_WINDOW_MS
) -> Facts:
    """All facts of one explanation. Pure: reads the cluster, never changes it."""
    out: dict[str, FactValue] = {}
    exp = explanation
    out["verdict"] = exp.verdict
    out["has_root"] = exp.root is not None
    _target_facts(exp, cluster, out)
    _symptom_facts(exp, out)
    root = exp.root
    root_proc: Process | None = None
    if root is not None:
        root_proc = _root_facts(exp, root, cluster, out, cooccur_window_ms)
    job = exp.target.job
    if job is None and root_proc is not None:
        job = root_proc.job
    if job is not None:
        _job_facts(job, root, cluster, out)
    return Facts({k: v for k, v in out.items() if v is not None})


def _put(out: dict[str, FactValue], name: str, value: FactValue | None) -> None:
    if value is not None:
        out[name] = value


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
    return None


def _gpu_util(proc: Process) -> float | None:
    values = [u.util_pct for u in proc.gpus() if u.util_pct is not None]
    return max(values) if values else None


def _gpu_mem_pct(proc: Process) -> float | None:
    values: list[float] = []
    for usage in proc.gpus():
        if usage.mem is None:
            continue
        pct = as_float(usage.mem.value)
        if pct is not None:
            values.append(pct)
    return max(values) if values else None


def _target_facts(exp: Explanation, cluster: ClusterGraph, out: dict[str, FactValue]) -> Process | None:
    t = exp.target
    out["target.kind"] = "process" if t.pid is not None else "job"
    _put(out, "target.node", t.node)
    _put(out, "target.pid", t.pid)
    _put(out, "target.name", t.name)
    _put(out, "target.job", t.job)
    _put(out, "target.rank", t.rank)
    _put(out, "target.state", t.state)
    if t.node is None or t.pid is None:
        return None
    if t.node in cluster.status:
        out["target.node_liveness"] = cluster.liveness(t.node).value
    proc = cluster.find(t.node, t.pid)
    if proc is None:
        return None
    _put(out, "target.exit_code", _int(proc.attrs.get("exit_code")))
    _put(out, "target.gpu_util", _gpu_util(proc))
    _put(out, "target.gpu_mem_pct", _gpu_mem_pct(proc))
    cpu = proc.consumes.get("cpu")
    if cpu is not None:
        _put(out, "target.cpu_util", cpu.util_pct)
    sysmem = proc.consumes.get("sysmem")
    if sysmem is not None and sysmem.mem is not None:
        _put(out, "target.sysmem_pct", as_float(sysmem.mem.value))
    reasons = sorted({w.reason for w in proc.waits.values()} | ({"hung"} if proc.state == "hung" else set()))
    out["target.waits"] = tuple(reasons)
    out["target.waiting_on_job"] = any(k.startswith("job:") for k in proc.waits)
    return proc


def _symptom_facts(exp: Explanation, out: dict[str, FactValue]) -> None:
    codes = sorted({s.code for s in exp.symptoms})
    out["symptoms"] = tuple(codes)
    out["symptoms.count"] = len(exp.symptoms)
    for code in codes:
        out[f"symptom.{code}"] = True
    alternatives = sorted({a.code for a in exp.alternatives})
    out["alternatives"] = tuple(alternatives)
    for code in alternatives:
        out[f"alternative.{code}"] = True


def _root_vertex(graph: NodeGraph | None, root: Finding) -> ErrorVertex | None:
    if graph is None:
        return None
    for err in graph.errors_on(root.entity):
        if err.entity == root.entity and err.code == root.code:
            return err
    return None


def _root_attrs(err: ErrorVertex | None, root: Finding) -> dict[str, object]:
    attrs: dict[str, object] = {}
    if err is not None:
        attrs.update(err.first.attrs)
        attrs.update(err.last.attrs)
    elif root.steps and root.steps[-1].evidence:
        attrs.update(root.steps[-1].evidence[-1].attrs)
    return {k: v for k, v in attrs.items() if not k.startswith("_")}


def _root_facts(
    exp: Explanation, root: Finding, cluster: ClusterGraph, out: dict[str, FactValue], window_ms: int
) -> Process | None:
    out["root.code"] = root.code
    out["root.kind"] = root.kind.value
    out["root.entity"] = root.entity
    out["root.entity_class"] = entity_class(root.entity, job=exp.target.job)
    out["root.node"] = root.node
    out["root.severity"] = root.severity
    out["root.degrading"] = root.degrading
    out["root.summary"] = root.summary
    out["root.first_seen"] = iso(root.first_ts)
    out["root.first_seen_ms"] = root.first_ts
    if exp.asked_at:
        out["root.age_s"] = round((exp.asked_at - root.first_ts) / 1000, 3)
    _put(out, "root.pid", root.pid)
    _put(out, "root.rank", root.rank)
    _put(out, "root.xid", xid_number(root.code))
    base = base_entity(root.entity)
    if base.startswith("gpu-"):
        out["root.gpu"] = base
        _put(out, "root.gpu_index", _int(base[4:]))
    if root.node in cluster.status:
        out["root.node_liveness"] = cluster.liveness(root.node).value
    out["root.on_target"] = (
        exp.target.pid is not None
        and root.node == exp.target.node
        and not any(step.edge == "Member" for step in exp.chain)
    )
    out["root.is_target"] = (
        root.pid is not None and root.pid == exp.target.pid and root.node == exp.target.node
    )
    graph = cluster.nodes.get(root.node)
    err = _root_vertex(graph, root)
    out["root.count"] = err.count if err is not None else 1
    out["root.condition"] = err.condition if err is not None else code_info(root.code).condition
    attrs = _root_attrs(err, root)
    raw = attrs.get("raw")
    if isinstance(raw, str):
        out["root.raw"] = raw
    for key, value in attrs.items():
        if isinstance(value, str | int | float | bool):
            out[f"root.attr.{key}"] = value
    if root.code == "XID_154":
        _put(out, "root.recovery_action", recovery_action(attrs))
    if graph is not None:
        _node_facts(root, err, graph, out, window_ms)
    proc = cluster.find(root.node, root.pid) if root.pid is not None else None
    if proc is not None:
        out["root.process.name"] = proc.name
        out["root.process.state"] = proc.state
        _put(out, "root.process.exit_code", _int(proc.attrs.get("exit_code")))
        _put(out, "root.process.ppid", _int(proc.attrs.get("ppid")))
        _put(out, "root.process.gpu_mem_pct", _gpu_mem_pct(proc))
    return proc


def _node_facts(
    root: Finding, err: ErrorVertex | None, graph: NodeGraph, out: dict[str, FactValue], window_ms: int
) -> None:
    base = base_entity(root.entity)
    counts: dict[str, int] = {}
    entities: set[str] = set()
    nearest: dict[str, int] = {}
    nearest_entity: dict[str, int] = {}
    latest_154: ErrorVertex | None = None
    for other in sorted(graph.active_errors(), key=lambda e: (e.first.ts, e.entity, e.code)):
        counts[other.code] = counts.get(other.code, 0) + other.count
        if other.code == root.code:
            entities.add(other.entity)
        same_base = base_entity(other.entity) == base
        if other.code == "XID_154" and same_base and (latest_154 is None or other.last.ts >= latest_154.last.ts):
            latest_154 = other
        if other is err or (other.entity, other.code) == (root.entity, root.code):
            continue
        offset = _offset(root.first_ts, other)
        for table, applies in ((nearest, True), (nearest_entity, same_base)):
            if applies and (other.code not in table or abs(offset) < abs(table[other.code])):
                table[other.code] = offset
    for code, count in counts.items():
        out[f"node.count.{code}"] = count
    out["root.node_count"] = max(counts.get(root.code, 0), 1)
    out["root.node_entities"] = max(len(entities), 1)
    for code, offset in nearest.items():
        out[f"gap_s.{code}"] = abs(offset) / 1000
        out[f"offset_s.{code}"] = offset / 1000
        if abs(offset) <= window_ms:
            out[f"cooccurs.{code}"] = True
    for code, offset in nearest_entity.items():
        if abs(offset) <= window_ms:
            out[f"cooccurs_entity.{code}"] = True
    if latest_154 is not None:
        action = recovery_action({**latest_154.first.attrs, **latest_154.last.attrs})
        _put(out, "root.gpu_recovery_action", action)
    if base.startswith("gpu-"):
        history = graph.history.get(base, {}).get(root.code)
        out["root.repeat_jobs"] = len(history.jobs) if history is not None else 0
        out["root.repeat_count"] = history.count if history is not None else (err.count if err is not None else 1)
    actions = [ev for ev in graph.intents.values() if ev.type is EventType.ACTION_EXEC]
    _action_facts(actions, base, out)


def _offset(root_ts: int, other: ErrorVertex) -> int:
    """Signed ms from the root cause to ``other`` (0 when the root falls inside its span)."""
    first, last = other.first.ts, max(other.last.ts, other.first.ts)
    if first <= root_ts <= last:
        return 0
    return first - root_ts if first > root_ts else last - root_ts


def _action_facts(actions: Iterable[Event], base: str, out: dict[str, FactValue]) -> None:
    node_values: set[str] = set()
    root_values: set[str] = set()
    for ev in actions:
        node_values.add(ev.value)
        if base_entity(ev.entity) == base:
            root_values.add(ev.value)
    out["node.actions"] = tuple(sorted(node_values))
    out["root.actions"] = tuple(sorted(root_values))
    for value in node_values:
        out[f"node.action.{value}"] = True
    for value in root_values:
        out[f"root.action.{value}"] = True


def _job_facts(job: str, root: Finding | None, cluster: ClusterGraph, out: dict[str, FactValue]) -> None:
    ranks = cluster.ranks(job)
    if not ranks:
        return
    out["job.id"] = job
    nodes = sorted({r.node for r in ranks})
    out["job.ranks_total"] = len(ranks)
    out["job.nodes"] = len(nodes)
    world = [w for w in (_int(r.process.attrs.get("world_size")) for r in ranks) if w is not None]
    if world:
        out["job.world_size"] = max(world)
    waiting = exited = hung = idle = busy = 0
    first: Rank | None = None
    for r in ranks:
        proc = r.process
        if not proc.alive or proc.state in ENDED_STATES:
            exited += 1
            if first is None or _end_key(r) < _end_key(first):
                first = r
            continue
        if proc.state == "hung":
            hung += 1
        elif proc.waits or proc.state == "d_state":
            waiting += 1
        util = _gpu_util(proc)
        if util is not None and util <= IDLE_UTIL_PCT:
            idle += 1
        if util is not None and util >= BUSY_UTIL_PCT:
            busy += 1
    out["job.ranks_waiting"] = waiting
    out["job.ranks_exited"] = exited
    out["job.ranks_hung"] = hung
    out["job.ranks_idle"] = idle
    out["job.ranks_busy"] = busy
    if first is not None:
        _put(out, "job.first_exit_rank", first.rank)
        out["job.first_exit_node"] = first.node
        out["job.first_exit_pid"] = first.process.pid
        if root is not None:
            out["root.first_exit"] = root.node == first.node and root.pid == first.process.pid
    liveness = [cluster.liveness(n).value for n in nodes]
    out["job.nodes_dead"] = liveness.count("dead")
    out["job.nodes_suspect"] = liveness.count("suspect")
    out["job.checkpointing"] = any(_checkpointing(cluster.nodes[n], job) for n in nodes if n in cluster.nodes)
    if root is not None:
        gpus = _gpus_with_code(cluster, job, ranks, root.code)
        out["job.gpus_with_root_code"] = len(gpus)
        out["job.nodes_with_root_code"] = len({node for node, _ in gpus})


def _end_key(rank: Rank) -> tuple[int, int, str, int]:
    proc = rank.process
    return (proc.state_event.ts, rank.rank if rank.rank is not None else 1 << 30, rank.node, proc.pid)


def _checkpointing(graph: NodeGraph, job: str) -> bool:
    begin = graph.intents.get((job, "CHECKPOINT_BEGIN"))
    if begin is None:
        return False
    end = graph.intents.get((job, "CHECKPOINT_END"))
    return end is None or end.ts < begin.ts


def _gpus_with_code(cluster: ClusterGraph, job: str, ranks: list[Rank], code: str) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for node in sorted({r.node for r in ranks}):
        graph = cluster.nodes.get(node)
        if graph is None:
            continue
        for gpu, codes in graph.history.items():
            history = codes.get(code)
            if history is not None and job in history.jobs:
                found.add((node, gpu))
    for r in ranks:
        graph = cluster.nodes.get(r.node)
        if graph is None:
            continue
        for usage in r.process.gpus():
            if any(e.code == code for e in graph.errors_on(usage.entity)):
                found.add((r.node, base_entity(usage.entity)))
    return found
