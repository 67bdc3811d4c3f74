"""The actuator on real process trees spawned here (no mocks of processes or signals).

Each tree hangs under a launcher that is a child subreaper and reaps everything (as
slurmstepd does), so orphans are reaped even where pid 1 does not reap. D state and GPU
memory are fixtures: a /proc view that reports D (with a fixture wchan) and a gpu_pids hook.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from waiting import wait_for

from xctl.agent.actuator import Actuator, ProcView, parse_signal
from xctl.core.errors import UsageError
from xctl.core.events import EventType
from xctl.wire.messages import Command

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
_spec = importlib.util.spec_from_file_location("zaptree", FIXTURES / "zaptree.py")
assert _spec is not None and _spec.loader is not None
zaptree = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zaptree)
Tree = zaptree.Tree


@pytest.fixture
def trees(tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    made: list[Any] = []

    def make(spec: str) -> Any:
        tree = Tree(tmp_path / f"tree-{len(made)}.pids", spec)
        made.append(tree)
        return tree

    yield make
    for tree in made:
        tree.close()


def ctime(pid: int) -> float:
    return psutil.Process(pid).create_time()


def alive(pid: int) -> bool:
    """Running (a zombie is not alive: it has ended, its parent has not reaped it yet)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def zap(
    pid: int,
    create_time: float,
    *,
    grace: float = 1.0,
    sig: str = "TERM",
    command_id: str = "cmd-1",
    deadline_ms: int | None = None,
) -> Command:
    deadline = deadline_ms if deadline_ms is not None else int(time.time() * 1000) + 30_000
    return Command(
        command_id,
        "zap",
        {"node": "n1", "pid": pid, "create_time": create_time},
        deadline,
        "alice@laptop",
        {"signal": sig, "grace_s": grace},
    )


def outcomes(result: Any) -> dict[int, str]:
    return {row["pid"]: row["outcome"] for row in result.data["tree"]}


# ----------------------------------------------------------------------------- whole trees


def test_tree_with_children_grandchild_own_session_and_a_sigterm_ignorer_all_end(
    trees: Callable[[str], Any], tmp_path: Path
) -> None:
    tree = trees("sleeper,stubborn,session,parent")
    audit = tmp_path / "agent-audit.jsonl"
    actuator = Actuator("n1", audit_log=audit)
    root = tree.pid("root")
    started = time.monotonic()
    result = actuator(zap(root, ctime(root), grace=0.5))
    took = time.monotonic() - started

    assert result.ok, result
    assert result.data["outcome"] == "DONE"
    got = outcomes(result)
    assert set(got) == set(tree.members)
    assert got[tree.pid("stubborn")] == "killed"
    for role in ("root", "sleeper", "session", "parent", "grandchild"):
        assert got[tree.pid(role)] == "terminated", (role, result.data["tree"])
    assert not any(alive(p) for p in tree.members)
    assert alive(tree.pid("launcher")), "the launcher is outside the tree and must be untouched"
    term, kill = result.data["signals"]
    assert term["signal"] == "SIGTERM" and set(term["pids"]) == set(tree.members)
    assert kill == {"signal": "SIGKILL", "pids": [tree.pid("stubborn")], "at_ms": kill["at_ms"]}
    assert kill["at_ms"] >= 500, "SIGKILL only after the grace period"
    assert 0.5 <= took < 3.0
    assert result.data["target"]["pid"] == root
    by_pid = {r["pid"]: r for r in result.data["tree"]}
    assert by_pid[tree.pid("grandchild")]["ppid"] == tree.pid("parent")

    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(lines) == 1
    record = lines[0]
    assert record["command_id"] == "cmd-1" and record["requested_by"] == "alice@laptop"
    assert record["outcome"] == "DONE" and record["ok"] is True and record["repeat"] is False
    assert {r["pid"] for r in record["tree"]} == set(tree.members)
    assert [s["signal"] for s in record["signals"]] == ["SIGTERM", "SIGKILL"]


