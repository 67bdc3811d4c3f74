"""The network probe against fixture trees tests/fixtures/proc/net and tests/fixtures/sys."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from xctl.core.errors import ProbeError
from xctl.core.events import Event, EventType
from xctl.probes.network import (
    DEFAULT_IGNORE,
    NET_DEV_FIELDS,
    LinkTracker,
    NetworkProbe,
    net_dev_events,
    parse_ib_state,
    parse_net_dev,
    parse_operstate,
    parse_snmp,
    tcp_retrans_event,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NOW = 1_732_350_600_000


class Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    shutil.copytree(FIXTURES / "proc" / "net", proc / "net")
    shutil.copytree(FIXTURES / "sys", sys)
    return proc, sys


def bump_net_dev(proc: Path, iface: str, **deltas: int) -> None:
    path = proc / "net" / "dev"
    lines = []
    for line in path.read_text().splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == iface:
            values = [int(v) for v in rest.split()]
            for key, delta in deltas.items():
                values[NET_DEV_FIELDS.index(key)] += delta
            lines.append(f"{name}: " + " ".join(map(str, values)))
        else:
            lines.append(line)
    path.write_text("\n".join(lines) + "\n")


def write(path: Path, value: object) -> None:
    path.write_text(f"{value}\n")


def by(events: list[Event], etype: EventType) -> dict[str, Event]:
    return {e.entity: e for e in events if e.type is etype}


# --- parsers -----------------------------------------------------------------------------------


def test_parse_net_dev_fixture() -> None:
    dev = parse_net_dev((FIXTURES / "proc" / "net" / "dev").read_text())
    assert set(dev) == {"lo", "eth0", "enp59s0f0", "ib0", "veth9c1f2a3"}
    assert dev["eth0"]["rx_bytes"] == 63196662 and dev["eth0"]["tx_packets"] == 1312
    assert dev["enp59s0f0"]["rx_drop"] == 12


def test_parse_net_dev_malformed_lines_are_counted() -> None:
    bad: list[str] = []
    dev = parse_net_dev("eth0: 1 2 3\nbond0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 x\n: 1\n", bad.append)
    assert dev == {} and bad == ["net_dev_malformed"] * 3
    assert parse_net_dev("") == {}


def test_parse_snmp_and_states() -> None:
    tcp = parse_snmp((FIXTURES / "proc" / "net" / "snmp").read_text())
    assert (tcp["OutSegs"], tcp["RetransSegs"], tcp["MaxConn"]) == (2006, 0, -1)
    assert parse_snmp("Tcp: A B\n") == {} and parse_snmp("garbage") == {}
    assert parse_operstate("up\n", None) is True
    assert parse_operstate("lowerlayerdown", "0") is False
    assert parse_operstate("unknown", "1\n") is True
    assert parse_operstate("unknown", None) is None
    assert parse_operstate(None, None) is None
    assert (parse_ib_state("4: ACTIVE\n"), parse_ib_state("1: DOWN"), parse_ib_state("2: INIT")) == (True, False, None)


def test_net_dev_events_bandwidth_and_drops() -> None:
    prev = {"eth0": dict.fromkeys(parse_net_dev("eth0: " + "0 " * 16)["eth0"], 0)}
    cur = {"eth0": {**prev["eth0"], "rx_bytes": 1_250_000_000, "tx_bytes": 625_000_000, "rx_drop": 3, "tx_errs": 1}}
    events = net_dev_events(prev, cur, 2.0, NOW)
    bw, drop = by(events, EventType.TRANSPORT_BW)["eth0"], by(events, EventType.TRANSPORT_DROP)["eth0"]
    assert (bw.value, bw.attrs["rx_gbps"], bw.attrs["tx_gbps"]) == ("7.500", 5.0, 2.5)
    assert (drop.value, drop.attrs["counter"], drop.attrs["rx_drop"], drop.attrs["interval_s"]) == (
        "4",
        "drops+errors",
        3,
        2.0,
    )
    # a counter that went backwards (driver reload) is re-based silently
    assert net_dev_events(cur, prev, 2.0, NOW) == []
    assert net_dev_events(prev, cur, 0.0, NOW) == []


def test_tcp_retrans() -> None:
    prev = {"OutSegs": 1000, "RetransSegs": 0}
    high = tcp_retrans_event(prev, {"OutSegs": 11000, "RetransSegs": 150}, 5.0, NOW)
    assert high is not None and (high.entity, high.value, high.attrs["ratio_pct"]) == ("tcp", "TCP_RETRANS_HIGH", 1.5)
    assert tcp_retrans_event(prev, {"OutSegs": 11000, "RetransSegs": 50}, 5.0, NOW) is None  # 0.5 %
    assert tcp_retrans_event(prev, {"OutSegs": 1100, "RetransSegs": 50}, 5.0, NOW) is None  # too few segments
    assert tcp_retrans_event(prev, {}, 5.0, NOW) is None


def test_link_tracker() -> None:
    links = LinkTracker()
    assert links.update("eth0", "eth0", True, NOW, 0.0, changes=2) == []
    assert [e.value for e in links.update("eth0", "eth0", False, NOW, 10.0, changes=3)] == ["LINK_DOWN"]
    assert links.update("eth0", "eth0", False, NOW, 15.0, changes=3) == []
    back = links.update("eth0", "eth0", True, NOW, 40.0, changes=4)
    assert [e.value for e in back] == ["OK", "LINK_FLAP"]
    assert back[0].attrs["code"] == "LINK_DOWN" and back[1].attrs["down_s"] == 30.0
    # bounced between two samples that both saw it up
    assert [e.value for e in links.update("eth0", "eth0", True, NOW, 45.0, changes=6)] == ["LINK_FLAP"]
    # down for longer than the flap window: healthy again, no flap
    links.update("eth0", "eth0", False, NOW, 50.0)
    assert [e.value for e in links.update("eth0", "eth0", True, NOW, 200.0)] == ["OK"]
    # first seen down: a condition worth reporting once
    assert [e.value for e in links.update("eth9", "eth9", False, NOW, 0.0)] == ["LINK_DOWN"]


# --- the reader --------------------------------------------------------------------------------


def test_reader_against_fixture_tree(roots: tuple[Path, Path]) -> None:
    proc, sys = roots
    clock = Clock()
    probe = NetworkProbe(str(proc), str(sys), 5.0, monotonic=clock)
    assert probe.sample(NOW) == []  # first sample: baselines only, every link is up
    assert "InfiniBand" in probe.describe()

    bump_net_dev(proc, "eth0", rx_bytes=625_000_000, tx_bytes=625_000_000, rx_drop=2)
    bump_net_dev(proc, "veth9c1f2a3", rx_drop=100)
    bump_net_dev(proc, "lo", rx_drop=100)
    ib = sys / "class" / "infiniband" / "mlx5_0" / "ports" / "1"
    write(ib / "counters" / "link_downed", 2)
    write(ib / "counters" / "symbol_error", 7)
    write(ib / "hw_counters" / "np_cnp_sent", 1000 + 5 * 200_000)
    write(ib / "counters" / "port_xmit_data", 100_000_000 + 156_250_000)  # 4-octet words
    write(ib / "counters" / "port_rcv_data", 200_000_000)
    write(sys / "class" / "net" / "ib0" / "operstate", "down")
    clock.t += 5
    events = probe.sample(NOW + 5000)

    bw = by(events, EventType.TRANSPORT_BW)
    assert set(bw) == {"eth0", "enp59s0f0", "ib0", "mlx5_0"}  # lo and veth are skipped
    assert bw["eth0"].value == "2.000"
    assert bw["mlx5_0"].attrs["tx_gbps"] == 1.0 and bw["mlx5_0"].attrs["port"] == 1

    drops = [(e.entity, e.value, e.attrs["counter"]) for e in events if e.type is EventType.TRANSPORT_DROP]
    assert sorted(drops) == [
        ("eth0", "2", "drops+errors"),
        ("mlx5_0", "1", "link_downed"),
        ("mlx5_0", "1000000", "np_cnp_sent"),
        ("mlx5_0", "7", "symbol_error"),
    ]
    errors = sorted((e.entity, e.value) for e in events if e.type is EventType.ERROR_NET)
    assert errors == [("ib0", "LINK_DOWN"), ("mlx5_0", "LINK_FLAP"), ("mlx5_0", "PFC_STORM")]

    # ib0 back up 5 s later: OK and a flap; the IB port goes down
    write(sys / "class" / "net" / "ib0" / "operstate", "up")
    write(ib / "state", "1: DOWN")
    clock.t += 5
    errors = sorted((e.entity, e.value) for e in probe.sample(NOW + 10000) if e.type is EventType.ERROR_NET)
    assert errors == [("ib0", "LINK_FLAP"), ("ib0", "OK"), ("mlx5_0", "LINK_DOWN")]


def test_admin_down_interfaces_are_not_faults(roots: tuple[Path, Path]) -> None:
    proc, sys = roots
    probe = NetworkProbe(str(proc), str(sys), 5.0, ignore="lo", monotonic=Clock())
    # ifb0 is operstate down but administratively down (flags without IFF_UP)
    assert not [e for e in probe.sample(NOW) if e.entity == "ifb0"]


def test_tcp_retrans_through_the_reader(roots: tuple[Path, Path]) -> None:
    proc, sys = roots
    clock = Clock()
    probe = NetworkProbe(str(proc), str(sys), monotonic=clock)
    probe.sample(NOW)
    snmp = proc / "net" / "snmp"
    snmp.write_text(snmp.read_text().replace("2710 2006 0 0 23 0", "12710 12006 500 0 23 0"))
    clock.t += 5
    assert [(e.entity, e.value) for e in probe.sample(NOW + 5000) if e.type is EventType.ERROR_NET] == [
        ("tcp", "TCP_RETRANS_HIGH")
    ]


def test_missing_everything_is_quiet(tmp_path: Path) -> None:
    bad: list[str] = []
    probe = NetworkProbe(str(tmp_path / "proc"), str(tmp_path / "sys"))
    assert probe.sample(NOW, bad.append) == [] and probe.sample(NOW + 5000, bad.append) == []
    assert bad == []
    assert "nothing readable" in probe.describe()


def test_truncated_files_are_counted_not_fatal(roots: tuple[Path, Path]) -> None:
    proc, sys = roots
    (proc / "net" / "dev").write_text("Inter-| Receive\n face |bytes\n  eth0: 1 2 3")
    (proc / "net" / "snmp").write_text("Tcp: RtoAlgorithm RtoMin\n")
    write(sys / "class" / "infiniband" / "mlx5_0" / "ports" / "1" / "counters" / "link_downed", "garbage")
    write(sys / "class" / "net" / "eth0" / "flags", "0xzz")
    bad: list[str] = []
    probe = NetworkProbe(str(proc), str(sys), monotonic=Clock())
    probe.sample(NOW, bad.append)
    assert sorted(bad) == ["net_dev_malformed", "snmp_malformed"]


def test_default_ignore_and_from_spec() -> None:
    ignore = re.compile(DEFAULT_IGNORE)
    assert all(ignore.fullmatch(n) for n in ("lo", "veth1a2b", "docker0", "cali123", "flannel.1", "ifb0"))
    assert not any(ignore.fullmatch(n) for n in ("eth0", "ib0", "enp59s0f0", "bond0", "eno1"))
    probe = NetworkProbe.from_spec("interval=1s,root=/proc,sys=/sys,ignore=lo")
    assert (probe.interval_s, probe.heartbeat_s) == (1.0, 8.0)
    with pytest.raises(ProbeError):
        NetworkProbe.from_spec("ignore=(")
    with pytest.raises(ProbeError):
        NetworkProbe.from_spec("speed=fast")
