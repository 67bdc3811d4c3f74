"""The 60 s diagnosis cache, the graph fingerprint, the deterministic diagnosis and rule search."""

from __future__ import annotations

import copy
import json
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xctl.diag import DiagCache, Diagnosis, Evidence, deterministic, fingerprint, search_rules
from xctl.diag.cache import cache_key, default_dir
from xctl.diag.findings import compact_why
from xctl.diag.report import Narrative

WHY: dict[str, Any] = {
    "target": {"node": "n1", "pid": 10, "name": "p", "job": "j", "rank": 0, "state": "running"},
    "verdict": "blocked",
    "root_cause": {"node": "n1", "entity": "gpu-0", "kind": "hardware", "code": "XID_48", "first_seen_ms": 1000,
                   "summary": "double bit ECC error", "severity": 90},
    "chain": [{"edge": "BlockedBy", "from": "n1:10", "to": "n1/gpu-0/XID_48",
               "evidence": [{"ts": 1000, "type": "error.hw", "entity": "gpu-0", "value": "XID_48"}]}],
    "rule": None,
    "alternatives": [],
    "symptoms": [],
}


def diagnosis(**kw: Any) -> Diagnosis:
    base: dict[str, Any] = {
        "target": "n1:10", "source": "llm", "root_cause": "ECC", "evidence": (Evidence("c", (1000, "e5")),),
        "confidence": 0.8, "actions": ("drain",), "tools_called": ({"name": "why", "args": {}, "ok": True},),
        "model": "m", "steps": 2, "narrative": Narrative("n", (Evidence("x", unsupported=True),), 0.5, ("a",)),
    }
    return Diagnosis(**{**base, **kw})


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_json_round_trip() -> None:
    d = diagnosis()
    again = Diagnosis.from_json(json.loads(json.dumps(d.to_json())))
    assert again == d
    assert d.to_json()["apiVersion"] == "xctl/v1"
    for key in ("kind", "source", "root_cause", "evidence", "confidence", "actions", "tools_called"):
        assert key in d.to_json()


def test_memory_cache_expires_after_the_ttl() -> None:
    clock = Clock()
    cache = DiagCache(None, clock=clock)
    cache.put("k", diagnosis())
    hit = cache.get("k")
    assert hit is not None and hit.cached
    clock.now += 59.9
    assert cache.get("k") is not None
    clock.now += 0.2
    assert cache.get("k") is None
    assert cache.get("other") is None


