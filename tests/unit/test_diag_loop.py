"""The LLM loop's bounds and the read-only tools, with a scripted transport and an in-memory
query service (the real HTTP server and aggregator are in tests/integration/test_diag.py)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from xctl.core.errors import NotFoundError, UsageError
from xctl.diag import TOOL_NAMES, LLMConfig, LLMError, Refs, ToolBox, diagnose, run_loop
from xctl.diag.llm import MAX_CALLS_PER_TURN, LoopResult
from xctl.diag.tools import MAX_EVENTS, MAX_RESULT_CHARS, MAX_SINCE_S

NOW = 1_800_000_000_000
XID_TS = NOW - 60_000

WHY: dict[str, Any] = {
    "apiVersion": "xctl/v1",
    "kind": "Why",
    "target": {"node": "node-2", "pid": 4802, "name": "python3", "job": "job-42", "rank": 6, "state": "running"},
    "verdict": "waiting",
    "root_cause": {
        "node": "node-2", "entity": "gpu-3", "kind": "hardware", "code": "XID_79", "first_seen": "…",
        "first_seen_ms": XID_TS, "summary": "GPU has fallen off the bus (XID 79)", "severity": 100, "pid": 4803,
    },
    "chain": [
        {"edge": "WaitsOn", "from": "node-2:4802", "to": "job:job-42",
         "evidence": [{"ts": XID_TS + 5000, "type": "error.net", "entity": "job-42", "value": "NCCL_TIMEOUT"}]},
        {"edge": "Member", "from": "job:job-42", "to": "node-2:4803 (rank 7)", "evidence": []},
        {"edge": "BlockedBy", "from": "node-2:4803", "to": "node-2/gpu-3/XID_79",
         "evidence": [{"ts": XID_TS, "type": "error.hw", "entity": "gpu-3", "value": "XID_79", "raw": "NVRM: Xid 79"}]},
    ],
    "rule": None,
    "alternatives": [],
    "symptoms": [{"node": "node-2", "entity": "job-42", "code": "NCCL_TIMEOUT", "reason": "a consequence"}],
}


class Queries:
    """An in-memory stand-in for the aggregator's query API; records every request."""

    def __init__(self, why: dict[str, Any] | None = None, n_events: int = 5) -> None:
        self.why = why or WHY
        self.log: list[tuple[str, dict[str, Any]]] = []
        self.events = [
            {"cursor": 100 + i, "node": "node-2", "ts": XID_TS + i, "type": "error.hw", "entity": "gpu-3",
             "value": "XID_79", "attrs": {"raw": "NVRM: Xid 79 " + "x" * 150}}
            for i in range(n_events)
        ]

    def request(self, op: str, args: dict[str, Any] | None = None) -> Any:
        args = dict(args or {})
        self.log.append((op, args))
        if op == "why":
            if args["target"] == "nosuch:1":
                raise NotFoundError("unknown node 'nosuch'")
            return copy.deepcopy(self.why)
        if op == "events":
            if args.get("type") == "bogus":
                raise UsageError("unknown event type 'bogus'")
            return {"items": self.events[-args.get("limit", 200):], "cursor": 999}
        if op == "ps":
            return {"items": [{"node": "node-2", "pid": 4800 + i, "name": "python3", "job": "job-42", "rank": 4 + i,
                               "state": "running", "verdict": "waiting", "gpus": [{"gpu": f"gpu-{i}", "util": 0.0}]}
                              for i in range(4)]}
        if op == "nodes":
            return {"items": [{"node": "node-2", "state": "alive", "last_seen": "now", "resyncs": 1, "errors": 2,
                               "probes": [{"name": "replay", "state": "running", "detail": ""}]}]}
        raise AssertionError(f"diag must never send op {op!r}")

    def ops(self) -> list[str]:
        return [op for op, _ in self.log]


def reply(content: str | None = None, calls: list[tuple[str, dict[str, Any]]] | None = None,
          tokens: int = 100) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for i, (n, a) in enumerate(calls)
        ]
    return {"choices": [{"index": 0, "message": message}], "usage": {"total_tokens": tokens}}


REPORT = {
    "root_cause": "gpu-3 on node-2 fell off the bus",
    "evidence": [{"claim": "XID 79 on gpu-3", "refs": [str(XID_TS)]}],
    "confidence": 0.9,
    "actions": ["drain node-2 and reset gpu-3"],
}


