"""Facts and matching: repeat patterns, co-occurrence windows, ranking, the Enricher hook."""

from __future__ import annotations

import random
import textwrap
from collections.abc import Callable

import pytest
from _scenario import Scenario

from xctl.core.cluster import ClusterGraph
from xctl.core.events import EventType
from xctl.core.targets import Target
from xctl.core.why import Explanation, explain
from xctl.rules import Engine, Rule, compute, entity_class, load_rules
from xctl.rules._yaml import parse_yaml
from xctl.rules.facts import recovery_action
from xctl.rules.schema import parse_rule_file

Enricher = Callable[[Explanation, ClusterGraph], Explanation]


def rules(text: str) -> list[Rule]:
    parsed, errors = parse_rule_file(parse_yaml(textwrap.dedent(text), "t.yaml"), "t.yaml")
    assert errors == [], [str(e) for e in errors]
    return parsed


def rule(rule_id: str, conditions: str, *, priority: int = 0, severity: str = "warning") -> str:
    body = textwrap.indent(textwrap.dedent(conditions), " " * 6)
    return (
        f"  - id: {rule_id}\n    scene: GpuError\n    severity: {severity}\n    priority: {priority}\n"
        f"    conditions:\n{body}    summary: '{rule_id}: {{root.code}} on {{root.node}}/{{root.entity}}'\n"
        f"    action: CHECK_APP\n    steps: [look]\n"
    )


def xid_on_rank(s: Scenario, xid: int, *, node: str = "node0", local: int = 1, job: str | None = None) -> None:
    s.emit(node, EventType.ERROR_HW, f"gpu-{local}", f"XID_{xid}", s.pid(local), job or s.job, xid=xid)


def stall(s: Scenario, node: str, local: int) -> None:
    """The asked-about rank idles at a collective: it waits on its peers."""
    s.emit(node, EventType.COMPUTE_UTIL, f"gpu-{local}", "0", s.pid(local), s.job)


def why(s: Scenario, node: str, pid: int) -> Explanation:
    return explain(s.cluster, Target(node=node, pid=pid))


# ---------------------------------------------------------------------- facts
def test_repeat_across_jobs_fact_counts_distinct_jobs_on_one_gpu() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    for job in ("job-a", "job-b", "job-a", "job-c"):
        s.start_job(job=job)
        s.advance(1_000)
        xid_on_rank(s, 13, job=job)
        s.advance(30_000)
    exp = why(s, "node0", s.pid(1))
    facts = compute(exp, s.cluster)
    assert facts.get("root.code") == "XID_13"
    assert facts.get("root.repeat_jobs") == 3
    assert facts.get("root.repeat_count") == 4
    assert facts.get("root.count") == 4


def test_same_code_across_gpus_of_one_job() -> None:
    s = Scenario(nodes=2, ranks_per_node=4)
    s.start_job()
    s.advance(1_000)
    xid_on_rank(s, 31, node="node0", local=1)
    xid_on_rank(s, 31, node="node1", local=2)
    xid_on_rank(s, 31, node="node1", local=3)
    stall(s, "node0", 0)
    facts = compute(why(s, "node0", s.pid(0)), s.cluster)
    assert facts.get("job.gpus_with_root_code") == 3
    assert facts.get("job.nodes_with_root_code") == 2
    assert facts.get("root.repeat_jobs") == 1


def test_cooccurrence_window_on_the_root_node() -> None:
    s = Scenario(nodes=2, ranks_per_node=4)
    s.start_job()
    s.advance(5_000)
    xid_on_rank(s, 48, local=2)
    s.advance(59_000)
    s.emit("node0", EventType.ERROR_HW, "gpu-2", "XID_63")  # 59 s later, same GPU: inside
    s.emit("node0", EventType.ERROR_HW, "gpu-3", "XID_94")  # same node, another GPU
    s.advance(2_000)
    s.emit("node0", EventType.ERROR_HW, "gpu-1", "XID_92")  # 61 s later: outside
    s.emit("node1", EventType.ERROR_HW, "gpu-2", "XID_64")  # another node: never
    facts = compute(why(s, "node0", s.pid(2)), s.cluster)
    assert facts.get("root.code") == "XID_48"
    assert facts.get("cooccurs.XID_63") is True
    assert facts.get("cooccurs_entity.XID_63") is True
    assert facts.get("cooccurs.XID_94") is True
    assert facts.get("cooccurs_entity.XID_94") is False
    assert facts.get("cooccurs.XID_92") is False
    assert facts.get("gap_s.XID_92") == 61.0
    assert facts.get("offset_s.XID_63") == 59.0
    assert facts.get("cooccurs.XID_64") is False
    assert facts.get("gap_s.XID_64") is None
    wide = Engine([], cooccur_window_ms=120_000).facts(why(s, "node0", s.pid(2)), s.cluster)
    assert wide.get("cooccurs.XID_92") is True