def test_disk_cache_serves_a_second_process_and_is_private(tmp_path: Path) -> None:
    clock = Clock()
    DiagCache(tmp_path / "diag", clock=clock).put("k", diagnosis())
    fresh = DiagCache(tmp_path / "diag", clock=clock)  # another run of the CLI
    hit = fresh.get("k")
    assert hit is not None and hit.cached and hit.root_cause == "ECC"
    (path,) = (tmp_path / "diag").glob("*.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "diag").stat().st_mode) == 0o700
    assert "cached" in path.read_text() and '"cached": true' not in path.read_text()
    clock.now += 61
    assert DiagCache(tmp_path / "diag", clock=clock).get("k") is None


@pytest.mark.parametrize("content", ["{not json", "[]", '{"key": "other", "created": 1000000, "diagnosis": {}}',
                                     '{"key": "k", "created": 1000000, "diagnosis": {"kind": "Other"}}',
                                     '{"key": "k", "created": "yesterday", "diagnosis": {}}'])
def test_corrupt_or_foreign_entries_are_misses(tmp_path: Path, content: str) -> None:
    cache = DiagCache(tmp_path, clock=Clock())
    cache.put("k", diagnosis())
    (path,) = tmp_path.glob("*.json")
    path.write_text(content)
    assert DiagCache(tmp_path, clock=Clock()).get("k") is None


def test_an_unwritable_cache_directory_is_ignored(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = DiagCache(blocker / "diag", clock=Clock())
    cache.put("k", diagnosis())  # no exception
    assert cache.get("k") is not None  # still served from memory


def test_default_dir_honours_xdg_cache_home(tmp_path: Path) -> None:
    assert default_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "xctl" / "diag"
    assert default_dir({}).parts[-3:] == (".cache", "xctl", "diag")
    assert cache_key(a=1, b="x") == cache_key(b="x", a=1) != cache_key(a=2, b="x")


def test_fingerprint_ignores_new_samples_but_not_a_new_diagnosis() -> None:
    more_samples = copy.deepcopy(WHY)
    more_samples["chain"][0]["evidence"].append({"ts": 2000, "type": "error.hw", "entity": "gpu-0", "value": "XID_48"})
    assert fingerprint(more_samples) == fingerprint(WHY)
    changes: list[Callable[[dict[str, Any]], Any]] = [
        lambda w: w["root_cause"].update(code="XID_79"),
        lambda w: w.update(verdict="exited"),
        lambda w: w["chain"].append({"edge": "WaitsOn", "from": "a", "to": "b", "evidence": []}),
        lambda w: w.update(rule={"id": "r"}),
        lambda w: w["symptoms"].append({"code": "NCCL_TIMEOUT"}),
        lambda w: w.update(root_cause=None),
    ]
    for change in changes:
        other = copy.deepcopy(WHY)
        change(other)
        assert fingerprint(other) != fingerprint(WHY)


def test_deterministic_without_a_rule_reports_the_chain() -> None:
    d = deterministic(WHY, "n1:10")
    assert d.source == "rules"
    assert d.rule is None
    assert d.root_cause.startswith("XID_48 on n1/gpu-0 [hardware]")
    assert d.confidence == 0.7
    assert d.actions == ()
    assert [e.refs for e in d.evidence] == [(1000,), (1000,)]
    assert not any(e.unsupported for e in d.evidence)
    nothing = deterministic({**WHY, "root_cause": None, "chain": []}, "n1:10")
    assert nothing.confidence == 0.0
    assert "no root cause" in nothing.root_cause


def test_compact_why_is_small_and_keeps_what_matters() -> None:
    big = copy.deepcopy(WHY)
    big["chain"][0]["evidence"] = [
        {"ts": 1000 + i, "type": "transport.bw", "entity": f"mlx5_{i % 8}", "value": "0", "raw": "r" * 1000}
        for i in range(200)
    ]
    big["symptoms"] = [{"node": "n", "entity": f"e{i}", "code": "NCCL_TIMEOUT", "reason": "x" * 500} for i in range(50)]
    big["alternatives"] = [WHY["root_cause"]] * 10
    small = compact_why(big)
    assert len(json.dumps(small)) < 4000
    assert len(small["chain"][0]["evidence"]) == 4
    assert small["more_symptoms"] == 44
    assert small["more_alternatives"] == 7
    assert small["root_cause"]["first_seen_ts"] == 1000


# ----------------------------------------------------------------------------- rule search
@dataclass
class Tpl:
    text: str


@dataclass
class Leaf:
    text: str

    def describe(self) -> str:
        return self.text


@dataclass
class Conds:
    items: list[Leaf] = field(default_factory=list)

    def leaves(self) -> list[Leaf]:
        return self.items


@dataclass
class FakeRule:
    id: str
    scene: str = "GpuError"
    severity: str = "fatal"
    action: str = "DRAIN_AND_RESET"
    description: str = ""
    summary: Tpl = field(default_factory=lambda: Tpl(""))
    steps: tuple[Tpl, ...] = ()
    conditions: Conds = field(default_factory=Conds)


def test_rule_search_looks_in_ids_descriptions_templates_and_conditions() -> None:
    rules = [
        FakeRule("gpu.fell-off-bus", conditions=Conds([Leaf("root.code eq XID_79")])),
        FakeRule("gpu.ecc", description="uncorrectable ECC (XID_48)"),
        FakeRule("net.nccl", scene="NetworkStall", summary=Tpl("NCCL_TIMEOUT on {job}")),
    ]
    assert [r["id"] for r in search_rules("XID_79", rules)["items"]] == ["gpu.fell-off-bus"]
    assert [r["id"] for r in search_rules("xid 48", rules)["items"]] == ["gpu.ecc"]
    assert [r["id"] for r in search_rules("nccl_timeout", rules)["items"]] == ["net.nccl"]
    assert search_rules("XID_13", rules)["items"] == []
    assert search_rules("XID_79", [])["note"] == "no rules available"
    assert "error" in search_rules("  ", rules)


def test_rule_search_over_the_built_in_rules_never_fails() -> None:
    result = search_rules("XID_79")
    assert isinstance(result["items"], list)
    if not result["items"]:
        assert "note" in result
