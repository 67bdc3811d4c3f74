"""`xctl rules list | lint | test` as a user runs them, and rules in `why` answers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import XCTL, Cluster, wait_for

CASES = Path(__file__).resolve().parents[1] / "fixtures" / "rules" / "cases"
SCENE = Path(__file__).resolve().parents[1] / "fixtures" / "replay" / "xid79_root.jsonl"

SITE_RULE = """
rules:
  - id: xid-79-fell-off-bus
    scene: GpuError
    severity: fatal
    conditions:
      - root.code: XID_79
    summary: "{root.gpu} on {root.node} fell off the bus: call the rack vendor"
    action: SITE_CALL_VENDOR
    steps: ["Call the vendor."]
"""


def xctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XCTL, *args], capture_output=True, text=True, timeout=60, check=False)


def test_rules_list_json_has_the_builtins_with_their_source() -> None:
    result = xctl("rules", "list", "-o", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["kind"] == "RuleList"
    ids = {item["id"]: item for item in data["items"]}
    assert {"id", "scene", "severity", "action", "source"} <= set(ids["xid-79-fell-off-bus"])
    assert ids["xid-79-fell-off-bus"]["source"].startswith("builtin/")


def test_rules_lint_reports_file_and_line_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - id: broken\n    scene: GpuError\n    severity: loud\n")
    result = xctl("rules", "lint", str(bad))
    assert result.returncode == 1
    assert f"{bad}:" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text(SITE_RULE)
    ok = xctl("rules", "lint", str(good))
    assert ok.returncode == 0, ok.stderr


def test_rules_test_runs_the_builtin_cases() -> None:
    result = xctl("rules", "test", str(CASES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed, 0 failed" in result.stdout


def test_why_carries_the_site_rule_that_overrides_a_builtin(cluster: Cluster, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "rack.yaml").write_text(SITE_RULE)
    cluster.aggregator("--rules", str(site))
    cluster.agent("node-2", f"replay:{SCENE}")
    why = wait_for(lambda: cluster.query("why", target="node-2:4803").get("rule"), timeout=20,
                   what="a rule in the why answer")
    assert why["id"] == "xid-79-fell-off-bus"
    assert why["action"] == "SITE_CALL_VENDOR"
    text = cluster.cli("why", "node-2:4803")
    assert "SITE_CALL_VENDOR" in text.stdout