def test_a_stopped_tree_gets_the_signal_and_ends_without_sigkill(trees: Callable[[str], Any]) -> None:
    tree = trees("sleeper,parent")
    for pid in tree.members:
        os.kill(pid, signal.SIGSTOP)
    wait_for(
        lambda: all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in tree.members),
        timeout=5,
        what="the tree to stop",
    )
    root = tree.pid("root")
    result = Actuator("n1")(zap(root, ctime(root), grace=5.0))
    assert result.ok, result
    assert set(outcomes(result).values()) == {"terminated"}
    assert [s["signal"] for s in result.data["signals"]] == ["SIGTERM"]
    assert result.data["duration_ms"] < 4000, "a stopped tree must not wait out the grace period"


def test_sigkill_as_the_first_signal(trees: Callable[[str], Any]) -> None:
    tree = trees("stubborn")
    root = tree.pid("root")
    result = Actuator("n1")(zap(root, ctime(root), sig="KILL", grace=5.0))
    assert result.ok
    assert set(outcomes(result).values()) == {"killed"}
    assert [s["signal"] for s in result.data["signals"]] == ["SIGKILL"]
    assert result.data["duration_ms"] < 3000


def test_a_zombie_in_the_tree_is_reaped_once_its_parent_is_gone(trees: Callable[[str], Any]) -> None:
    tree = trees("zombie,sleeper")
    zombie = tree.pid("zombie")
    wait_for(lambda: psutil.Process(zombie).status() == psutil.STATUS_ZOMBIE, timeout=5, what="the zombie")
    root = tree.pid("root")
    result = Actuator("n1")(zap(root, ctime(root), grace=1.0))
    assert result.ok, result
    got = outcomes(result)
    assert got[zombie] == "already_gone"  # it had exited; the subreaper reaped it when root died
    assert zombie not in result.data["signals"][0]["pids"], "a zombie is not signalled"


# ----------------------------------------------------------------------------- refusals


def test_a_create_time_mismatch_is_refused_and_nothing_is_signalled(
    trees: Callable[[str], Any], tmp_path: Path
) -> None:
    tree = trees("sleeper")
    root = tree.pid("root")
    audit = tmp_path / "audit.jsonl"
    actuator = Actuator("n1", audit_log=audit)
    result = actuator(zap(root, ctime(root) - 3600))
    assert not result.ok
    assert result.data["outcome"] == "REFUSED"
    assert "reused" in result.data["reason"] and result.error == result.data["reason"]
    assert result.data["signals"] == []
    assert outcomes(result) == {root: "refused"}
    assert all(alive(p) for p in tree.members)
    assert actuator.executed == 0
    assert json.loads(audit.read_text())["outcome"] == "REFUSED"


def test_a_create_time_within_the_tolerance_is_the_same_process(trees: Callable[[str], Any]) -> None:
    tree = trees("")
    root = tree.pid("root")
    result = Actuator("n1")(zap(root, round(ctime(root), 2) + 0.01, grace=1.0))
    assert result.ok, result


@pytest.mark.parametrize("pid", [1, 0])
def test_pid_1_and_0_are_refused(pid: int) -> None:
    result = Actuator("n1")(zap(pid, 0.0))
    assert not result.ok
    assert result.data["outcome"] == "REFUSED"
    assert "never zapped" in result.data["reason"]


def test_the_agent_itself_and_its_ancestors_are_refused() -> None:
    actuator = Actuator("n1")
    me = actuator(zap(os.getpid(), ctime(os.getpid()), command_id="self"))
    assert not me.ok and "this agent itself" in me.data["reason"]
    parent = os.getppid()
    up = actuator(zap(parent, ctime(parent), command_id="parent"))
    assert not up.ok and "ancestor of this agent" in up.data["reason"]
    assert actuator.executed == 0


@pytest.mark.skipif(not psutil.pid_exists(2), reason="no kthreadd visible here")
def test_a_kernel_thread_is_refused() -> None:
    kthreads = [p for p in psutil.process_iter(["ppid"]) if p.info["ppid"] == 2]
    for pid in [2, *(p.pid for p in kthreads[:1])]:
        result = Actuator("n1")(zap(pid, ctime(pid), command_id=f"k{pid}"))
        assert not result.ok
        assert "kernel thread" in result.data["reason"], result.data


def test_a_target_that_is_gone_is_reported_already_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = ctime(proc.pid)
    proc.wait()
    result = Actuator("n1")(zap(proc.pid, started))
    assert result.ok, "nothing is left of the tree: that is what was asked"
    assert result.data["outcome"] == "ALREADY_GONE"
    assert "already gone" in result.data["reason"]
    assert outcomes(result) == {proc.pid: "already_gone"}


