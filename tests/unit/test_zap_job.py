"""Which processes of a job `xctl zap job:ID` targets: the tops of its trees, per node."""

from __future__ import annotations

from xctl.cli.zap_job import job_roots


def row(node: str, pid: int, ppid: int | None, rank: int | None = None) -> dict[str, object]:
    return {"node": node, "pid": pid, "ppid": ppid, "rank": rank}


def test_ranks_are_roots_and_their_workers_are_not() -> None:
    rows = [
        row("n2", 300, 1, rank=3),
        row("n1", 100, 1, rank=0),
        row("n1", 101, 100),  # a dataloader worker of rank 0 (it inherits the job)
        row("n1", 200, 1, rank=1),
        row("n2", 301, 300),
    ]
    assert [(r["node"], r["pid"]) for r in job_roots(rows)] == [("n1", 100), ("n1", 200), ("n2", 300)]


def test_a_parent_pid_on_another_node_does_not_make_a_child() -> None:
    # PID namespaces: pid 100 on n1 is not the parent of n2's process whose ppid is 100.
    rows = [row("n1", 100, 1, rank=0), row("n2", 7, 100, rank=1)]
    assert [(r["node"], r["pid"]) for r in job_roots(rows)] == [("n1", 100), ("n2", 7)]


def test_unknown_parents_and_ranks_still_give_an_order() -> None:
    rows = [row("n1", 9, None), row("n1", 5, None, rank=2)]
    assert [r["pid"] for r in job_roots(rows)] == [5, 9]  # ranked first, then by pid
