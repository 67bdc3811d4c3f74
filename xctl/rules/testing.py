"""Rule test cases: events in, expected rule and root cause out (``xctl rules test``).

A case builds a cluster on a manual clock from its events (and optional generated jobs),
lets some nodes go silent, asks ``why`` about its target, enriches the answer with the rules
and compares. The file format is documented in docs/rules.md ("Testing rules").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from xctl.core.clock import ManualClock
from xctl.core.cluster import ClusterGraph
from xctl.core.errors import EventError, RuleError, XctlError
from xctl.core.events import AttrValue, Event, EventType, event_from_mapping
from xctl.core.targets import Target, parse_target
from xctl.core.why import Explanation, explain
from xctl.rules._yaml import LineList, LineMap, RuleFileError, read_yaml
from xctl.rules.engine import Engine
from xctl.rules.loader import RuleSet, load_rules, rule_files
from xctl.rules.schema import ACTIONS, SEVERITIES, SITE_ACTION, Problems, file_kind

log = logging.getLogger(__name__)

#: Where case time starts: ``t: 0`` (2024-11-23T08:20:00Z, the same origin as the unit scenarios).
T0_MS: Final = 1_732_350_000_000
CASE_KEYS: Final = ("name", "description", "node", "jobs", "events", "silent_nodes", "advance", "target", "expect")
EVENT_KEYS: Final = (
    "node", "t", "ts", "type", "event_type", "entity", "entity_id", "value", "pid", "job", "job_id", "attrs",
    "each_rank", "except", "nodes",
)
JOB_KEYS: Final = ("id", "nodes", "ranks_per_node", "at", "util", "pid_base", "name")
EXPECT_KEYS: Final = ("rule", "root_cause", "verdict", "action", "severity")
ROOT_KEYS: Final = ("node", "entity", "code", "kind", "pid")
_UNSET: Final = object()


@dataclass(frozen=True, slots=True)
class JobSpec:
    id: str
    nodes: tuple[str, ...]
    ranks_per_node: int
    at_ms: int
    util: float
    pid_base: int
    name: str

    def ranks(self) -> list[tuple[str, int, int, int]]:
        """(node, local index, rank, pid) of every rank."""
        out = []
        for n, node in enumerate(self.nodes):
            for local in range(self.ranks_per_node):
                out.append((node, local, n * self.ranks_per_node + local, self.pid_base + local))
        return out


@dataclass(frozen=True, slots=True)
class Expectation:
    rule: object = _UNSET
    root: object = _UNSET
    verdict: str | None = None
    action: str | None = None
    severity: str | None = None


@dataclass(frozen=True, slots=True)
class RuleCase:
    name: str
    source: str
    line: int | None
    events: tuple[tuple[str, Event], ...]
    silent_nodes: frozenset[str]
    advance_ms: int
    target: Target
    expect: Expectation

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    source: str
    line: int | None
    passed: bool
    reason: str = ""
    expected_rule: str | None = None
    rule: str | None = None
    root: dict[str, Any] | None = None
    verdict: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "line": self.line,
            "passed": self.passed,
            "reason": self.reason,
            "expected_rule": self.expected_rule,
            "rule": self.rule,
            "root_cause": self.root,
            "verdict": self.verdict,
        }


@dataclass
class TestReport:
    """Results per case, plus files that could not be used (bad cases, bad rules)."""

    __test__ = False  # not a pytest class

    results: list[CaseResult] = field(default_factory=list)
    errors: list[RuleError] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(1 for r in self.results if r.passed)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.passed)

    @property
    def ok(self) -> bool:
        """Every case passed, nothing was unreadable, and there was at least one case."""
        return bool(self.results) and self.failed == 0 and not self.errors

    def rules_covered(self) -> set[str]:
        """Ids of rules that a passing case expected."""
        return {r.expected_rule for r in self.results if r.passed and r.expected_rule}

    def to_json(self) -> dict[str, Any]:
        return {
            "apiVersion": "xctl/v1",
            "kind": "RuleTestReport",
            "passed": self.passed,
            "failed": self.failed,
            "errors": [_error_json(e) for e in self.errors],
            "items": [r.to_json() for r in self.results],
        }


def _error_json(error: RuleError) -> dict[str, Any]:
    if isinstance(error, RuleFileError):
        return error.to_json()
    return {"path": None, "line": None, "message": str(error)}


# ---------------------------------------------------------------------- parsing
def _case_items(data: Any, problems: Problems) -> list[tuple[int | None, Any]]:
    if not isinstance(data, LineMap):
        problems.add(None, "a rule-test file holds `cases:` (a list of cases) or a single case with `expect:`")
        return []
    if "cases" in data:
        for key in data:
            if key not in ("cases", "version") and not (isinstance(key, str) and key.startswith("x-")):
                problems.add(data.line_of(key), f"unknown top-level key {key!r} next to `cases:`")
        cases = data["cases"]
        if not isinstance(cases, LineList) or not cases:
            problems.add(data.line_of("cases"), "cases: expected a non-empty list of cases")
            return []
        return list(cases.numbered())
    return [(data.line, data)]


def check_case_file(data: Any, source: str) -> list[RuleFileError]:
    """Schema problems of a parsed rule-test file (for ``lint``)."""
    problems = Problems(source)
    for line, item in _case_items(data, problems):
        _parse_case(item, line, problems)
    return problems.items


def load_cases(path: Path) -> tuple[list[RuleCase], list[RuleError]]:
    """Cases from a file, or from the rule-test files of a directory (rule files are skipped)."""
    cases: list[RuleCase] = []
    errors: list[RuleError] = []
    if not path.exists():
        return [], [RuleFileError(str(path), None, "no such file or directory")]
    for file in rule_files(path):
        try:
            data = read_yaml(file)
        except RuleFileError as exc:
            errors.append(exc)
            continue
        kind = file_kind(data)
        if kind == "rules":
            continue
        problems = Problems(str(file))
        if kind != "cases":
            problems.add(None, "not a rule-test file: expected `cases:` or a case with `expect:`")
        for line, item in _case_items(data, problems) if kind == "cases" else []:
            case = _parse_case(item, line, problems)
            if case is not None:
                cases.append(case)
        errors.extend(problems.items)
    return cases, errors


def _parse_case(item: Any, line: int | None, problems: Problems) -> RuleCase | None:
    if not isinstance(item, LineMap):
        problems.add(line, "a case must be a mapping with name, events, target and expect")
        return None
    before = len(problems)
    line = item.line
    for key in item:
        if key not in CASE_KEYS and not (isinstance(key, str) and key.startswith("x-")):
            problems.add(item.line_of(key), f"unknown case key {key!r}; use {', '.join(CASE_KEYS)}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.add(item.line_of("name"), "case: `name` (a non-empty string) is required")
        name = f"case at line {line}"
    default_node = item.get("node")
    if default_node is not None and not isinstance(default_node, str):
        problems.add(item.line_of("node"), "node: expected a node name")
        default_node = None
    jobs = _parse_jobs(item.get("jobs"), item.line_of("jobs"), problems)
    events: list[tuple[int, int, str, Event]] = []
    order = 0
    for job in jobs:
        for ev in _job_events(job):
            events.append((ev[1].ts, order, ev[0], ev[1]))
            order += 1
    raw_events = item.get("events")
    if raw_events is None and not jobs:
        problems.add(line, f"case {name!r}: `events` is required")
    elif raw_events is not None and not isinstance(raw_events, LineList):
        problems.add(item.line_of("events"), "events: expected a list of events")
    elif raw_events is not None:
        by_id = {j.id: j for j in jobs}
        for ev_line, raw in raw_events.numbered():
            for node, event in _parse_event(raw, ev_line, default_node, by_id, problems):
                events.append((event.ts, order, node, event))
                order += 1
    silent = item.get("silent_nodes", [])
    if not isinstance(silent, list) or not all(isinstance(n, str) for n in silent):
        problems.add(item.line_of("silent_nodes"), "silent_nodes: expected a list of node names")
        silent = []
    advance = item.get("advance", 0)
    if isinstance(advance, bool) or not isinstance(advance, int | float) or not 0 <= advance <= 86_400:
        problems.add(item.line_of("advance"), "advance: seconds (0 to 86400) to move the clock after the events")
        advance = 0
    target = _parse_target(item.get("target"), item.line_of("target"), problems)
    expect = _parse_expect(item.get("expect"), item.line_of("expect"), problems)
    if len(problems) > before or target is None or expect is None:
        return None
    events.sort(key=lambda e: (e[0], e[1]))
    return RuleCase(
        name=name,
        source=problems.source,
        line=line,
        events=tuple((node, ev) for _, _, node, ev in events),
        silent_nodes=frozenset(silent),
        advance_ms=round(advance * 1000),
        target=target,
        expect=expect,
    )


def _seconds_to_ts(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not -86_400 * 365 <= value <= 86_400 * 365:
        return None
    return T0_MS + round(value * 1000)


def _parse_jobs(value: Any, line: int | None, problems: Problems) -> list[JobSpec]:
    if value is None:
        return []
    if not isinstance(value, LineList):
        problems.add(line, "jobs: expected a list of {id, nodes, ranks_per_node, at, util}")
        return []
    out: list[JobSpec] = []
    for ln, raw in value.numbered():
        if not isinstance(raw, LineMap):
            problems.add(ln, "jobs: each job is a mapping {id, nodes, ranks_per_node, at, util}")
            continue
        for key in raw:
            if key not in JOB_KEYS:
                problems.add(raw.line_of(key), f"jobs: unknown key {key!r}; use {', '.join(JOB_KEYS)}")
        jid = raw.get("id")
        nodes = raw.get("nodes", 1)
        if isinstance(nodes, int) and not isinstance(nodes, bool) and 1 <= nodes <= 256:
            node_names = tuple(f"node{i}" for i in range(nodes))
        elif isinstance(nodes, list) and nodes and all(isinstance(n, str) and n for n in nodes):
            node_names = tuple(nodes)
        else:
            problems.add(raw.line_of("nodes"), "jobs: nodes is a count (1-256) or a list of node names")
            continue
        per = raw.get("ranks_per_node", 1)
        at = _seconds_to_ts(raw.get("at", 0))
        util = raw.get("util", 97.0)
        pid_base = raw.get("pid_base", 4800)
        pname = raw.get("name", "python3")
        if not isinstance(jid, str) or not jid:
            problems.add(raw.line_of("id"), "jobs: id (the job id) is required")
        elif isinstance(per, bool) or not isinstance(per, int) or not 1 <= per <= 64:
            problems.add(raw.line_of("ranks_per_node"), "jobs: ranks_per_node is an integer from 1 to 64")
        elif at is None:
            problems.add(raw.line_of("at"), "jobs: at is seconds from the case start")
        elif isinstance(util, bool) or not isinstance(util, int | float):
            problems.add(raw.line_of("util"), "jobs: util is a GPU utilisation percent")
        elif isinstance(pid_base, bool) or not isinstance(pid_base, int) or not 1 < pid_base < 2**31 - 64:
            problems.add(raw.line_of("pid_base"), "jobs: pid_base is a pid")
        elif not isinstance(pname, str) or not pname:
            problems.add(raw.line_of("name"), "jobs: name is a process name")
        else:
            out.append(JobSpec(jid, node_names, per, at, float(util), pid_base, pname))
    return out


def _job_events(job: JobSpec) -> list[tuple[str, Event]]:
    """What a healthy rank looks like: start, busy GPU, memory in use, NIC moving data."""
    world = len(job.nodes) * job.ranks_per_node
    out: list[tuple[str, Event]] = []
    for node, local, rank, pid in job.ranks():
        attrs: dict[str, AttrValue] = {
            "name": job.name,
            "cmdline": f"{job.name} train.py --rank {rank}",
            "create_time": job.at_ms / 1000 + local,
            "ppid": job.pid_base - 100,
            "rank": rank,
            "local_rank": local,
            "world_size": world,
        }
        ts = job.at_ms
        out.append((node, Event(ts, EventType.PROCESS_STATE, job.name, "start", pid, job.id, attrs)))
        out.append((node, Event(ts, EventType.COMPUTE_UTIL, f"gpu-{local}", f"{job.util:g}", pid, job.id)))
        mem = {"used_mib": 64_000, "total_mib": 81_559}
        out.append((node, Event(ts, EventType.COMPUTE_MEM, f"gpu-{local}", "78", pid, job.id, mem)))
        out.append((node, Event(ts, EventType.TRANSPORT_BW, f"mlx5_{local}", "190.5", pid, job.id)))
    return out


def _substitute(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, replacement in subs.items():
            value = value.replace(key, replacement)
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, subs) for k, v in value.items()}
    return value


def _parse_event(
    raw: Any, line: int, default_node: str | None, jobs: dict[str, JobSpec], problems: Problems
) -> list[tuple[str, Event]]:
    if not isinstance(raw, LineMap):
        problems.add(line, "events: each event is a mapping {node, t, type, entity, value, pid, job, attrs}")
        return []
    for key in raw:
        if key not in EVENT_KEYS:
            problems.add(raw.line_of(key), f"event: unknown key {key!r}; use {', '.join(EVENT_KEYS[:12])}")
            return []
    if "t" in raw and "ts" in raw:
        problems.add(line, "event: give either t (seconds from the case start) or ts (ms since the epoch)")
        return []
    if "ts" in raw:
        ts = raw["ts"]
        if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
            problems.add(raw.line_of("ts"), "event: ts is integer milliseconds since the epoch")
            return []
    else:
        t = _seconds_to_ts(raw.get("t", 0))
        if t is None:
            problems.add(raw.line_of("t"), "event: t is seconds from the case start (a number)")
            return []
        ts = t
    body = {k: v for k, v in raw.items() if k not in ("node", "t", "ts", "each_rank", "except", "nodes")}
    body["ts"] = ts
    targets: list[tuple[str, dict[str, str]]]
    if "each_rank" in raw:
        job = jobs.get(raw["each_rank"]) if isinstance(raw["each_rank"], str) else None
        if job is None:
            problems.add(raw.line_of("each_rank"), f"event: each_rank names a job declared under `jobs:`, "
                         f"got {raw['each_rank']!r}")
            return []
        skip = raw.get("except", [])
        only = raw.get("nodes")
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            problems.add(raw.line_of("except"), "event: except is a list of node:pid")
            return []
        if only is not None and (not isinstance(only, list) or not all(isinstance(n, str) for n in only)):
            problems.add(raw.line_of("nodes"), "event: nodes is a list of node names")
            return []
        targets = []
        body.setdefault("pid", "{pid}")
        body.setdefault("job", job.id)
        for node, local, rank, pid in job.ranks():
            if f"{node}:{pid}" in skip or (only is not None and node not in only):
                continue
            subs = {
                "{node}": node, "{pid}": str(pid), "{rank}": str(rank), "{local}": str(local),
                "{gpu}": f"gpu-{local}", "{nic}": f"mlx5_{local}", "{job}": job.id,
            }
            targets.append((node, subs))
    else:
        named = raw.get("node", default_node)
        if not isinstance(named, str) or not named:
            problems.add(line, "event: node is required (or set `node:` on the case)")
            return []
        targets = [(named, {})]
    out: list[tuple[str, Event]] = []
    for node, subs in targets:
        obj = _substitute(body, subs)
        if isinstance(obj.get("pid"), str) and obj["pid"].isdigit():
            obj["pid"] = int(obj["pid"])
        try:
            out.append((node, event_from_mapping(obj, now_ms=ts)))
        except EventError as exc:
            problems.add(line, f"event: {exc}")
            return []
    return out


def _parse_target(value: Any, line: int | None, problems: Problems) -> Target | None:
    if not isinstance(value, str):
        problems.add(line, "target: required, as node:pid or job:ID")
        return None
    try:
        target = parse_target(value)
    except XctlError as exc:
        problems.add(line, f"target: {exc}")
        return None
    if target.job is None and target.node is None:
        problems.add(line, "target: name the node (node:pid) so the case does not depend on pid uniqueness")
        return None
    return target


def _parse_expect(value: Any, line: int | None, problems: Problems) -> Expectation | None:
    if not isinstance(value, LineMap) or "rule" not in value:
        problems.add(line, "expect: required, with at least `rule:` (a rule id, or null for no rule)")
        return None
    ok = True
    for key in value:
        if key not in EXPECT_KEYS:
            problems.add(value.line_of(key), f"expect: unknown key {key!r}; use {', '.join(EXPECT_KEYS)}")
            ok = False
    rule = value["rule"]
    if rule is not None and not isinstance(rule, str):
        problems.add(value.line_of("rule"), "expect: rule is a rule id or null")
        ok = False
    root: object = _UNSET
    if "root_cause" in value:
        raw = value["root_cause"]
        if raw is None:
            root = None
        elif isinstance(raw, LineMap) and raw and all(k in ROOT_KEYS for k in raw):
            root = dict(raw)
        else:
            problems.add(value.line_of("root_cause"), f"expect: root_cause is null or a mapping of "
                         f"{', '.join(ROOT_KEYS)}")
            ok = False
    strings: dict[str, str | None] = {}
    for key, choices in (("verdict", None), ("action", tuple(ACTIONS)), ("severity", SEVERITIES)):
        got = value.get(key)
        site_action = key == "action" and isinstance(got, str) and SITE_ACTION.match(got) is not None
        allowed = None if site_action else choices
        if got is not None and (not isinstance(got, str) or (allowed is not None and got not in allowed)):
            problems.add(value.line_of(key), f"expect: {key} {got!r} is not valid")
            ok = False
            got = None
        strings[key] = got
    if not ok:
        return None
    return Expectation(rule, root, strings["verdict"], strings["action"], strings["severity"])


# ---------------------------------------------------------------------- running
def build_cluster(case: RuleCase) -> ClusterGraph:
    """The case's cluster after its events, the clock advance and the heartbeats."""
    first = case.events[0][1].ts if case.events else T0_MS
    clock = ManualClock(min(first, T0_MS))
    cluster = ClusterGraph(clock)
    for node, event in case.events:
        clock.now = max(clock.now, event.ts)
        cluster.apply(node, event)
    clock.advance(case.advance_ms)
    for node in sorted(cluster.nodes):
        if node not in case.silent_nodes:
            cluster.seen(node)
    return cluster


