"""The built-in knowledge base: it loads, every rule has a passing test case, and the rule
test runner reports failures usefully."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from xctl.rules import ACTIONS, SCENES, SEVERITIES, load_cases, load_rules, run_tests

CASES = Path(__file__).parents[1] / "fixtures" / "rules" / "cases"

#: The scenario kinds of test_why_scenarios.py and the built-in rule each must match.
SCENARIO_RULES = {
    "XID 79 in a four-node job, asked from a victim rank on another node": "xid-79-fell-off-bus",
    "double-bit ECC then row remap blames the ECC error and asks for drain and reset": "xid-48-row-remapped",
    "application fault XID 13 on one rank blames the application": "xid-13-graphics-exception",
    "XID 31 repeated on one GPU across three jobs is the GPU": "xid-app-fault-persists-on-gpu",
    "a single XID 31 is the application": "xid-31-mmu-fault",
    "NVLink down, with XID 74 on the peer GPU not blamed": "nvlink-down",
    "thermally throttled straggler whose peers idle": "gpu-thermal-straggler",
    "PCIe link degraded to x4": "pcie-link-degraded",
    "RDMA link flap, asked from a peer on another node": "net-link-flap",
    "slow NVMe during a checkpoint": "storage-slow-during-checkpoint",
    "host OOM kill of the wrong victim blames the memory hog": "host-oom-memory-hog",
    "zombie holding GPU memory": "zombie-holding-gpu-memory",
    "a node that went silent mid-job": "node-down",
    "a job target explains the whole job": "xid-79-fell-off-bus",
}


@pytest.fixture(scope="module")
def report() -> object:
    return run_tests(CASES)


def test_every_builtin_case_passes(report: object) -> None:
    from xctl.rules import TestReport

    assert isinstance(report, TestReport)
    failures = [f"{r.source}:{r.line} {r.name}: {r.reason}" for r in report.results if not r.passed]
    assert failures == []
    assert report.errors == []
    assert report.ok
    assert report.passed >= 70


def test_every_builtin_rule_has_a_passing_case(report: object) -> None:
    from xctl.rules import TestReport

    assert isinstance(report, TestReport)
    ruleset = load_rules([])
    assert set(ruleset.ids) - report.rules_covered() == set()


def test_the_twelve_scenario_kinds_match_builtin_rules(report: object) -> None:
    from xctl.rules import TestReport

    assert isinstance(report, TestReport)
    by_name = {r.name: r for r in report.results}
    for name, rule_id in SCENARIO_RULES.items():
        result = by_name[name]
        assert result.passed, f"{name}: {result.reason}"
        assert result.rule == rule_id


def test_builtin_rules_use_the_documented_vocabulary() -> None:
    ruleset = load_rules([])
    for rule in ruleset.rules:
        assert rule.scene in SCENES
        assert rule.severity in SEVERITIES
        assert rule.action in ACTIONS
        assert rule.steps
        assert rule.description
    parts = [r.id.split("-") for r in ruleset.rules]
    xids = {int(p[1]) for p in parts if p[0] == "xid" and p[1].isdigit()}
    must = {8, 13, 31, 32, 38, 43, 48, 61, 62, 63, 68, 69, 74, 79, 92, 94, 95, 109, 110, 119, 120, 140, 143, 154}
    assert must <= xids
    assert ruleset.get("row-remap-failure") is not None  # XID 64


def test_docs_list_every_fact_family_and_action() -> None:
    from xctl.rules import ACTIONS, FACTS, FAMILIES

    docs = (Path(__file__).parents[2] / "docs" / "rules.md").read_text(encoding="utf-8")
    for name in [*FACTS, *(spec.name for spec in FAMILIES.values()), *ACTIONS, *SCENES]:
        assert f"`{name}`" in docs, name


# ---------------------------------------------------------------------- the runner
def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_a_failing_case_says_why(tmp_path: Path) -> None:
    write(tmp_path, "cases.yaml", """\
        cases:
          - name: wrong expectation
            node: node0
            jobs: [{id: job-1, ranks_per_node: 2}]
            events:
              - {t: 5, type: error.hw, entity: gpu-1, value: XID_79}
            target: node0:4801
            expect:
              rule: xid-48-double-bit-ecc
              root_cause: {node: node0, entity: gpu-0, code: XID_79}
              verdict: exited
          - name: unknown rule
            node: node0
            jobs: [{id: job-1, ranks_per_node: 1}]
            target: node0:4800
            expect: {rule: no-such-rule}
          - name: no such process
            node: node0
            jobs: [{id: job-1, ranks_per_node: 1}]
            target: node0:9999
            expect: {rule: null}
        """)
    report = run_tests(tmp_path)
    assert not report.ok
    first, second, third = report.results
    assert not first.passed
    assert first.line == 2
    assert first.rule == "xid-79-fell-off-bus"
    assert "expected rule xid-48-double-bit-ecc, got xid-79-fell-off-bus" in first.reason
    assert "entity='gpu-1' (expected 'gpu-0')" in first.reason
    assert "verdict 'blocked' (expected 'exited')" in first.reason
    assert "matching rules, best first: xid-79-fell-off-bus (1)" in first.reason
    assert second.reason == "rule 'no-such-rule' is not loaded"
    assert third.reason.startswith("why failed: no process 9999 on node0")
    assert report.to_json()["failed"] == 3


def test_site_rules_next_to_their_cases_are_used(tmp_path: Path) -> None:
    write(tmp_path, "rules.yaml", """\
        rules:
          - id: site-xid-79
            scene: GpuError
            severity: fatal
            priority: 100
            conditions:
              - root.code: XID_79
              - root.node: "re:^gpu-rack-7-"
            summary: "rack 7 again: {root.node}"
            action: SITE_CALL_VENDOR
            steps: ["call the vendor"]
        """)
    write(tmp_path, "cases.yaml", """\
        cases:
          - name: rack 7 has its own procedure
            node: gpu-rack-7-n3
            jobs: [{id: j, nodes: [gpu-rack-7-n3], ranks_per_node: 1}]
            events: [{t: 1, type: error.hw, entity: gpu-0, value: XID_79}]
            target: gpu-rack-7-n3:4800
            expect: {rule: site-xid-79, action: SITE_CALL_VENDOR}
          - name: elsewhere the built-in applies
            node: node1
            jobs: [{id: j, nodes: [node1], ranks_per_node: 1}]
            events: [{t: 1, type: error.hw, entity: gpu-0, value: XID_79}]
            target: node1:4800
            expect: {rule: xid-79-fell-off-bus}
        """)
    report = run_tests(tmp_path)
    assert [r.reason for r in report.results] == ["", ""]
    assert report.ok


def test_bad_case_files_are_errors_with_lines(tmp_path: Path) -> None:
    write(tmp_path, "bad.yaml", """\
        cases:
          - name: broken
            events:
              - {t: soon, node: node0, type: error.hw, entity: gpu-0, value: XID_79}
              - {t: 1, node: node0, type: error.bogus, entity: gpu-0, value: XID_79}
              - {t: 1, type: error.hw, entity: gpu-0, value: XID_79}
            target: 4800
            expect: {rule: x, colour: red}
        """)
    cases, errors = load_cases(tmp_path)
    assert cases == []
    found = [(e.line, e.detail.split(":")[0]) for e in errors]  # type: ignore[attr-defined]
    assert found == [(4, "event"), (5, "event"), (6, "event"), (7, "target"), (8, "expect")]
    assert "unknown event type" in str(errors[1])
    report = run_tests(tmp_path)
    assert not report.ok and report.results == [] and len(report.errors) == 5


def test_each_rank_expansion_and_silent_nodes(tmp_path: Path) -> None:
    write(tmp_path, "c.yaml", """\
        name: two nodes, one silent
        jobs: [{id: j, nodes: 2, ranks_per_node: 2}]
        silent_nodes: [node1]
        advance: 45
        events:
          - {t: 1, each_rank: j, nodes: [node0], type: compute.util, entity: "{gpu}", value: 0}
        target: job:j
        expect: {rule: node-down, root_cause: {node: node1, code: NODE_DOWN}}
        """)
    (case,), errors = load_cases(tmp_path)
    assert errors == []
    assert case.silent_nodes == frozenset({"node1"})
    assert case.advance_ms == 45_000
    util = [(n, ev.entity, ev.pid) for n, ev in case.events if ev.type.value == "compute.util" and ev.value == "0"]
    assert util == [("node0", "gpu-0", 4800), ("node0", "gpu-1", 4801)]
    report = run_tests(tmp_path)
    assert report.ok, [r.reason for r in report.results]