def test_earlier_errors_have_negative_offsets() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    s.emit("node0", EventType.ERROR_HW, "gpu-0", "CLOCK_EVENT_SW_POWER_CAP")
    s.advance(10_000)
    xid_on_rank(s, 79, local=1)
    facts = compute(why(s, "node0", s.pid(1)), s.cluster)
    assert facts.get("root.code") == "XID_79"
    assert facts.get("offset_s.CLOCK_EVENT_SW_POWER_CAP") == -10.0
    assert facts.get("node.count.CLOCK_EVENT_SW_POWER_CAP") == 1


def test_job_pattern_facts() -> None:
    s = Scenario(nodes=2, ranks_per_node=2)
    s.start_job()
    s.advance(1_000)
    s.emit("node1", EventType.PROCESS_STATE, "python3", "exit", s.pid(1), s.job, exit_code=1)
    s.advance(1_000)
    s.emit("node0", EventType.PROCESS_STATE, "python3", "exit", s.pid(0), s.job, exit_code=1)
    s.advance(10_000)
    s.emit("node1", EventType.ERROR_NET, s.job, "NCCL_TIMEOUT", s.pid(0), s.job)
    s.emit("node0", EventType.PROCESS_STATE, "python3", "hung", s.pid(1), s.job)
    s.heartbeat_all()
    facts = compute(why(s, "node1", s.pid(0)), s.cluster)
    assert facts.get("job.ranks_total") == 4
    assert facts.get("job.ranks_exited") == 2
    assert facts.get("job.ranks_hung") == 1
    assert facts.get("job.ranks_waiting") == 1
    assert facts.get("job.first_exit_rank") == 3
    assert facts.get("job.first_exit_node") == "node1"
    assert facts.get("root.first_exit") is True
    assert facts.get("job.nodes_dead") == 0
    assert facts.get("target.waiting_on_job") is True
    assert facts.get("verdict") == "waiting"


def test_entity_classes() -> None:
    cases = {
        "gpu-3": "gpu", "gpu-1/nvlink-2": "nvlink", "gpu-2/pcie": "pcie", "mlx5_4": "nic", "ib0": "nic",
        "eth0": "nic", "nvme0n1": "storage", "nfs:/data": "storage", "node": "node", "pid:42": "process",
        "sysmem": "sysmem", "nvswitch-1": "nvswitch", "0000:8a:00.0": "pcie", "psu-1": "psu", "probe:nvml": "probe",
        "mystery": "other",
    }
    assert {e: entity_class(e) for e in cases} == cases
    assert entity_class("job-42", job="job-42") == "job"


@pytest.mark.parametrize(
    ("attrs", "action"),
    [
        ({"raw": "154, GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)"}, "GPU_RESET"),
        ({"raw": "154, GPU recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)"}, "NODE_REBOOT"),
        ({"raw": "recovery action changed to Drain and Reset"}, "DRAIN_AND_RESET"),
        ({"recovery_action": 3}, "DRAIN_P2P"),
        ({"recovery_action": "drain and reset"}, "DRAIN_AND_RESET"),
        ({"raw": "154, GPU recovery action changed"}, None),
        ({}, None),
    ],
)
def test_xid154_recovery_action(attrs: dict[str, object], action: str | None) -> None:
    assert recovery_action(attrs) == action


# ---------------------------------------------------------------------- matching
THREE = (
    "rules:\n"
    + rule("a-generic", "- root.code: 're:^XID_'\n")
    + rule("by-code", "- root.code: XID_13\n")
    + rule("repeat", "- root.code: XID_13\n- root.repeat_jobs: {gte: 2}\n")
)