def test_a_zombie_target_is_reported_with_the_parent_that_must_reap_it(trees: Callable[[str], Any]) -> None:
    tree = trees("zombie")
    zombie, root = tree.pid("zombie"), tree.pid("root")
    wait_for(lambda: psutil.Process(zombie).status() == psutil.STATUS_ZOMBIE, timeout=5, what="the zombie")
    result = Actuator("n1", zombie_settle_s=0.2)(zap(zombie, ctime(zombie), grace=0.2))
    assert not result.ok
    assert result.data["outcome"] == "PARTIAL"
    row = result.data["tree"][0]
    assert row["outcome"] == "zombie"
    assert row["parent"] == {"pid": root, "name": psutil.Process(root).name()}
    assert f"parent {root}" in row["detail"] and "must reap it" in row["detail"]
    assert "1 zombie" in result.data["reason"]
    assert alive(root), "the parent is outside the tree"


def test_unsupported_op_and_missing_create_time_are_refused() -> None:
    actuator = Actuator("n1")
    other = Command("c-op", "reboot", {"pid": 5, "create_time": 1.0}, int(time.time() * 1000) + 5000, "u")
    assert not actuator(other).ok
    bare = Command("c-ct", "zap", {"pid": 5}, int(time.time() * 1000) + 5000, "u")
    result = actuator(bare)
    assert not result.ok and "create_time" in result.data["reason"]


# ----------------------------------------------------------------------------- once, and in time


def test_a_repeated_command_id_is_answered_from_the_cache_not_executed_twice(
    trees: Callable[[str], Any], tmp_path: Path
) -> None:
    tree = trees("sleeper")
    root = tree.pid("root")
    audit = tmp_path / "audit.jsonl"
    actuator = Actuator("n1", audit_log=audit)
    command = zap(root, ctime(root), command_id="same-id")
    first = actuator(command)
    second = actuator(command)
    assert first.ok and second == first
    assert actuator.executed == 1
    assert actuator.precheck(command) == first
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["repeat"] for r in records] == [False, True, True]


def test_the_same_command_id_from_two_threads_runs_once(trees: Callable[[str], Any]) -> None:
    tree = trees("stubborn")
    root = tree.pid("root")
    actuator = Actuator("n1")
    command = zap(root, ctime(root), grace=0.5, command_id="racing")
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(actuator(command))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 2 and results[0] == results[1]
    assert actuator.executed == 1


def test_an_expired_command_is_refused_and_nothing_is_signalled(trees: Callable[[str], Any]) -> None:
    tree = trees("sleeper")
    root = tree.pid("root")
    actuator = Actuator("n1")
    result = actuator(zap(root, ctime(root), deadline_ms=int(time.time() * 1000) - 1000))
    assert not result.ok
    assert result.data["outcome"] == "EXPIRED"
    assert "expired" in result.data["reason"]
    assert actuator.executed == 0
    assert all(alive(p) for p in tree.members)


def test_the_grace_period_is_shortened_to_fit_the_deadline(trees: Callable[[str], Any]) -> None:
    tree = trees("stubborn")
    root = tree.pid("root")
    deadline = int(time.time() * 1000) + 3000
    result = Actuator("n1")(zap(root, ctime(root), grace=60, deadline_ms=deadline))
    assert result.ok
    assert result.data["grace_s"] <= 1.6
    assert time.time() * 1000 < deadline, "the result must be ready before the deadline"


# ----------------------------------------------------------------------------- fixtures: D state, GPU