def run_case(case: RuleCase, engine: Engine) -> CaseResult:
    """Run one case; a failure says why in ``reason``."""
    expected_rule = case.expect.rule if isinstance(case.expect.rule, str) else None

    def result(passed: bool, reason: str, **more: Any) -> CaseResult:
        return CaseResult(case.name, case.source, case.line, passed, reason, expected_rule, **more)

    try:
        cluster = build_cluster(case)
        exp = explain(cluster, case.target)
        facts = engine.facts(exp, cluster)
        enriched = engine.enrich(exp, cluster)
    except XctlError as exc:
        return result(False, f"why failed: {exc}")
    got_rule = enriched.rule.id if enriched.rule is not None else None
    root = _root_json(enriched)
    problems = _compare(case, enriched, root)
    if problems and case.expect.rule is not _UNSET and got_rule != case.expect.rule:
        ranked = engine.matches(facts)[:4]
        shown = ", ".join(f"{m.rule.id} ({m.specificity})" for m in ranked) or "none"
        problems.append(f"matching rules, best first: {shown}")
    return result(not problems, "; ".join(problems), rule=got_rule, root=root, verdict=enriched.verdict)


def _root_json(exp: Explanation) -> dict[str, Any] | None:
    if exp.root is None:
        return None
    r = exp.root
    out: dict[str, Any] = {"node": r.node, "entity": r.entity, "code": r.code, "kind": r.kind.value}
    if r.pid is not None:
        out["pid"] = r.pid
    return out


