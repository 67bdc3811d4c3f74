"""Evidence checking: claims may only cite events the model was shown."""

from __future__ import annotations

from typing import Any

import pytest

from xctl.diag.evidence import (
    UNSUPPORTED_CONFIDENCE_CAP,
    MalformedAnswerError,
    Refs,
    check_report,
    parse_answer,
)
from xctl.diag.report import iso_ms

TS = 1_732_350_000_123


def shown() -> Refs:
    refs = Refs()
    refs.collect(
        {
            "why": {
                "root_cause": {"code": "XID_79", "first_seen_ts": TS},
                "chain": [{"evidence": [{"ts": TS + 5000}]}],
            },
            "tool": {"items": [{"id": "e85", "ts": TS + 7000, "value": "NCCL_TIMEOUT"}]},
        }
    )
    return refs


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (TS, TS),
        (str(TS), TS),
        (float(TS), TS),
        (TS + 5000, TS + 5000),
        ("e85", "e85"),
        ("E85", "e85"),
        ("e085", "e85"),
        (iso_ms(TS), TS),
        (f"ts={TS}", TS),
        ("event e85 (NCCL_TIMEOUT)", "e85"),
        (f"XID_79 at {iso_ms(TS)}", TS),
    ],
)
def test_known_refs_resolve_to_their_canonical_form(ref: object, expected: object) -> None:
    assert shown().resolve(ref) == expected


@pytest.mark.parametrize(
    "ref",
    [TS + 1, "e86", "1732350000124", None, True, [TS], {"ts": TS}, "", "the XID", 85, f"{TS} and e85", "x" * 300],
)
def test_unknown_or_ambiguous_refs_do_not_resolve(ref: object) -> None:
    assert shown().resolve(ref) is None


def test_only_what_was_shown_counts_cursor_and_ts_are_not_confused() -> None:
    refs = Refs()
    refs.collect({"items": [{"id": "e7", "ts": TS}]})
    assert refs.resolve(7) is None  # a bare cursor number is not an id
    assert refs.resolve("e7") == "e7"
    assert len(refs) == 2


def test_claims_with_valid_refs_are_supported_others_marked_with_their_invalid_refs() -> None:
    data = {
        "root_cause": "GPU gpu-3 on node-2 fell off the bus (XID 79)",
        "evidence": [
            {"claim": "XID 79 on gpu-3", "refs": [str(TS), "e999"]},
            {"claim": "ranks timed out afterwards", "refs": ["e85", "e85", TS + 7000]},
            {"claim": "the PSU failed", "refs": ["e4242"]},
            {"claim": "made up without refs", "refs": []},
            {"claim": "", "refs": [TS]},
            "a bare string claim",
            42,
        ],
        "confidence": 0.8,
        "actions": ["drain node-2", {"action": "reset gpu-3"}, "", 7],
    }
    report = check_report(data, shown())
    by_claim = {e.claim: e for e in report.evidence}
    assert by_claim["XID 79 on gpu-3"].refs == (TS,)
    assert by_claim["XID 79 on gpu-3"].invalid_refs == ("e999",)
    assert not by_claim["XID 79 on gpu-3"].unsupported
    assert by_claim["ranks timed out afterwards"].refs == ("e85", TS + 7000)
    assert by_claim["the PSU failed"].unsupported
    assert by_claim["the PSU failed"].to_json() == {
        "claim": "the PSU failed",
        "refs": [],
        "unsupported": True,
        "invalid_refs": ["e4242"],
    }
    assert by_claim["made up without refs"].unsupported
    assert by_claim["a bare string claim"].unsupported
    assert "" not in by_claim
    assert len(report.evidence) == 5
    assert report.supported == 2
    assert report.confidence == 0.8
    assert report.actions == ("drain node-2", "reset gpu-3")


def test_confidence_is_capped_when_no_claim_has_valid_evidence() -> None:
    data = {"root_cause": "cosmic rays", "evidence": [{"claim": "a bit flipped", "refs": ["e1"]}], "confidence": 0.99}
    report = check_report(data, shown())
    assert report.confidence == UNSUPPORTED_CONFIDENCE_CAP
    assert check_report({"root_cause": "x", "confidence": 0.9}, shown()).confidence == UNSUPPORTED_CONFIDENCE_CAP


@pytest.mark.parametrize(
    ("given", "expected"), [(0.42, 0.42), (85, 0.85), ("0.5", 0.5), ("70%", 0.7), (-1, 0.0), (1e9, 1.0), ("hi", 0.0),
                            (None, 0.0), (True, 0.0), (float("nan"), 0.0)]
)
def test_confidence_is_normalised_to_0_1(given: object, expected: float) -> None:
    data = {"root_cause": "x", "evidence": [{"claim": "c", "refs": [TS]}], "confidence": given}
    assert check_report(data, shown()).confidence == expected


def test_limits_on_claims_refs_and_lengths() -> None:
    data = {
        "root_cause": "r" * 5000,
        "evidence": [{"claim": "c" * 2000, "refs": [TS] * 50} for _ in range(40)],
        "confidence": 1,
        "actions": ["a" * 1000] * 40,
    }
    report = check_report(data, shown())
    assert len(report.root_cause) == 1000
    assert len(report.evidence) == 12
    assert all(len(e.claim) == 500 and e.refs == (TS,) for e in report.evidence)
    assert len(report.actions) == 10
    assert all(len(a) == 300 for a in report.actions)


@pytest.mark.parametrize(
    "bad",
    [
        {"evidence": []},
        {"root_cause": "  "},
        {"root_cause": "x", "evidence": "not a list"},
        {"root_cause": "x", "actions": 5},
    ],
)
def test_a_report_without_the_required_shape_is_malformed(bad: dict[str, Any]) -> None:
    with pytest.raises(MalformedAnswerError):
        check_report(bad, shown())


def test_parse_answer_accepts_plain_fenced_and_surrounded_json() -> None:
    assert parse_answer('{"root_cause": "x"}') == {"root_cause": "x"}
    assert parse_answer('Here it is:\n```json\n{"root_cause": "x"}\n```\nbye') == {"root_cause": "x"}
    assert parse_answer('Sure! {"root_cause": "x"} Hope that helps.') == {"root_cause": "x"}


@pytest.mark.parametrize("content", [None, "", "   ", "no json here", "{not: json}", "[1, 2]", '"a string"', 42])
def test_parse_answer_rejects_what_is_not_a_json_object(content: object) -> None:
    with pytest.raises(MalformedAnswerError):
        parse_answer(content)