class Transport:
    """A scripted ``send``: records bodies; each step is a reply or a function of the body."""

    def __init__(self, *steps: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]],
                 forever: dict[str, Any] | None = None) -> None:
        self.steps = list(steps)
        self.forever = forever
        self.bodies: list[dict[str, Any]] = []
        self.timeouts: list[float] = []

    def __call__(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        self.bodies.append(copy.deepcopy(body))
        self.timeouts.append(timeout_s)
        step = self.steps.pop(0) if self.steps else self.forever
        assert step is not None, "script exhausted"
        return step(body) if callable(step) else step


def loop(transport: Transport, queries: Queries | None = None, **config: Any) -> tuple[LoopResult, Queries]:
    queries = queries or Queries()
    box = ToolBox(queries, Refs(), now_ms=lambda: NOW, rules=[])
    findings = {"why": {"root_cause": {"first_seen_ts": XID_TS}}}
    return run_loop(transport, findings, box, LLMConfig(**config)), queries


def test_a_model_that_calls_tools_forever_is_stopped_at_max_steps_then_asked_without_tools() -> None:
    tools = reply(calls=[("node_liveness", {})])
    transport = Transport(tools, tools, tools, reply(json.dumps(REPORT)), forever=tools)
    result, queries = loop(transport, max_steps=3)
    assert len(transport.bodies) == 4
    assert all("tools" in b and b["tool_choice"] == "auto" for b in transport.bodies[:3])
    final = transport.bodies[3]
    assert "tools" not in final and "tool_choice" not in final
    assert final["response_format"]["type"] == "json_schema"
    assert all(b["max_tokens"] == LLMConfig().max_tokens for b in transport.bodies)
    assert result.steps == 3
    assert result.stopped == "max_steps"
    assert queries.ops() == ["nodes"] * 3
    assert [c["name"] for c in result.tools_called] == ["node_liveness"] * 3
    assert result.report.root_cause == REPORT["root_cause"]
    assert result.report.evidence[0].refs == (XID_TS,)


def test_max_steps_zero_goes_straight_to_the_final_request() -> None:
    transport = Transport(reply(json.dumps(REPORT)))
    result, queries = loop(transport, max_steps=0)
    assert len(transport.bodies) == 1
    assert "tools" not in transport.bodies[0]
    assert queries.log == []
    assert result.steps == 0


def test_the_token_budget_ends_the_tool_turns_early() -> None:
    costly = reply(calls=[("ps", {})], tokens=5000)
    transport = Transport(costly, costly, reply(json.dumps(REPORT)), forever=costly)
    result, _ = loop(transport, max_steps=6, token_budget=10_000, max_tokens=500)
    assert result.stopped == "budget"
    assert result.steps == 2
    assert "tools" not in transport.bodies[-1]
    assert any("token budget" in n for n in result.notes)


def test_tokens_are_estimated_when_the_server_reports_no_usage() -> None:
    no_usage = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "ps", "arguments": "{}"}}]}}]}
    transport = Transport(no_usage, no_usage, reply(json.dumps(REPORT)))
    result, _ = loop(transport, max_steps=5, token_budget=1200, max_tokens=200)
    assert result.tokens > 0
    assert result.steps < 5


