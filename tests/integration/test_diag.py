"""`xctl diag` end to end: a real aggregator (in-process, fed by a real agent replaying a
recorded XID 79 scene), the real `openai` client, and a real OpenAI-compatible HTTP server on
127.0.0.1 that plays scripted turns and records what it received."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import XCTL, wait_for
from fake_openai import (
    Body,
    FakeOpenAI,
    Turn,
    answer,
    call,
    garbage,
    hang,
    status,
    tool_calls,
    tool_names,
    tool_results,
)

from xctl.agent.daemon import Agent, AgentConfig
from xctl.aggregator.server import Aggregator, AggregatorConfig
from xctl.cli.daemons import free_port_base
from xctl.core.cluster import ClusterGraph
from xctl.core.why import Explanation, RuleMatch
from xctl.diag import TOOL_NAMES, LLMConfig, LLMError, diagnose, openai_sender
from xctl.wire.client import QueryClient
from xctl.wire.sockets import endpoints

pytest.importorskip("openai")

SCENE = Path(__file__).parents[1] / "fixtures" / "replay" / "xid79_root.jsonl"
TARGET = "node-2:4802"  # rank 6, waiting on its job; rank 7 (pid 4803) is on gpu-3, which fell off the bus
Enricher = Callable[[Explanation, ClusterGraph], Explanation]


def xid79_rule(explanation: Explanation, cluster: ClusterGraph) -> Explanation:
    """A hand-made knowledge-base match (independent of the built-in rules' wording)."""
    if explanation.root is None or explanation.root.code != "XID_79":
        return explanation
    return explanation.with_rule(
        RuleMatch("test.xid79", "fatal", "RESTART_BM", "gpu-3 on node-2 fell off the bus", ("drain node-2",))
    )


class Live:
    """An aggregator and one agent replaying the scene, in this process, on free ports."""

    def __init__(self, enrich: Enricher | None) -> None:
        self.port = free_port_base()
        self.aggregator = Aggregator(AggregatorConfig(port=self.port), enrich=enrich)
        self.seen: list[str] = []  # every query op the aggregator was asked, in order
        for op, handler in list(self.aggregator.handlers.items()):
            self.aggregator.handlers[op] = self._counting(op, handler)
        self.agent = Agent(AgentConfig(node="node-2", port=self.port, probes=[f"replay:{SCENE}"]))
        self.threads = [threading.Thread(target=d.run, daemon=True) for d in (self.aggregator, self.agent)]
        for t in self.threads:
            t.start()
        self.client = QueryClient(endpoints("127.0.0.1", self.port).query, timeout_s=3.0)
        wait_for(self._explained, timeout=20, what="the replayed XID 79 to be explained")

    def _explained(self) -> bool:
        why = self.client.request("why", {"target": TARGET})
        return bool(why["root_cause"] and why["root_cause"]["code"] == "XID_79" and why["symptoms"])

    def _counting(self, op: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        def counted(state: Any, args: Any) -> Any:
            self.seen.append(op)
            return handler(state, args)

        return counted

    def ops(self) -> dict[str, int]:
        """How many queries of each op the aggregator was asked."""
        return {op: self.seen.count(op) for op in set(self.seen)}

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        full.update({"XCTL_AGGREGATOR": f"127.0.0.1:{self.port}", "NO_COLOR": "1", **(env or {})})
        return subprocess.run([*XCTL, "diag", *args], capture_output=True, text=True, timeout=timeout, env=full,
                              check=False)

    def close(self) -> None:
        self.client.close()
        self.agent.request_stop()
        self.aggregator.request_stop()
        for t in self.threads:
            t.join(5)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """No rule matches: the LLM path."""
    cluster = Live(enrich=None)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def ruled() -> Iterator[Live]:
    """A rule matches XID 79: the rules path."""
    cluster = Live(enrich=xid79_rule)
    yield cluster
    cluster.close()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(tmp_path / "cache"), "OPENAI_API_KEY": "sk-test"}


def config(fake: FakeOpenAI, **kw: Any) -> LLMConfig:
    return LLMConfig(**{"base_url": fake.url, "api_key": "sk-test", "timeout_s": 10.0, **kw})


def event_with(body: Body, value: str) -> dict[str, Any]:
    """The first event with this value in any tool result of the request."""
    for result in tool_results(body):
        for item in result.get("items", []):
            if item.get("value") == value:
                return dict(item)
    raise AssertionError(f"no {value} event in the tool results: {tool_results(body)}")


def report_citing_the_xid(body: Body) -> Turn:
    """The model's final answer, citing the XID event the events tool returned."""
    xid = event_with(body, "XID_79")
    nccl = event_with(body, "NCCL_TIMEOUT")
    return answer({
        "root_cause": "gpu-3 on node-2 fell off the bus (XID 79); rank 7 hung and the other ranks timed out",
        "evidence": [
            {"claim": "XID 79 on node-2 gpu-3", "refs": [xid["id"]]},
            {"claim": "ranks then hit NCCL timeouts", "refs": [str(nccl["ts"]), nccl["id"]]},
        ],
        "confidence": 0.85,
        "actions": ["drain node-2 and reboot it", "restart job-42 from its last checkpoint"],
    })


# ----------------------------------------------------------------------------- the LLM path
def test_tool_calls_reach_the_aggregator_and_the_report_cites_what_they_returned(live: Live) -> None:
    script: list[Turn | Callable[[Body], Turn]] = [
        tool_calls(call("events", node="node-2", type="error", since_s=10**6, limit=500),
                   call("job_ranks", job="job-42")),
        answer("The XID on gpu-3 came first."),  # prose: the loop then asks for the JSON report
        report_citing_the_xid,
    ]
    before = live.ops()
    with FakeOpenAI(script, api_key="sk-test") as fake:
        d = diagnose(live.client, TARGET, config=config(fake), send=openai_sender(config(fake)))
    after = live.ops()
    assert after["events"] - before.get("events", 0) == 2  # the findings' top events + the model's call
    assert after["ps"] - before.get("ps", 0) == 1  # job_ranks
    assert "zap" not in after

    assert len(fake.requests) == 3, fake.rejected
    assert fake.rejected == []
    first, second, final = fake.requests
    assert all(b["max_tokens"] == LLMConfig().max_tokens for b in fake.requests)
    assert sorted(tool_names(first)) == sorted(TOOL_NAMES)
    assert "zap" not in json.dumps(first["tools"])
    assert "tools" not in final and "tool_choice" not in final
    assert final["response_format"]["json_schema"]["schema"]["required"] == [
        "root_cause", "evidence", "confidence", "actions"]
    findings = first["messages"][1]["content"]
    assert "XID_79" in findings and "top_events" in findings
    events, ranks = tool_results(second)
    assert events["since_s"] == 3600 and len(events["items"]) <= 50  # the model's bounds were clamped
    assert any(e["value"] == "XID_79" and e["entity"] == "gpu-3" for e in events["items"])
    assert [r["rank"] for r in ranks["items"]] == [4, 5, 6, 7]
    assert fake.headers[0]["authorization"] == "Bearer sk-test"

    assert d.source == "llm"
    assert d.model == "gpt-4o-mini"
    assert d.steps == 1
    assert [t["name"] for t in d.tools_called] == ["events", "job_ranks"]
    assert all(t["ok"] for t in d.tools_called)
    assert [e.unsupported for e in d.evidence] == [False, False]
    xid = event_with(second, "XID_79")
    assert d.evidence[0].refs == (xid["id"],)
    assert d.confidence == 0.85
    assert d.actions[0] == "drain node-2 and reboot it"


def test_a_model_that_keeps_calling_tools_is_stopped_at_max_steps(live: Live) -> None:
    forever = tool_calls(call("node_liveness"), call("why", target="node-2:4803"))
    final = answer({"root_cause": "gpu-3 lost", "evidence": [], "confidence": 0.4, "actions": []})

    def script(body: Body) -> Turn:
        return forever if "tools" in body else final

    with FakeOpenAI(forever=script) as fake:
        d = diagnose(live.client, TARGET, config=config(fake, max_steps=3))
    assert len(fake.requests) == 4
    assert ["tools" in b for b in fake.requests] == [True, True, True, False]
    assert fake.rejected == []
    assert d.steps == 3
    assert len(d.tools_called) == 6
    liveness = json.loads(fake.requests[3]["messages"][-2]["content"])  # the last tool result before the ask
    assert liveness["root_cause"]["code"] == "XID_79"
    assert any("node-2" in json.dumps(r) for r in tool_results(fake.requests[1]))


def test_a_claim_citing_an_event_that_was_never_shown_is_marked_unsupported(live: Live) -> None:
    def final(body: Body) -> Turn:
        root_ts = json.loads(body["messages"][1]["content"].split("\n")[2])["why"]["root_cause"]["first_seen_ts"]
        return answer({
            "root_cause": "gpu-3 fell off the bus",
            "evidence": [
                {"claim": "XID 79 on gpu-3", "refs": [str(root_ts)]},
                {"claim": "the PSU on node-2 failed first", "refs": ["e999999", "1700000000000"]},
            ],
            "confidence": 0.9,
            "actions": ["reboot node-2"],
        })

    with FakeOpenAI([final]) as fake:
        d = diagnose(live.client, TARGET, config=config(fake, max_steps=0))
    supported, invented = d.evidence
    assert not supported.unsupported
    assert invented.unsupported
    assert invented.invalid_refs == ("e999999", "1700000000000")
    assert any("unsupported" in n for n in d.notes)
    assert d.to_json()["evidence"][1]["unsupported"] is True


@pytest.mark.parametrize(
    ("turn", "message"),
    [
        (status(401, "Incorrect API key"), "refused the API key (401)"),
        (status(429, "Rate limit reached"), "rate limiting (429)"),
        (status(500, "upstream exploded"), "answered 500: upstream exploded"),
        (garbage(), "not a chat completion"),
        (answer("I am not sure, sorry."), "not the JSON asked for"),
    ],
)
def test_server_errors_and_garbage_are_clean_errors_with_the_fallback(live: Live, turn: Turn, message: str) -> None:
    with FakeOpenAI([turn]) as fake, pytest.raises(LLMError) as info:
        diagnose(live.client, TARGET, config=config(fake, max_steps=0))
    assert message in str(info.value)
    assert info.value.fallback is not None
    assert "XID_79" in info.value.fallback.root_cause
    assert len(fake.requests) == 1  # no hidden retries


def test_a_silent_server_fails_within_the_timeout(live: Live) -> None:
    with FakeOpenAI(forever=hang()) as fake:
        started = time.monotonic()
        with pytest.raises(LLMError, match="did not answer within"):
            diagnose(live.client, TARGET, config=config(fake, timeout_s=1.0))
        assert time.monotonic() - started < 1.0 + 1.0


def test_the_fake_server_rejects_what_the_real_api_rejects_and_streams() -> None:
    import openai

    with FakeOpenAI(forever=answer("streamed words here")) as fake:
        client = openai.OpenAI(base_url=fake.url, api_key="k", max_retries=0, timeout=5)
        with pytest.raises(openai.BadRequestError, match="must be a response to a preceeding"):
            client.chat.completions.create(model="m", max_tokens=5, messages=[
                {"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "{}"}])
        with pytest.raises(openai.BadRequestError, match="only allowed when 'tools'"):
            client.chat.completions.create(model="m", max_tokens=5, tool_choice="auto",
                                           messages=[{"role": "user", "content": "hi"}])
        stream = client.chat.completions.create(model="m", max_tokens=5, stream=True,
                                                messages=[{"role": "user", "content": "hi"}])
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == "streamed words here"


# ----------------------------------------------------------------------------- the rules path
def test_a_matched_rule_makes_no_http_call_at_all(ruled: Live, env: dict[str, str]) -> None:
    with FakeOpenAI(forever=answer("{}")) as fake:
        result = ruled.cli(TARGET, "-o", "json", "--base-url", fake.url, env=env)
        assert result.returncode == 0, result.stderr
        assert fake.requests == []
    data = json.loads(result.stdout)
    assert (data["apiVersion"], data["kind"], data["source"]) == ("xctl/v1", "Diagnosis", "rules")
    assert data["rule"]["id"] == "test.xid79"
    assert data["root_cause"] == "gpu-3 on node-2 fell off the bus"
    assert data["actions"][0].startswith("RESTART_BM")
    assert data["tools_called"] == []
    assert data["evidence"] and all(e["refs"] for e in data["evidence"])
    text = ruled.cli(TARGET, env={"XDG_CACHE_HOME": env["XDG_CACHE_HOME"]})  # no key needed either
    assert text.returncode == 0, text.stderr
    assert "root cause: gpu-3 on node-2 fell off the bus" in text.stdout
    assert "[rules]" in text.stdout


def test_explain_asks_the_model_for_a_narrative_of_the_rule(ruled: Live, env: dict[str, str]) -> None:
    with FakeOpenAI([report_citing_the_xid], forever=tool_calls(call("events", node="node-2", type="error"))) as fake:
        fake.script = [tool_calls(call("events", node="node-2", type="error")), report_citing_the_xid]
        result = ruled.cli(TARGET, "--explain", "--max-steps", "1", "-o", "json", "--base-url", fake.url, env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["source"] == "rules"
    assert data["narrative"]["text"].startswith("gpu-3 on node-2 fell off the bus (XID 79)")
    assert not any(e["unsupported"] for e in data["narrative"]["evidence"])
    assert [t["name"] for t in data["tools_called"]] == ["events"]
    assert len(fake.requests) == 2


# ----------------------------------------------------------------------------- the CLI
def test_cli_json_report_and_a_second_run_is_served_from_the_cache(live: Live, env: dict[str, str]) -> None:
    with FakeOpenAI([tool_calls(call("events", node="node-2", type="error")), report_citing_the_xid]) as fake:
        first = live.cli(TARGET, "-o", "json", "--base-url", fake.url, env=env)
        assert first.returncode == 0, first.stderr
        second = live.cli(TARGET, "-o", "json", "--base-url", fake.url, env=env)
        assert second.returncode == 0, second.stderr
        text = live.cli(TARGET, "--base-url", fake.url, env=env)
        assert len(fake.requests) == 2  # the first run only
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["source"] == "llm" and a["cached"] is False and b["cached"] is True
    assert {k: v for k, v in a.items() if k != "cached"} == {k: v for k, v in b.items() if k != "cached"}
    assert a["tools_called"] == [{"name": "events", "args": {"node": "node-2", "type": "error"}, "ok": True}]
    assert text.returncode == 0
    assert "cached" in text.stdout
    assert "root cause: gpu-3 on node-2 fell off the bus (XID 79)" in text.stdout
    assert "actions (not executed):" in text.stdout
    assert list((Path(env["XDG_CACHE_HOME"]) / "xctl" / "diag").glob("*.json"))


def test_cli_timeout_is_a_clear_error_and_the_findings_are_still_shown(live: Live, env: dict[str, str]) -> None:
    with FakeOpenAI(forever=hang()) as fake:
        started = time.monotonic()
        result = live.cli(TARGET, "--base-url", fake.url, "--llm-timeout", "1", env=env)
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "did not answer within" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "XID_79 on node-2/gpu-3" in result.stdout
    assert "llm: no report" in result.stdout
    assert elapsed < 1.0 + 8.0  # the budget + interpreter start-up


def test_cli_unreachable_server_json_carries_the_error(live: Live, env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = live.cli(TARGET, "-o", "json", "--base-url", f"http://127.0.0.1:{port}/v1", "--llm-timeout", "5",
                      env=env)
    assert result.returncode == 1
    assert "cannot reach the LLM server" in result.stderr
    data = json.loads(result.stdout)
    assert data["source"] == "rules"
    assert data["error"]["code"] == "LLM"
    assert data["why_root_cause"]["code"] == "XID_79"


def test_cli_without_a_key_for_the_default_server_says_so(live: Live, tmp_path: Path) -> None:
    result = live.cli(TARGET, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert "OPENAI_API_KEY is not set" in result.stderr
    assert "XID_79" in result.stdout
    assert "Traceback" not in result.stderr


def test_cli_without_the_openai_package_asks_to_install_the_extra(live: Live, ruled: Live, tmp_path: Path) -> None:
    shadow = tmp_path / "no-openai" / "openai"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named openai')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shadow.parent), *sys.path]), "OPENAI_API_KEY": "sk-test",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = live.cli(TARGET, env=env)
    assert result.returncode == 1
    assert "pip install 'xctl[ai]'" in result.stderr
    assert "XID_79" in result.stdout
    assert ruled.cli(TARGET, env=env).returncode == 0  # only needed when the model is


def test_cli_usage_errors(live: Live) -> None:
    assert live.cli("node-2:abc").returncode == 2
    assert live.cli(TARGET, "--max-steps", "-1").returncode == 2
    missing = live.cli("nosuch:1", env={"OPENAI_API_KEY": "k"})
    assert missing.returncode == 4
    assert "unknown node" in missing.stderr
