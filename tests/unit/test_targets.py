"""Targets of why/zap/diag: ``node:pid``, a bare ``pid`` and ``job:ID``."""

from __future__ import annotations

import pytest

from xctl.core.errors import TargetError, UsageError
from xctl.core.targets import Target, parse_target


def test_node_and_pid() -> None:
    assert parse_target("node3:4812") == Target(node="node3", pid=4812)


def test_surrounding_whitespace_is_ignored() -> None:
    assert parse_target("  node3:4812\n") == Target(node="node3", pid=4812)


def test_bare_pid_without_a_default_node_leaves_the_node_open() -> None:
    assert parse_target("4812") == Target(node=None, pid=4812)


def test_bare_pid_with_a_default_node() -> None:
    assert parse_target("4812", default_node="node3") == Target(node="node3", pid=4812)


def test_an_explicit_node_wins_over_the_default() -> None:
    assert parse_target("node7:4812", default_node="node3") == Target(node="node7", pid=4812)


def test_job() -> None:
    assert parse_target("job:job-42") == Target(job="job-42")
    assert parse_target("job:12345", default_node="node3") == Target(job="12345")


@pytest.mark.parametrize(
    "node",
    ["gpu-node-01", "node3.cluster.local", "a100-rack2.dc-1.example.com", "n_1", "10.0.0.7", "fe80::1"],
)
def test_node_names_with_dashes_dots_and_colons(node: str) -> None:
    assert parse_target(f"{node}:4812") == Target(node=node, pid=4812)


def test_string_forms() -> None:
    assert str(Target(node="node3", pid=4812)) == "node3:4812"
    assert str(Target(pid=4812)) == "4812"
    assert str(Target(job="job-42")) == "job:job-42"


@pytest.mark.parametrize("text", ["node3:4812", "4812", "job:job-42", "gpu-node-01.dc:7"])
def test_parse_of_str_round_trips(text: str) -> None:
    assert str(parse_target(text)) == text


def message(text: str, **kw: str) -> str:
    with pytest.raises(TargetError) as info:
        parse_target(text, **kw)
    assert isinstance(info.value, UsageError)
    assert info.value.exit_code == 2
    return str(info.value)


def test_a_non_numeric_pid_says_the_pid_must_be_a_number() -> None:
    msg = message("node3:abc")
    assert "'node3:abc'" in msg
    assert "pid must be a number" in msg


@pytest.mark.parametrize("text", ["abc", "node3:", "node3:12a", "node3:-5", "node3:+5", "node3:1.5", "node3: 5"])
def test_malformed_pids(text: str) -> None:
    assert "pid must be a number" in message(text)


@pytest.mark.parametrize("text", ["node3:١٢", "node3:²", "١٢"])
def test_non_ascii_digits_are_not_numbers(text: str) -> None:
    assert "pid must be a number" in message(text)


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_an_empty_target(text: str) -> None:
    assert message(text) == "empty target: use node:pid, pid or job:ID"


def test_an_empty_node_name() -> None:
    assert message(":12") == "':12': node name is empty (use node:pid)"


def test_an_empty_job_id() -> None:
    assert message("job:") == "'job:': job id is empty (use job:ID)"


@pytest.mark.parametrize("text", ["node3:0", "0", "node3:2147483648", "99999999999999999999"])
def test_out_of_range_pids(text: str) -> None:
    assert "out of range" in message(text)


def test_the_largest_pid_is_in_range() -> None:
    assert parse_target("node3:2147483647").pid == 2**31 - 1