class DStateView(ProcView):
    """The real /proc, except that ``pid`` is reported in D state with the fixture's wchan."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        real = super().stat(pid)
        assert real is not None
        self.real = real
        self.fixture = FIXTURES / "proc" / "4813"

    def stat(self, pid: int) -> tuple[str, int, int, int] | None:
        if pid == self.pid:
            fields = (self.fixture / "stat").read_text().rpartition(")")[2].split()
            return fields[0], self.real[1], self.real[2], self.real[3]
        return super().stat(pid)

    def wchan(self, pid: int) -> str | None:
        if pid == self.pid:
            return (self.fixture / "wchan").read_text().strip()
        return super().wchan(pid)


def test_a_process_in_d_state_is_reported_with_its_wchan(trees: Callable[[str], Any]) -> None:
    tree = trees("sleeper")
    stuck, root = tree.pid("sleeper"), tree.pid("root")
    actuator = Actuator("n1", proc=DStateView(stuck), kill_verify_s=0.3)
    result = actuator(zap(root, ctime(root), grace=0.3))
    assert not result.ok
    assert result.data["outcome"] == "PARTIAL"
    row = next(r for r in result.data["tree"] if r["pid"] == stuck)
    assert row["outcome"] == "d_state"
    assert row["wchan"] == "io_schedule"
    assert "uninterruptible" in row["detail"]
    assert outcomes(result)[root] == "terminated"
    assert [s["signal"] for s in result.data["signals"]] == ["SIGTERM", "SIGKILL"]
    assert "1 in D state" in result.data["reason"]


def test_gpu_memory_still_held_after_the_tree_ended_is_reported(trees: Callable[[str], Any]) -> None:
    tree = trees("sleeper")
    root, worker = tree.pid("root"), tree.pid("sleeper")
    held = {worker}  # NVML keeps listing it: the driver has not freed its memory
    actuator = Actuator("n1", gpu_pids=lambda: set(held), gpu_release_wait_s=0.2)
    command = zap(root, ctime(root), grace=1.0)
    result = actuator.execute(command, gpu_held={worker: [("gpu-0", 3212.0)]})
    assert not result.ok
    gpu = result.data["gpu"]
    assert gpu["checked"] and gpu["released"] is False and gpu["held_by"] == [worker]
    assert gpu["gpus"] == [{"pid": worker, "gpu": "gpu-0", "mem_used_mib": 3212.0}]
    row = next(r for r in result.data["tree"] if r["pid"] == worker)
    assert row["outcome"] == "terminated" and row["gpu_mem_held"] is True
    assert "GPU memory still held" in result.data["reason"]


def test_gpu_memory_released_when_the_tree_ends(trees: Callable[[str], Any]) -> None:
    tree = trees("sleeper")
    root, worker = tree.pid("root"), tree.pid("sleeper")
    actuator = Actuator("n1", gpu_pids=lambda: {worker} if alive(worker) else set())
    result = actuator(zap(root, ctime(root), grace=1.0))
    assert result.ok, result
    assert result.data["gpu"]["checked"] and result.data["gpu"]["released"] is True


def test_without_nvml_gpu_memory_is_reported_unverified(trees: Callable[[str], Any]) -> None:
    tree = trees("")
    root = tree.pid("root")
    result = Actuator("n1").execute(zap(root, ctime(root)), gpu_held={root: [("gpu-1", 100.0)]})
    assert result.ok
    gpu = result.data["gpu"]
    assert gpu["released"] is None and "not verified" in gpu["detail"]


# ----------------------------------------------------------------------------- events, signals


def test_events_record_the_zap_and_the_killed_processes(trees: Callable[[str], Any]) -> None:
    tree = trees("stubborn")
    root = tree.pid("root")
    actuator = Actuator("n1")
    command = zap(root, ctime(root), grace=0.3)
    result = actuator(command)
    events = actuator.events(command, result, now_ms=1234)
    action = events[-1]
    assert action.type is EventType.ACTION_EXEC and action.value == "ZAP" and action.pid == root
    assert action.attrs["by"] == "alice@laptop" and action.attrs["result"] == "DONE"
    killed = {e.pid: e for e in events if e.type is EventType.PROCESS_STATE}
    assert set(killed) == set(tree.members)
    assert all(e.value == "killed" and isinstance(e.attrs["create_time"], float) for e in killed.values())
    assert killed[tree.pid("stubborn")].attrs["signal"] == "SIGKILL"
    assert killed[root].attrs["signal"] == "SIGTERM"


def test_parse_signal() -> None:
    assert parse_signal("TERM") is signal.SIGTERM
    assert parse_signal("sigkill") is signal.SIGKILL
    assert parse_signal("2") is signal.SIGINT
    with pytest.raises(UsageError, match="STOP"):
        parse_signal("STOP")