def test_most_specific_rule_wins() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    engine = Engine(rules(THREE))
    s.start_job(job="job-a")
    xid_on_rank(s, 13, job="job-a")
    once = why(s, "node0", s.pid(1))
    assert [m.rule.id for m in engine.matches(engine.facts(once, s.cluster))] == ["a-generic", "by-code"]
    s.advance(60_000)
    s.start_job(job="job-b")
    xid_on_rank(s, 13, job="job-b")
    twice = why(s, "node0", s.pid(1))
    ranked = engine.matches(engine.facts(twice, s.cluster))
    assert [(m.rule.id, m.specificity) for m in ranked] == [("repeat", 2), ("a-generic", 1), ("by-code", 1)]
    enriched = engine.enrich(twice, s.cluster)
    assert enriched.rule is not None
    assert enriched.rule.id == "repeat"
    assert enriched.rule.summary == "repeat: XID_13 on node0/gpu-1"


def test_ties_break_on_priority_then_severity_then_id() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    xid_on_rank(s, 13)
    exp = why(s, "node0", s.pid(1))

    def best(text: str) -> str | None:
        match = Engine(rules("rules:\n" + text)).match(exp, s.cluster)
        return match.id if match else None

    one = "- root.code: XID_13\n"
    assert best(rule("b", one) + rule("a", one)) == "a"
    assert best(rule("b", one, severity="critical") + rule("a", one)) == "b"
    assert best(rule("b", one, severity="critical") + rule("a", one, priority=1)) == "a"
    two = one + "- root.kind: application\n"
    assert best(rule("a", one, priority=100, severity="fatal") + rule("z", two)) == "z"


def test_matching_is_deterministic_whatever_the_rule_order() -> None:
    s = Scenario(nodes=2, ranks_per_node=4)
    s.start_job()
    xid_on_rank(s, 48, local=2)
    s.emit("node0", EventType.ERROR_HW, "gpu-2", "XID_63")
    stall(s, "node1", 0)
    ruleset = load_rules([])
    exp = why(s, "node1", s.pid(0))
    expected = Engine(ruleset).enrich(exp, s.cluster).rule
    assert expected is not None and expected.id == "xid-48-row-remapped"
    shuffled = list(ruleset.rules)
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert Engine(shuffled).enrich(exp, s.cluster).rule == expected


def test_enrich_is_the_enricher_hook_and_leaves_unmatched_explanations_alone() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    engine = Engine(load_rules([]))
    hook: Enricher = engine.enrich
    healthy = why(s, "node0", s.pid(0))
    assert hook(healthy, s.cluster) is healthy
    assert engine(healthy, s.cluster) is healthy
    xid_on_rank(s, 79)
    exp = hook(why(s, "node0", s.pid(1)), s.cluster)
    assert exp.rule is not None
    assert (exp.rule.id, exp.rule.severity, exp.rule.action) == ("xid-79-fell-off-bus", "fatal", "RESTART_BM")
    assert exp.rule.steps and all("{" not in step for step in exp.rule.steps)
    assert exp.to_json()["rule"]["id"] == "xid-79-fell-off-bus"
    assert "rule: xid-79-fell-off-bus severity=fatal action=RESTART_BM" in exp.to_text()


def test_enrich_never_raises(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    xid_on_rank(s, 79)
    exp = why(s, "node0", s.pid(1))

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("bug in a fact")

    monkeypatch.setattr("xctl.rules.engine.compute", boom)
    assert Engine(load_rules([])).enrich(exp, s.cluster) is exp
    assert "matching failed" in caplog.text


def test_missing_placeholders_render_as_question_marks() -> None:
    s = Scenario(nodes=1, ranks_per_node=2)
    s.start_job()
    s.emit("node0", EventType.TOPO_LINK_DOWN, "gpu-1/pcie", "PCIE_DEGRADED")  # no width attrs
    exp = Engine(load_rules([])).enrich(why(s, "node0", s.pid(1)), s.cluster)
    assert exp.rule is not None and exp.rule.id == "pcie-link-degraded"
    assert "runs at x? gen ? instead of x? gen ?" in exp.rule.summary