def test_every_tool_call_is_answered_and_extra_calls_in_one_turn_are_not_run() -> None:
    many = [("ps", {"job": f"job-{i}"}) for i in range(MAX_CALLS_PER_TURN + 3)]
    transport = Transport(reply(calls=many), reply(json.dumps(REPORT)))
    result, queries = loop(transport, max_steps=1)
    answered = [m for m in transport.bodies[1]["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in answered] == [f"c{i}" for i in range(len(many))]
    assert queries.ops() == ["ps"] * MAX_CALLS_PER_TURN
    assert all("not run" in m["content"] for m in answered[MAX_CALLS_PER_TURN:])
    assert len(result.tools_called) == MAX_CALLS_PER_TURN


def test_zap_and_unknown_tools_are_never_offered_nor_run() -> None:
    transport = Transport(reply(calls=[("zap", {"target": "node-2:4803"}), ("shell", {"cmd": "rm -rf /"})]),
                          reply(json.dumps(REPORT)))
    result, queries = loop(transport, max_steps=1)
    offered = [t["function"]["name"] for t in transport.bodies[0]["tools"]]
    assert sorted(offered) == sorted(TOOL_NAMES)
    assert "zap" not in offered
    assert queries.log == []
    assert [(c["name"], c["ok"]) for c in result.tools_called] == [("zap", False), ("shell", False)]
    errors = [json.loads(m["content"])["error"] for m in transport.bodies[1]["messages"] if m["role"] == "tool"]
    assert all("unknown tool" in e and "read-only" in e for e in errors)


def test_an_answer_without_tool_calls_that_is_a_report_ends_the_loop() -> None:
    transport = Transport(reply("```json\n" + json.dumps(REPORT) + "\n```"))
    result, _ = loop(transport, max_steps=6)
    assert len(transport.bodies) == 1
    assert result.stopped == "answered"
    assert result.report.confidence == 0.9


def test_prose_without_tool_calls_is_followed_by_the_final_json_request() -> None:
    transport = Transport(reply("I think it is the GPU."), reply(json.dumps(REPORT)))
    result, _ = loop(transport, max_steps=6)
    assert len(transport.bodies) == 2
    assert transport.bodies[1]["messages"][-2] == {"role": "assistant", "content": "I think it is the GPU."}
    assert "tools" not in transport.bodies[1]
    assert result.report.root_cause == REPORT["root_cause"]


def test_a_server_that_refuses_json_schema_is_asked_again_without_it() -> None:
    def refuse_schema(body: dict[str, Any]) -> dict[str, Any]:
        raise LLMError("response_format json_schema is not supported", status=400)

    transport = Transport(refuse_schema, reply(json.dumps(REPORT)))
    result, _ = loop(transport, max_steps=0)
    assert "response_format" in transport.bodies[0]
    assert "response_format" not in transport.bodies[1]
    assert any("JSON-schema" in n for n in result.notes)


def test_a_malformed_final_answer_is_a_clear_error() -> None:
    transport = Transport(reply("the GPU, probably"))
    with pytest.raises(LLMError, match="not the JSON asked for"):
        loop(transport, max_steps=0)


@pytest.mark.parametrize("bad", [{}, {"choices": []}, {"choices": [{"message": "hi"}]}, {"choices": "x"}])
def test_a_response_that_is_not_a_chat_completion_is_a_clear_error(bad: dict[str, Any]) -> None:
    with pytest.raises(LLMError, match="not a chat completion"):
        loop(Transport(bad), max_steps=2)


def test_one_deadline_bounds_every_request() -> None:
    ticks = iter([0.0, 1.0, 7.0, 11.0, 12.0])
    transport = Transport(forever=reply(calls=[("ps", {})]))
    box = ToolBox(Queries(), Refs(), now_ms=lambda: NOW, rules=[])
    with pytest.raises(LLMError, match="ran out of time"):
        run_loop(transport, {}, box, LLMConfig(timeout_s=10.0), clock=lambda: next(ticks))
    assert transport.timeouts == [9.0, 3.0]


def test_unsupported_citations_are_marked_in_the_loop_result() -> None:
    bad = {**REPORT, "evidence": [{"claim": "the PSU died", "refs": ["e424242", 1234]}]}
    result, _ = loop(Transport(reply(json.dumps(bad))), max_steps=0)
    (claim,) = result.report.evidence
    assert claim.unsupported
    assert claim.invalid_refs == ("e424242", "1234")


# ----------------------------------------------------------------------------- tools
def box(queries: Queries | None = None) -> tuple[ToolBox, Queries]:
    queries = queries or Queries()
    return ToolBox(queries, Refs(), now_ms=lambda: NOW, rules=[]), queries


def test_events_arguments_are_bounded_before_any_query() -> None:
    tb, queries = box()
    tb.call("events", json.dumps({"since_s": 10**9, "limit": 10**6, "node": "node-2", "type": "error"}))
    op, args = queries.log[-1]
    assert op == "events"
    assert args == {"node": "node-2", "type": "error", "since_ms": NOW - MAX_SINCE_S * 1000, "limit": MAX_EVENTS}
    tb.call("events", "{}")
    assert queries.log[-1][1] == {"since_ms": NOW - 900_000, "limit": 20}
    tb.call("events", json.dumps({"since_s": -5, "limit": 0}))
    assert queries.log[-1][1] == {"since_ms": NOW - 1000, "limit": 1}


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("events", "{not json", "not valid JSON"),
        ("events", "[1]", "JSON object"),
        ("events", json.dumps({"limit": "many"}), "must be an integer"),
        ("why", "{}", "missing argument 'target'"),
        ("why", json.dumps({"target": "x" * 500}), "short string"),
        ("job_ranks", json.dumps({"job": ["a"]}), "short string"),
        ("why", json.dumps({"target": "nosuch:1"}), "NOT_FOUND"),
        ("events", json.dumps({"type": "bogus"}), "BAD_REQUEST"),
    ],
)
def test_bad_tool_arguments_and_query_errors_are_told_to_the_model(name: str, raw: str, message: str) -> None:
    tb, _ = box()
    result = json.loads(tb.call(name, raw))
    assert message in result["error"]
    assert tb.calls[-1].ok is False