def _compare(case: RuleCase, exp: Explanation, root: dict[str, Any] | None) -> list[str]:
    expect = case.expect
    problems: list[str] = []
    got_rule = exp.rule.id if exp.rule is not None else None
    where = f"root cause {root['node']}/{root['entity']} {root['code']}" if root else "no root cause"
    if expect.rule is not _UNSET and got_rule != expect.rule:
        problems.append(f"expected rule {expect.rule or 'none'}, got {got_rule or 'none'} ({where})")
    if expect.root is None and root is not None:
        problems.append(f"expected no root cause, got {where}")
    elif isinstance(expect.root, dict):
        if root is None:
            problems.append("expected a root cause, got none")
        else:
            wrong = [
                f"{k}={root.get(k)!r} (expected {v!r})"
                for k, v in sorted(expect.root.items())
                if str(root.get(k)) != str(v)
            ]
            if wrong:
                problems.append("root cause " + ", ".join(wrong))
    if expect.verdict is not None and exp.verdict != expect.verdict:
        problems.append(f"verdict {exp.verdict!r} (expected {expect.verdict!r})")
    if expect.action is not None and (exp.rule is None or exp.rule.action != expect.action):
        problems.append(f"action {exp.rule.action if exp.rule else None!r} (expected {expect.action!r})")
    if expect.severity is not None and (exp.rule is None or exp.rule.severity != expect.severity):
        problems.append(f"severity {exp.rule.severity if exp.rule else None!r} (expected {expect.severity!r})")
    return problems


def run_tests(path: Path, *, ruleset: RuleSet | None = None) -> TestReport:
    """Run the rule test cases in ``path`` (a file or a directory).

    With no ``ruleset``, the built-in rules are used, overridden by any rule files found in
    ``path`` when it is a directory (so operators keep rules and their tests together).
    """
    if ruleset is None:
        ruleset = load_rules([path] if path.is_dir() else [])
    report = TestReport(errors=list(ruleset.errors))
    cases, errors = load_cases(path)
    report.errors.extend(errors)
    engine = Engine(ruleset)
    known = set(ruleset.ids)
    for case in cases:
        if isinstance(case.expect.rule, str) and case.expect.rule not in known:
            report.results.append(
                CaseResult(case.name, case.source, case.line, False, f"rule {case.expect.rule!r} is not loaded",
                           case.expect.rule)
            )
            continue
        report.results.append(run_case(case, engine))
    log.debug("rules: %d case(s) passed, %d failed", report.passed, report.failed)
    return report
