"""replay: rebasing, bad lines with line numbers, the shipped scene fixtures, and the probe."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from waiting import wait_for

from xctl.core.errors import ProbeError
from xctl.core.events import Event, EventType
from xctl.probes.base import ProbeContext
from xctl.probes.registry import make_probe
from xctl.probes.replay import ReplayProbe, load_replay

NOW = 1_800_000_000_000
SCENES = Path(__file__).resolve().parents[1] / "fixtures" / "replay"


def line(**fields: object) -> str:
    obj: dict[str, object] = {"type": "compute.util", "entity": "gpu-0", "value": "1"}
    obj.update(fields)
    return json.dumps(obj)


def test_relative_t_is_rebased_so_the_last_event_is_now() -> None:
    text = "\n".join([line(t=-2, value="a"), line(t=1.5, value="b"), line(t=0.25, value="c")])
    events, errors = load_replay(text, NOW, "node-1")
    assert errors == []
    assert [(e.value, e.ts) for e in events] == [("a", NOW - 3500), ("b", NOW), ("c", NOW - 1250)]


def test_absolute_ts_is_shifted_so_the_last_event_is_now() -> None:
    text = "\n".join([line(ts=1_000_000, value="a"), line(ts=1_004_000, value="b"), line(ts=1_001_000, value="c")])
    events, errors = load_replay(text, NOW, None)
    assert errors == []
    assert [(e.value, e.ts) for e in events] == [("a", NOW - 4000), ("b", NOW), ("c", NOW - 3000)]


def test_t_and_ts_lines_are_rebased_separately_and_untimed_lines_are_now() -> None:
    text = "\n".join([line(t=-1, value="rel"), line(ts=5_000, value="abs"), line(value="untimed")])
    events, errors = load_replay(text, NOW, None)
    assert errors == []
    assert [(e.value, e.ts) for e in events] == [("rel", NOW), ("abs", NOW), ("untimed", NOW)]


def test_file_order_and_fields_are_kept() -> None:
    text = line(t=3, type="error.hw", entity="gpu-3", pid=4803, job="job-42", value="XID_79", attrs={"xid": 79})
    text += "\n" + line(t=1, event_type="process.state", entity_id="python3", job_id="job-42", value="hung")
    events, errors = load_replay(text, NOW, None)
    assert errors == []
    first, second = events
    assert (first.type, first.entity, first.pid, first.job, first.value, dict(first.attrs)) == (
        EventType.ERROR_HW,
        "gpu-3",
        4803,
        "job-42",
        "XID_79",
        {"xid": 79},
    )
    assert (second.type, second.ts) == (EventType.PROCESS_STATE, NOW - 2000)


def test_blank_and_comment_lines_are_ignored() -> None:
    text = f"# a scene\n\n   \n{line(t=0)}\n  # indented comment\n"
    events, errors = load_replay(text, NOW, None)
    assert len(events) == 1
    assert errors == []


def test_bad_lines_are_reported_with_line_numbers_and_skipped() -> None:
    text = "\n".join(
        [
            "# header",  # 1
            line(t=-1, value="ok1"),  # 2
            "not json",  # 3
            line(t="soon"),  # 4
            line(t=1, ts=5),  # 5
            line(t=0, type="compute.bogus"),  # 6
            "[1, 2]",  # 7
            line(t=0, node="node-9"),  # 8
            line(t=0, pid="abc"),  # 9
            line(t=99, type="nope"),  # 10: bad, so it must not count as the last event
            line(t=0, value="ok2"),  # 11
        ]
    )
    events, errors = load_replay(text, NOW, "node-1")
    assert [(e.value, e.ts) for e in events] == [("ok1", NOW - 1000), ("ok2", NOW)]
    assert [m.split(":")[0] for m in errors] == [f"line {n}" for n in (3, 4, 5, 6, 7, 8, 9, 10)]
    assert "not valid JSON" in errors[0]
    assert "t: expected seconds" in errors[1]
    assert "both t and ts" in errors[2]
    assert "unknown event type" in errors[3]
    assert 'claims node "node-9"' in errors[5]
    assert "pid" in errors[6]


def test_errors_carry_the_source_when_given() -> None:
    _, errors = load_replay("oops", NOW, None, source="scenes/x.jsonl")
    assert errors[0].startswith("scenes/x.jsonl:1: ")


def test_oversized_line_is_an_error() -> None:
    _, errors = load_replay(line(t=0, value="x" * 70_000), NOW, None)
    assert len(errors) == 1
    assert "too long" in errors[0]


@pytest.mark.parametrize("name", ["xid79_root.jsonl", "xid79_victim.jsonl", "thermal_straggler.jsonl"])
def test_shipped_scenes_load_cleanly(name: str) -> None:
    events, errors = load_replay((SCENES / name).read_text(), NOW, "node-x")
    assert errors == []
    assert len(events) > 50
    assert max(e.ts for e in events) == NOW
    assert {e.job for e in events if e.pid is not None} == {"job-42"}


def test_xid79_scenes_tell_the_root_and_the_victim_side() -> None:
    root, _ = load_replay((SCENES / "xid79_root.jsonl").read_text(), NOW, None)
    victim, _ = load_replay((SCENES / "xid79_victim.jsonl").read_text(), NOW, None)
    (xid,) = [e for e in root if e.type == EventType.ERROR_HW]
    assert (xid.entity, xid.value, xid.pid) == ("gpu-3", "XID_79", 4803)
    assert not [e for e in victim if e.type == EventType.ERROR_HW]
    timeouts = [e for e in victim if e.value == "NCCL_TIMEOUT"]
    assert sorted(e.pid for e in timeouts if e.pid) == [4800, 4801, 4802, 4803]
    assert all(e.ts - xid.ts == 5000 for e in timeouts)  # both files put the fault 8 s before "now"


# -- the probe ----------------------------------------------------------------------------


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ProbeError, match=r"nope\.jsonl"):
        make_probe(f"replay:{missing}")
    with pytest.raises(ProbeError, match="replay:FILE"):
        ReplayProbe.from_spec(None)
    with pytest.raises(ProbeError, match="not a regular file"):
        ReplayProbe.from_spec(str(tmp_path))


def test_probe_emits_everything_then_idles_until_stopped(tmp_path: Path) -> None:
    path = tmp_path / "scene.jsonl"
    path.write_text(f"{line(t=-1, value='a')}\nbroken\n{line(t=0, value='b')}\n")
    probe = make_probe(f"replay:{path}")
    assert isinstance(probe, ReplayProbe)
    assert probe.name == "replay:scene.jsonl"
    assert str(path) in probe.describe()
    events: list[Event] = []
    bad: list[str] = []
    beats: list[int] = []
    ctx = ProbeContext(
        node="node-1",
        clock=lambda: NOW,
        emit=events.append,
        beat=lambda: beats.append(1),
        bad=bad.append,
    )
    thread = threading.Thread(target=probe.run, args=(ctx,), daemon=True)
    thread.start()
    wait_for(lambda: beats, timeout=2, what="the probe's first beat (the scene played)", interval=0.01)
    assert [(e.value, e.ts) for e in events] == [("a", NOW - 1000), ("b", NOW)]
    assert bad == ["bad_event"]
    assert thread.is_alive()  # idles rather than ending (ending would look like a crash)
    ctx.stop.set()
    thread.join(2)
    assert not thread.is_alive()


def test_file_gone_at_run_time_is_a_probe_error(tmp_path: Path) -> None:
    path = tmp_path / "scene.jsonl"
    path.write_text(line(t=0) + "\n")
    probe = ReplayProbe.from_spec(str(path))
    path.unlink()
    ctx = ProbeContext(node="n", clock=lambda: NOW, emit=lambda e: None, beat=lambda: None, bad=lambda r: None)
    with pytest.raises(ProbeError, match=r"scene\.jsonl"):
        probe.run(ctx)
