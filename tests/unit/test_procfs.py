"""The procfs parsers and reader against the fixture tree tests/fixtures/proc."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xctl.core.errors import ProbeError
from xctl.core.events import Event, EventType
from xctl.probes.procfs import (
    MAX_THREADS_PER_CYCLE,
    THREAD_SPREAD,
    ProcfsProbe,
    decode_exit_status,
    parse_btime,
    parse_cmdline,
    parse_environ,
    parse_meminfo_total,
    parse_stat,
    parse_status,
    parse_task_state,
    process_tree,
    task_window,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "proc"
BTIME = 1_732_350_000
NOW = 1_732_350_600_000


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    shutil.copytree(FIXTURE, root)
    return root


def make(root: Path, clock: Clock | None = None, **kw: object) -> ProcfsProbe:
    return ProcfsProbe(str(root), 2.0, clk_tck=100, page_size=4096, monotonic=clock or Clock(), **kw)  # type: ignore[arg-type]


def states(events: list[Event]) -> list[tuple[int | None, str, str]]:
    return [(e.pid, e.entity, e.value) for e in events if e.type is EventType.PROCESS_STATE]


def set_stat(root: Path, pid: int, **fields: object) -> None:
    """Rewrite chosen fields of a fixture stat file (state, utime, rss...)."""
    path = root / str(pid) / "stat"
    text = path.read_text()
    close = text.rindex(")")
    head, rest = text[: close + 1], text[close + 1 :].split()
    index = {"state": 0, "utime": 11, "stime": 12, "rss": 21}
    for key, value in fields.items():
        rest[index[key]] = str(value)
    path.write_text(head + " " + " ".join(rest) + "\n")


# --- parsers -----------------------------------------------------------------------------------


def test_parse_stat_comm_with_spaces_and_parens() -> None:
    st_ = parse_stat((FIXTURE / "6000" / "stat").read_text())
    assert st_ is not None
    assert (st_.pid, st_.comm, st_.state, st_.ppid) == (6000, "my app (v2)", "R", 5999)


def test_parse_stat_fields() -> None:
    st_ = parse_stat((FIXTURE / "4812" / "stat").read_text())
    assert st_ is not None
    assert (st_.utime, st_.stime, st_.num_threads, st_.starttime, st_.rss_pages) == (5000, 700, 64, 600100, 2621440)
    zombie = parse_stat((FIXTURE / "4814" / "stat").read_text())
    assert zombie is not None and zombie.state == "Z" and zombie.exit_status == 9


@pytest.mark.parametrize(
    "text",
    [
        "",
        "7000 (python3) S 1 7000 7000 0 -1 4194304 120\n",  # truncated
        "7000 python3 S 1",  # no parens
        "(python3) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22",  # no pid
        "7000 (py) S x 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22",  # not a number
        "7000 (py) SS 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21",
        "7000 )py( S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22",
    ],
)
def test_parse_stat_malformed(text: str) -> None:
    assert parse_stat(text) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_parse_stat_never_raises(text: str) -> None:
    parse_stat(text)
    parse_task_state(text)
    parse_stat("1 (" + text + ") S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_environ_and_cmdline_never_raise(data: bytes) -> None:
    parse_environ(data)
    parse_cmdline(data)


def test_decode_exit_status() -> None:
    assert decode_exit_status(9) == -9  # killed by SIGKILL
    assert decode_exit_status(3 << 8) == 3
    assert decode_exit_status(0) == 0


def test_parse_environ_skips_garbage() -> None:
    env = parse_environ((FIXTURE / "4812" / "environ").read_bytes())
    assert env["RANK"] == "11" and env["SLURM_JOB_ID"] == "4242"
    assert "NOEQUALSIGN" not in env and "" not in env
    assert env["BIN"] == "\ufffd("  # undecodable value bytes are replaced, not fatal
    assert all(k.isascii() for k in env)


def test_small_parsers() -> None:
    assert parse_btime((FIXTURE / "stat").read_text()) == BTIME
    assert parse_btime("cpu 1 2 3\n") is None
    assert parse_meminfo_total((FIXTURE / "meminfo").read_text()) == 2113663748 * 1024
    assert parse_meminfo_total("MemTotal: lots\n") is None
    assert parse_cmdline(b"/usr/bin/python3\0-u\0train.py\0") == ["/usr/bin/python3", "-u", "train.py"]
    assert parse_cmdline(b"") == []
    status = parse_status((FIXTURE / "5000" / "status").read_text())
    assert status["NSpid"] == "5000\t1" and status["Name"] == "pt_main_thread"


def test_process_tree_excludes_init() -> None:
    ppids = {1: 0, 5999: 1, 6000: 5999, 6001: 6000, 6002: 6001, 4900: 1}
    assert process_tree({6000}, ppids) == {5999, 6000, 6001, 6002}
    assert process_tree({12345}, ppids) == set()
    assert process_tree({6002, 6000}, ppids) == {5999, 6000, 6001, 6002}


# --- the reader --------------------------------------------------------------------------------


def test_first_sample_selection_and_start_attrs(proc: Path) -> None:
    bad: list[str] = []
    probe = make(proc)
    events = probe.sample(NOW, bad.append)
    started = {e.pid or 0: e for e in events if e.value == "start"}
    # watched by name (python3, torchrun) or argv[0] (pt_main_thread runs "python"); not sshd,
    # not the kernel thread named python3 (pid 3), not the GPU tree (no GPU pids given)
    assert sorted(started) == [4800, 4812, 4813, 4814, 5000]
    assert bad == ["procfs_stat_malformed"]  # pid 7000's truncated stat; pid 7100 vanished quietly

    worker = started[4812]
    assert (worker.entity, worker.job, worker.ts) == ("python3", "4242", NOW)
    a = worker.attrs
    assert a["name"] == "python3"
    assert a["cmdline"] == "/usr/bin/python3 -u train.py --config llama.yaml"
    assert a["create_time"] == pytest.approx(BTIME + 600100 / 100)
    assert (a["ppid"], a["rank"], a["local_rank"], a["world_size"]) == (4800, 11, 3, 16)
    assert (a["scheduler"], a["step"], a["uid"], a["initial"]) == ("slurm", "0", 1000, True)

    k8s = started[5000].attrs  # no environ file (as if not permitted): identity from the cgroup only
    assert started[5000].job == "pod:fbc202d3-da21-11e8-ab5e-42010a80014b"
    assert str(k8s["container_id"]).startswith("0a1b22ec") and k8s["ns_pid"] == 1
    assert "rank" not in k8s

    zombie = [e for e in events if e.value == "zombie"]
    assert [(e.pid, e.attrs["exit_code"]) for e in zombie] == [(4814, -9)]


def test_gpu_consumers_bring_their_tree(proc: Path) -> None:
    probe = make(proc, gpu_pids=lambda: {6000, 99999})
    started = {e.pid for e in probe.sample(NOW) if e.value == "start"}
    assert {5999, 6000, 6001, 6002} <= started
    assert 1 not in started and 4900 not in started


def test_watch_patterns_are_configurable(proc: Path) -> None:
    probe = make(proc, watch=["ssh.*"])
    assert {e.pid for e in probe.sample(NOW) if e.value == "start"} == {4900}
    with pytest.raises(ProbeError):
        make(proc, watch=["(unclosed"])


def test_lifecycle_d_state_running_exit(proc: Path) -> None:
    clock = Clock()
    probe = make(proc, clock)
    probe.sample(NOW)
    # pid 4813 is in D: d_state only after three consecutive samples
    clock.t += 2
    assert (4813, "python3", "d_state") not in states(probe.sample(NOW + 2000))
    clock.t += 2
    third = [e for e in probe.sample(NOW + 4000) if e.value == "d_state"]
    assert [(e.pid, e.attrs["wchan"], e.job) for e in third] == [(4813, "io_schedule", "4242")]
    clock.t += 2
    assert not [e for e in probe.sample(NOW + 6000) if e.value == "d_state"]  # said once
    set_stat(proc, 4813, state="S")
    clock.t += 2
    assert states(probe.sample(NOW + 8000)) == [(4813, "python3", "running")]

    # the zombie is reaped and a worker dies: both exit; the zombie's exit code is remembered
    shutil.rmtree(proc / "4814")
    shutil.rmtree(proc / "4812")
    clock.t += 2
    exits = {e.pid or 0: e for e in probe.sample(NOW + 10000) if e.value == "exit"}
    assert sorted(exits) == [4812, 4814]
    assert exits[4814].attrs["exit_code"] == -9
    assert "exit_code" not in exits[4812].attrs  # not knowable for a process we never saw as a zombie
    assert exits[4812].attrs["create_time"] == pytest.approx(BTIME + 6001.0)


def test_pid_reuse_is_exit_then_start(proc: Path) -> None:
    probe = make(proc)
    probe.sample(NOW)
    text = (proc / "4812" / "stat").read_text().replace(" 600100 ", " 700000 ")
    (proc / "4812" / "stat").write_text(text)
    assert [(p, v) for p, _, v in states(probe.sample(NOW + 2000)) if p == 4812] == [(4812, "start"), (4812, "exit")]


def test_metrics_only_on_change_or_every_tenth(proc: Path) -> None:
    clock = Clock()
    probe = make(proc, clock, watch=["torchrun"])
    first = probe.sample(NOW)
    mem = [e for e in first if e.type is EventType.COMPUTE_MEM]
    assert [(e.pid, e.entity) for e in mem] == [(4800, "sysmem")]
    assert mem[0].attrs["total_mib"] == 2113663748 // 1024
    assert mem[0].attrs["used_mib"] == 100.0  # 25600 pages of 4 KiB

    # 2 s later torchrun used 1 s of CPU: 50 % of one core
    set_stat(proc, 4800, utime=200)
    clock.t += 2
    cpu = [e for e in probe.sample(NOW + 2000) if e.type is EventType.COMPUTE_UTIL]
    assert [(e.entity, e.pid, e.value, e.job) for e in cpu] == [("cpu", 4800, "50.0", "4242")]

    # same rate again: nothing; a 0.5-point change: nothing; a big change: sent
    set_stat(proc, 4800, utime=300)
    clock.t += 2
    assert not [e for e in probe.sample(NOW + 4000) if e.type in (EventType.COMPUTE_UTIL, EventType.COMPUTE_MEM)]
    set_stat(proc, 4800, utime=401)
    clock.t += 2
    assert not [e for e in probe.sample(NOW + 6000) if e.type is EventType.COMPUTE_UTIL]
    set_stat(proc, 4800, utime=1001)
    clock.t += 2
    assert [e.value for e in probe.sample(NOW + 8000) if e.type is EventType.COMPUTE_UTIL] == ["300.0"]

    # every 10th sample both are re-sent even when unchanged
    sent = 0
    for i in range(10):
        clock.t += 2
        set_stat(proc, 4800, utime=1001 + 600 * (i + 1))
        sent += len([e for e in probe.sample(NOW + 10000 + i * 2000) if e.type is EventType.COMPUTE_MEM])
    assert sent == 1


def test_missing_root_degrades_quietly(tmp_path: Path) -> None:
    probe = ProcfsProbe(str(tmp_path / "nope"))
    assert probe.sample(NOW) == []
    assert "not readable" in probe.describe()


def test_from_spec() -> None:
    probe = ProcfsProbe.from_spec("interval=500ms,root=/proc,watch=trainer.*")
    assert probe.interval_s == 0.5 and probe.root == "/proc"
    assert [p.pattern for p in probe.watch] == ["trainer.*"]
    assert probe.heartbeat_s is not None and probe.heartbeat_s > 3 * 0.5
    assert ProcfsProbe.from_spec(None).interval_s == 2.0
    for bad in ("interval=0s", "interval=soon", "colour=blue", "root"):
        with pytest.raises(ProbeError):
            ProcfsProbe.from_spec(bad)


def test_exec_is_running_with_new_name_not_a_new_start(proc: Path) -> None:
    probe = make(proc)
    probe.sample(NOW)
    stat = proc / "4812" / "stat"
    stat.write_text(stat.read_text().replace("(python3)", "(pt_main_thread)"))
    (proc / "4812" / "cmdline").write_bytes(b"python3\0-m\0trainer\0")
    events = [e for e in probe.sample(NOW + 2000) if e.pid == 4812 and e.type is EventType.PROCESS_STATE]
    assert [(e.entity, e.value, e.attrs["exec"], e.attrs["cmdline"]) for e in events] == [
        ("pt_main_thread", "running", True, "python3 -m trainer")
    ]
    assert events[0].attrs["create_time"] == pytest.approx(BTIME + 6001.0)


# --- worker threads in D -------------------------------------------------------------------------


def add_thread(root: Path, pid: int, tid: int, comm: str, state: str, wchan: str | None = None) -> None:
    """A /proc/PID/task/TID entry: the main thread's stat with this thread's id, comm and state."""
    task = root / str(pid) / "task" / str(tid)
    task.mkdir(parents=True, exist_ok=True)
    main = (root / str(pid) / "stat").read_text()
    rest = main[main.rindex(")") + 1 :].split()
    rest[0] = state
    (task / "stat").write_text(f"{tid} ({comm}) " + " ".join(rest) + "\n")
    if wchan is not None:
        (task / "wchan").write_text(wchan)


def thread_d_states(events: list[Event]) -> list[tuple[int | None, str, object, object, object]]:
    return [
        (e.pid, e.value, e.attrs.get("tid"), e.attrs.get("thread"), e.attrs.get("wchan"))
        for e in events
        if e.type is EventType.PROCESS_STATE and e.value in ("d_state", "running")
    ]


def test_parse_task_state() -> None:
    assert parse_task_state("4831 (pt_data (w)) D 4800 4812 0") == ("pt_data (w)", "D")
    assert parse_task_state((FIXTURE / "4813" / "stat").read_text()) == ("python3", "D")
    for bad in ("", "4831 pt_data D", "4831 (x)D 1", "4831 (x) DD 1", "4831 )x( D 1", "4831 (x)"):
        assert parse_task_state(bad) is None


def test_task_window_walks_the_thread_ids_in_turn() -> None:
    tids = list(range(100, 110))
    assert task_window(tids, 0, 4) == ([100, 101, 102, 103], 103)
    assert task_window(tids, 103, 4) == ([104, 105, 106, 107], 107)
    assert task_window(tids, 107, 4) == ([108, 109, 100, 101], 101)  # round to the start
    assert task_window(tids, 500, 4) == ([100, 101, 102, 103], 103)  # threads above the cursor died
    assert task_window(tids, 104, 20) == ([105, 106, 107, 108, 109, 100, 101, 102, 103, 104], 104)  # each once
    assert task_window(tids, 0, 20) == (tids, 109)
    assert task_window([], 7, 4) == ([], 7)
    assert task_window(tids, 0, 0) == ([], 0)


def test_worker_thread_in_d_makes_the_process_d_state(proc: Path) -> None:
    # pid 4812: the main thread waits on a futex (S), a dataloader thread is stuck on NFS (D).
    set_stat(proc, 4812, state="S")
    (proc / "4812" / "wchan").write_text("futex_wait_queue")
    add_thread(proc, 4812, 4812, "python3", "S", "futex_wait_queue")
    add_thread(proc, 4812, 4830, "pt_autograd_0", "S", "futex_wait_queue")
    add_thread(proc, 4812, 4831, "pt_data_worker", "D", "rpc_wait_bit_killable")
    clock = Clock()
    probe = make(proc, clock, watch=["python3"], thread_spread=1)  # every thread every sample
    got = []
    for i in range(4):
        clock.t += 2
        got.append([x for x in thread_d_states(probe.sample(NOW + i * 2000)) if x[0] == 4812])
    # after D_STATE_SAMPLES consecutive samples, once, naming the thread and its wchan
    assert got == [[], [], [(4812, "d_state", 4831, "pt_data_worker", "rpc_wait_bit_killable")], []]

    # the thread leaves D: running, as when the main thread does
    add_thread(proc, 4812, 4831, "pt_data_worker", "S")
    clock.t += 2
    assert [x for x in thread_d_states(probe.sample(NOW + 8000)) if x[0] == 4812] == [
        (4812, "running", None, None, None)
    ]

    # a short D (two samples, then none) is normal I/O, and so are short waits of different
    # threads one after the other: the count is per thread, so no d_state
    for i, (a, b) in enumerate((("D", "S"), ("D", "S"), ("S", "S"), ("D", "S"), ("S", "D"), ("D", "S"))):
        add_thread(proc, 4812, 4831, "pt_data_worker", a)
        add_thread(proc, 4812, 4830, "pt_autograd_0", b)
        clock.t += 2
        assert not [x for x in thread_d_states(probe.sample(NOW + 10000 + i * 2000)) if x[0] == 4812]


def test_threads_are_spread_over_samples_and_checked_fully_before_clearing(proc: Path) -> None:
    set_stat(proc, 4812, state="S")
    for tid in range(5001, 5009):
        add_thread(proc, 4812, tid, "pt_worker", "S")
    add_thread(proc, 4812, 5008, "pt_data_worker", "D")  # the last of eight
    clock = Clock()
    probe = make(proc, clock, watch=["python3"])  # THREAD_SPREAD: 2 of the 8 per sample
    reads, seen = [], []
    for i in range(6):
        before = probe.thread_reads
        clock.t += 2
        seen.append([x[2] for x in thread_d_states(probe.sample(NOW + i * 2000)) if x[0] == 4812])
        reads.append(probe.thread_reads - before)
    # found in the fourth window, then followed alone for D_STATE_SAMPLES samples
    assert reads == [2, 2, 2, 2, 1, 1]
    assert seen == [[], [], [], [], [], [5008]]

    # it leaves D while another worker is in D: still d_state (every thread was read to know)
    add_thread(proc, 4812, 5008, "pt_data_worker", "S")
    add_thread(proc, 4812, 5002, "pt_worker", "D")
    before = probe.thread_reads
    clock.t += 2
    assert [x for x in thread_d_states(probe.sample(NOW + 20000)) if x[0] == 4812] == []
    assert probe.thread_reads - before <= 8
    # none in D any more: running, after reading all eight
    add_thread(proc, 4812, 5002, "pt_worker", "S")
    before = probe.thread_reads
    clock.t += 2
    assert [x[1] for x in thread_d_states(probe.sample(NOW + 22000)) if x[0] == 4812] == ["running"]
    assert probe.thread_reads - before == 8


def test_thread_reads_per_process_are_bounded(proc: Path) -> None:
    set_stat(proc, 4812, state="S")
    add_thread(proc, 4812, 4812, "python3", "S")
    for tid in range(5001, 5010):
        add_thread(proc, 4812, tid, "pt_worker", "S")
    add_thread(proc, 4812, 5010, "pt_data_worker", "D")  # the last of ten: found in the third window
    clock = Clock()
    probe = make(proc, clock, watch=["python3"], max_threads=4, thread_spread=1)
    reads, d_states = [], []
    for i in range(5):
        before = probe.thread_reads
        clock.t += 2
        events = probe.sample(NOW + i * 2000)
        reads.append(probe.thread_reads - before)
        d_states.append([x for x in thread_d_states(events) if x[0] == 4812])
    # windows of at most 4 threads; once found, the thread in D is read first and alone
    assert reads == [4, 4, 2, 1, 1]
    assert d_states == [[], [], [], [], [(4812, "d_state", 5010, "pt_data_worker", None)]]


def test_default_bound_on_a_process_with_many_threads(proc: Path) -> None:
    set_stat(proc, 4812, state="S")
    for tid in range(10_000, 10_300):
        add_thread(proc, 4812, tid, "omp_worker", "S")
    for spread, expected in (
        (1, [MAX_THREADS_PER_CYCLE] * 3),
        (THREAD_SPREAD, [75, 75, 75]),
    ):
        probe = make(proc, watch=["python3"], thread_spread=spread)
        counts = []
        for i in range(3):
            before = probe.thread_reads
            probe.sample(NOW + i * 2000)
            counts.append(probe.thread_reads - before)
        assert counts == expected


def test_single_threaded_and_main_in_d_processes_read_no_threads(proc: Path) -> None:
    # 4813 is single-threaded and in D; 4812 (64 threads) has its main thread in D: neither
    # needs a look at its threads
    add_thread(proc, 4813, 4813, "python3", "D")
    set_stat(proc, 4812, state="D")
    add_thread(proc, 4812, 4830, "pt_data_worker", "D")
    probe = make(proc, watch=["python3"])
    for i in range(3):
        probe.sample(NOW + i * 2000)
    assert probe.thread_reads == 0