def test_only_events_actually_shown_become_citable() -> None:
    tb, _ = box(Queries(n_events=50))
    text = tb.call("events", json.dumps({"limit": 50}))
    assert len(text) <= MAX_RESULT_CHARS
    shown = json.loads(text)["items"]
    assert 0 < len(shown) < 50
    assert tb.refs.ids == {item["id"] for item in shown}
    assert tb.refs.resolve("e100") is None  # the oldest were trimmed away: not citable


def test_job_ranks_and_node_liveness_are_compact_views() -> None:
    tb, queries = box()
    ranks = json.loads(tb.call("job_ranks", json.dumps({"job": "job:job-42"})))
    assert queries.log[-1] == ("ps", {"job": "job-42"})
    assert [r["rank"] for r in ranks["items"]] == [4, 5, 6, 7]
    assert set(ranks["items"][0]) == {"node", "pid", "name", "job", "rank", "state", "verdict", "gpus"}
    nodes = json.loads(tb.call("node_liveness", "{}"))
    assert nodes["items"][0]["state"] == "alive"
    assert nodes["items"][0]["probes"] == [{"name": "replay", "state": "running"}]


def test_why_tool_registers_the_chain_evidence_as_citable() -> None:
    tb, _ = box()
    data = json.loads(tb.call("why", json.dumps({"target": "node-2:4802"})))
    assert data["root_cause"]["code"] == "XID_79"
    assert tb.refs.resolve(XID_TS) == XID_TS
    assert tb.refs.resolve(XID_TS + 5000) == XID_TS + 5000


# ----------------------------------------------------------------------------- diagnose
def test_a_matched_rule_is_the_answer_and_no_model_is_asked() -> None:
    ruled = {**WHY, "rule": {"id": "gpu.xid79", "severity": "fatal", "action": "DRAIN_AND_RESET",
                             "summary": "gpu-3 on node-2 fell off the bus", "steps": ["drain node-2"]}}
    queries = Queries(ruled)

    def never(body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        raise AssertionError("the model must not be asked when a rule matched")

    d = diagnose(queries, "node-2:4802", send=never, config=LLMConfig(api_key=None))
    assert d.source == "rules"
    assert d.root_cause == "gpu-3 on node-2 fell off the bus"
    assert d.actions[0].startswith("DRAIN_AND_RESET")
    assert d.actions[1] == "drain node-2"
    assert d.tools_called == ()
    assert d.evidence[0].refs == (XID_TS,)
    assert queries.ops() == ["why"]
    assert d.to_json()["kind"] == "Diagnosis"


def test_explain_adds_the_models_narrative_to_the_rules_diagnosis() -> None:
    ruled = {**WHY, "rule": {"id": "gpu.xid79", "severity": "fatal", "action": "DRAIN_AND_RESET", "summary": "s"}}
    transport = Transport(reply(json.dumps(REPORT)))
    d = diagnose(Queries(ruled), "node-2:4802", explain=True, send=transport, config=LLMConfig(max_steps=2),
                 now_ms=lambda: NOW)
    assert d.source == "rules"
    assert d.root_cause == "s"
    assert d.narrative is not None
    assert d.narrative.text == REPORT["root_cause"]
    assert "Explain this diagnosis" in transport.bodies[0]["messages"][1]["content"]


def test_without_a_rule_the_models_checked_report_is_the_answer() -> None:
    transport = Transport(reply(calls=[("events", {"node": "node-2", "type": "error"})]), reply(json.dumps(REPORT)))
    queries = Queries()
    d = diagnose(queries, "node-2:4802", send=transport, config=LLMConfig(max_steps=3), now_ms=lambda: NOW)
    assert d.source == "llm"
    assert d.root_cause == REPORT["root_cause"]
    assert d.model == "gpt-4o-mini"
    assert d.steps == 1
    assert d.verdict == "waiting"
    assert d.why_root_cause is not None
    assert queries.ops() == ["why", "events", "events"]  # findings' top events, then the tool
    first = transport.bodies[0]["messages"][1]["content"]
    assert "XID_79" in first and "top_events" in first


def test_an_llm_failure_carries_the_deterministic_fallback() -> None:
    def down(body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        raise LLMError("cannot reach the LLM server")

    with pytest.raises(LLMError) as info:
        diagnose(Queries(), "node-2:4802", send=down)
    fallback = info.value.fallback
    assert fallback is not None
    assert fallback.source == "rules"
    assert "XID_79" in fallback.root_cause


def test_query_errors_are_not_swallowed() -> None:
    with pytest.raises(NotFoundError):
        diagnose(Queries(), "nosuch:1", send=Transport())
