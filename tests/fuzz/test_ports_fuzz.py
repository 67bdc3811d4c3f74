"""Fuzzing every listening port of a running aggregator, and an agent's control socket.

Frames: random bytes; valid messages with flipped bytes, truncated, with a field of the wrong
type, with an unknown protocol version, with fields dropped or added; huge declared lengths
(a str32/array32/map32/bin32 header claiming gigabytes); deep nesting; extension types and
invalid UTF-8; wrong frame counts; and, in a phase of their own, frames above the socket's
MAXMSGSIZE (libzmq drops those and disconnects the sender before xctl sees them: they are
counted here, not by the daemon).

Afterwards the daemons must still answer correctly, their RSS must not have grown beyond a
bound, and their counters must account for every frame: the test decodes each frame itself
with the same readers and knows which ones the daemon must drop, and by what rule.

Frames per port: XCTL_FUZZ_FRAMES (default 3,000, to keep the suite fast). The full run of
the issue:

    XCTL_FUZZ_FRAMES=100000 .venv/bin/pytest tests/fuzz/test_ports_fuzz.py -s

(-s shows the figures: frames per kind, counters, RSS before and after). XCTL_FUZZ_SEED fixes
the random seed (it is printed).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from waiting import wait_for
from zmq.utils.monitor import recv_monitor_message

from xctl.cli.daemons import free_port_base
from xctl.core.errors import ProtocolError, XctlError
from xctl.core.events import Event, EventType
from xctl.wire.client import QueryClient
from xctl.wire.codec import CONTROL_MAX, EVENTS_MAX, QUERY_MAX, pack
from xctl.wire.framing import read_batch, read_control, read_query, split_envelope
from xctl.wire.messages import (
    Ack,
    Command,
    ErrorMessage,
    EventBatch,
    Heartbeat,
    Hello,
    QueryRequest,
    Result,
    Snapshot,
    SnapshotReq,
)
from xctl.wire.sockets import endpoints

FRAMES = int(os.environ.get("XCTL_FUZZ_FRAMES", "3000"))
SEED = int(os.environ.get("XCTL_FUZZ_SEED", str(random.SystemRandom().randrange(2**32))))
XCTL = [sys.executable, "-m", "xctl.cli.main", "--log-level", "warning"]
#: RSS growth allowed over a fuzz run (MiB): caches that fill up (recent events, per-node
#: state of node names the mutations invent) plus allocator slack; a leak per frame would
#: exceed it long before 100,000 frames.
RSS_BOUND_MIB = 64 + FRAMES // 2000
FUZZER = "fuzzer"
# Waits poll the daemons every POLL_S; an XctlError there (no answer yet) counts as "not yet".
POLL_S = 0.1
NOT_YET = (XctlError,)
#: Counters count as settled when two readings this far apart agree.
SETTLE_S = 0.2
#: After the oversized frames: how long xctl is watched for seeing any of them (it must not), an
#: observation window rather than synchronisation.
OVERSIZED_WATCH_S = 0.5

E = [
    Event(1_732_350_000_123, EventType.ERROR_HW, "gpu-3", "XID_79", 4812, None, {"pci": "0000:3b:00.0"}),
    Event(1_732_350_000_124, EventType.PROCESS_STATE, "python3", "start", 4800, "job-42",
          {"name": "python3", "rank": 3, "create_time": 1.5}),
    Event(1_732_350_000_125, EventType.COMPUTE_UTIL, "gpu-0", "97"),
]


def _bases_events() -> list[dict[str, Any]]:
    return [
        EventBatch(FUZZER, "e1", 7, 1_732_350_000_200, tuple(E)).to_dict(),
        EventBatch(FUZZER, "e1", 8, 1_732_350_000_300, ()).to_dict(),
    ]


def _bases_control(node: str) -> list[dict[str, Any]]:
    return [
        Hello(node, "e1", "0.1.0", ("sim", "procfs"), 4321).to_dict(),
        Heartbeat(ts=1_732_350_000_000, node=node, epoch="e1", seq=3, probes=({"name": "sim", "state": "ok",
                                                                                 "detail": ""},)).to_dict(),
        Heartbeat(ts=1_732_350_000_000, start_id="abcdef012345").to_dict(),
        SnapshotReq(node, "r1").to_dict(),
        Snapshot(node, "e1", 3, "r1", tuple(E)).to_dict(),
        # An op no agent runs, long expired: a mutation cannot turn it into a kill.
        Command(id="c1", op="noop", target={"pid": 999_999_999, "create_time": 1.0}, deadline=1,
                requested_by="fuzz", args={"signal": "TERM"}).to_dict(),
        Ack("c1", node).to_dict(),
        Result("c1", node, False, {"outcome": "REFUSED"}, "x").to_dict(),
        ErrorMessage("BAD", "m").to_dict(),
    ]


def _bases_query() -> list[dict[str, Any]]:
    return [
        QueryRequest("q1", "ps", {"node": FUZZER}).to_dict(),
        QueryRequest("q2", "nodes", {}).to_dict(),
        QueryRequest("q3", "why", {"target": f"{FUZZER}:4800"}).to_dict(),
        QueryRequest("q4", "events", {"limit": 5, "type": "error"}).to_dict(),
        QueryRequest("q5", "health", {}).to_dict(),
        QueryRequest("q6", "jobs", {}).to_dict(),
        QueryRequest("q7", "zap", {"target": {"node": "no-such-node", "pid": 1}, "dry_run": True}).to_dict(),
    ]


_HUGE_HEADERS = [b"\xdb\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                 b"\xdc\xff\xff", b"\xde\xff\xff", b"\xda\xff\xff", b"\xc9\xff\xff\xff\xff\x01"]
_ODD_VALUES: list[Any] = [None, True, -1, 0, 2**63, -(2**63), 1.5, float("nan"), float("inf"), "", "x" * 300,
                          b"\x00\xff", [], {}, [1, [2, [3]]], {"k": {"k": {}}}, "\u00e9", 10**18]


class Mutator:
    """Makes one fuzz payload (bytes) from a list of valid base messages."""

    def __init__(self, rng: random.Random, bases: list[dict[str, Any]], limit: int) -> None:
        self.rng = rng
        self.bases = bases
        self.packed = [pack(b) for b in bases]
        #: The port's MAXMSGSIZE: larger frames belong to the oversized phase.
        self.limit = limit

    def payload(self) -> tuple[str, bytes]:
        while True:
            kind = self.rng.choice(
                ["random", "flip", "flip", "truncate", "huge", "deep", "wrong_type", "wrong_type", "version",
                 "fields", "ext", "valid"]
            )
            data: bytes = getattr(self, f"_{kind}")()
            if len(data) <= self.limit:
                return kind, data

    def _random(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([0, 1, 2, 7, 33, 200, 1500]))

    def _flip(self) -> bytes:
        raw = bytearray(self.rng.choice(self.packed))
        for _ in range(self.rng.randint(1, 8)):
            raw[self.rng.randrange(len(raw))] ^= 1 << self.rng.randrange(8)
        return bytes(raw)

    def _truncate(self) -> bytes:
        raw = self.rng.choice(self.packed)
        return raw[: self.rng.randrange(len(raw))]

    def _huge(self) -> bytes:
        header = self.rng.choice(_HUGE_HEADERS)
        raw = self.rng.choice(self.packed)
        if self.rng.random() < 0.5:
            return header + self.rng.randbytes(self.rng.randint(0, 16))
        cut = self.rng.randrange(1, len(raw))  # a huge length spliced into a valid message
        return raw[:cut] + header + raw[cut:]

    def _deep(self) -> bytes:
        depth = self.rng.choice([33, 100, 1025, 5000, 50_000])
        opener = self.rng.choice([b"\x91", b"\x81\xa1k"])
        if self.rng.random() < 0.5:
            return opener * depth + b"\xc0"
        obj = dict(self.rng.choice(self.bases))
        nested: Any = None
        for _ in range(min(depth, 200)):
            nested = [nested]
        obj[self.rng.choice(list(obj))] = nested
        return msgpack.packb(obj)

    def _wrong_type(self) -> bytes:
        obj = dict(self.rng.choice(self.bases))
        key = self.rng.choice(list(obj))
        obj[key] = self.rng.choice(_ODD_VALUES)
        events_ok = isinstance(obj.get("events"), list) and obj["events"]
        if events_ok and all(isinstance(e, list) for e in obj["events"]) and self.rng.random() < 0.5:
            events = [list(e) for e in obj["events"]]
            events[self.rng.randrange(len(events))][self.rng.randrange(7)] = self.rng.choice(_ODD_VALUES)
            obj["events"] = events
        return msgpack.packb(obj)

    def _version(self) -> bytes:
        obj = dict(self.rng.choice(self.bases))
        obj["v"] = self.rng.choice([0, 2, 99, -1, "1", None, 1.0, True, 2**40])
        return msgpack.packb(obj)

    def _fields(self) -> bytes:
        obj = dict(self.rng.choice(self.bases))
        if self.rng.random() < 0.5 and len(obj) > 1:
            del obj[self.rng.choice(list(obj))]
        else:
            obj[self.rng.choice(["x", "extra", "t", "node", "id"])] = self.rng.choice(_ODD_VALUES)
        return msgpack.packb(obj)

    def _ext(self) -> bytes:
        choice = self.rng.randrange(3)
        if choice == 0:
            return msgpack.packb({"v": 1, "t": "hello", "x": msgpack.ExtType(5, b"abc")})
        if choice == 1:
            return msgpack.packb({"v": 1, "t": "hello", "node": b"\xff\xfe".decode("latin-1")})[:-2] + b"\xff\xfe"
        return b"\x81\xa1v\x01\xa3\xff\xfe\xfd"  # {"v": 1, <invalid UTF-8 key>}

    def _valid(self) -> bytes:
        return self.rng.choice(self.packed)


def _shape(rng: random.Random, payload: bytes, normal: Callable[[bytes], list[bytes]],
           odd: list[Callable[[bytes], list[bytes]]]) -> list[bytes]:
    """Mostly the port's normal framing; sometimes a wrong frame count or envelope."""
    return rng.choice(odd)(payload) if rng.random() < 0.08 else normal(payload)


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    assert match, text
    return int(match.group(1))


class Proc:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._fh = log.open("ab")
        env = {k: v for k, v in os.environ.items() if k != "XCTL_KEYS"}
        self.proc = subprocess.Popen([*XCTL, *args], stdout=self._fh, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


# ------------------------------------------------------------------------------ the aggregator


class AggregatorFuzz:
    def __init__(self, ctx: zmq.Context[Any], port: int, rng: random.Random) -> None:
        self.ctx = ctx
        self.eps = endpoints("127.0.0.1", port)
        self.rng = rng
        self.client = QueryClient(self.eps.query, timeout_s=10.0, retries=0)
        self.polls = 0
        self.kinds: dict[str, Counter[str]] = {}

    def health(self) -> dict[str, Any]:
        self.polls += 1
        counters: dict[str, Any] = self.client.request("health")["counters"]
        return counters

    def socket(self, kind: int, **opts: Any) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 10_000)
        for name, value in opts.items():
            sock.setsockopt(getattr(zmq, name), value)
        return sock


def _drops(counters: dict[str, Any], prefix: str, exclude: tuple[str, ...] = ()) -> int:
    return sum(n for k, n in counters["dropped"].items() if k.startswith(prefix) and k not in exclude)


def _expect_event_drop(frames: list[bytes]) -> bool:
    try:
        read_batch(frames)
    except ProtocolError:
        return True
    return False


_HANDLED = (Hello, Heartbeat, Snapshot, Ack, Result)


def _expect_control_drop(frames: list[bytes]) -> bool:
    """Whether the aggregator must drop this (as the DEALER ``fuzzer/1`` sends it)."""
    if len(frames) != 1:
        return True
    try:
        message = read_control(frames[0])
    except ProtocolError:
        return True
    node = getattr(message, "node", None)
    return not isinstance(message, _HANDLED) or not node or node != FUZZER


def _expect_query_drop(frames: list[bytes]) -> bool:
    try:
        _envelope, payload = split_envelope([b"\x00rid", *frames])
        read_query(payload)
    except ProtocolError:
        return True
    return False


def test_every_aggregator_port_survives_fuzzing(tmp_path: Path, ctx: zmq.Context[Any], procs: list[Proc]) -> None:
    rng = random.Random(SEED)
    print(f"\nfuzz: {FRAMES} frames per port, seed {SEED}")
    port = free_port_base()
    agg = Proc(["aggregator", "--port", str(port), "--metrics-port", "0"], tmp_path / "aggregator.log")
    procs.append(agg)
    fz = AggregatorFuzz(ctx, port, rng)
    wait_for(fz.health, timeout=15, what="the aggregator", interval=POLL_S, ignoring=NOT_YET)
    # A real agent reports first; it is stopped before the fuzzing so the counters see only
    # the fuzzer; its view must survive, and a new agent must get in afterwards.
    agent = Proc(["agent", "--aggregator", f"127.0.0.1:{port}", "--node", "real1", "--probe",
                  "sim:gpus=2,interval=200ms"], tmp_path / "agent-real1.log")
    procs.append(agent)

    def real_ps() -> set[int]:
        rows = fz.client.request("ps", {"node": "real1"})["items"]
        return {r["pid"] for r in rows if r["state"] == "running"}

    def two_running() -> set[int] | None:
        pids = real_ps()
        return pids if len(pids) >= 2 else None

    pids_before = wait_for(two_running, timeout=20, what="real1's processes", interval=POLL_S, ignoring=NOT_YET)
    why_before = fz.client.request("why", {"target": f"real1:{min(pids_before)}"})
    agent.stop()
    _settled(fz)  # the stopped agent's last messages taken in before the RSS baseline
    rss_before = rss_kib(agg.proc.pid)
    report: dict[str, Any] = {}

    # -------- events: PUB → SUB
    pub = fz.socket(zmq.PUB, SNDHWM=0)
    pub.connect(fz.eps.events)
    start = fz.health()

    def subscribed() -> bool:
        pub.send_multipart([b"ev", b"\xc1"])  # gets through once the subscription has arrived
        return bool(fz.health()["received"]["events"] != start["received"]["events"])

    wait_for(subscribed, timeout=30, what="the aggregator's subscription to reach the fuzzer", interval=0.05,
             ignoring=NOT_YET)
    before = _settled(fz)
    mut = Mutator(rng, _bases_events(), EVENTS_MAX)
    sent = expected_drops = filtered = 0
    kinds: Counter[str] = Counter()
    for _ in range(FRAMES):
        kind, payload = mut.payload()
        frames = _shape(rng, payload, lambda p: [b"ev", p], [
            lambda p: [p], lambda p: [b"ev", p, b"x"], lambda p: [b"ev"], lambda p: [b"evil", p],
            lambda p: [b"xx", p], lambda p: [p, b"ev"],
        ])
        kinds[kind] += 1
        pub.send_multipart(frames)
        if not frames[0].startswith(b"ev"):
            filtered += 1  # the subscription filter drops it in the publisher
            continue
        sent += 1
        expected_drops += _expect_event_drop(frames)
    after = wait_for(lambda: _caught_up(fz, before, "events", sent), timeout=120,
                     what="the aggregator to read every event frame", interval=POLL_S, ignoring=NOT_YET)
    got_drops = _drops(after, "events_") - _drops(before, "events_")
    got_batches = after["batches"] - before["batches"]
    assert got_drops == expected_drops, (got_drops, expected_drops, after["dropped"])
    assert got_batches == sent - expected_drops
    report["events"] = {"sent": sent, "filtered_by_subscription": filtered, "dropped": got_drops,
                        "accepted_batches": got_batches, "kinds": dict(kinds)}
    pub.close()

    # -------- control: DEALER → ROUTER
    dealer = fz.socket(zmq.DEALER, ROUTING_ID=f"{FUZZER}/1".encode(), RCVHWM=0)
    dealer.connect(fz.eps.control)
    before = _settled(fz)
    mut = Mutator(rng, _bases_control(FUZZER), CONTROL_MAX)
    sent = expected_drops = 0
    kinds = Counter()
    for i in range(FRAMES):
        kind, payload = mut.payload()
        frames = _shape(rng, payload, lambda p: [p], [lambda p: [p, b"x"], lambda p: [b"", p], lambda p: [p, p, p]])
        kinds[kind] += 1
        dealer.send_multipart(frames)
        sent += 1
        expected_drops += _expect_control_drop(frames)
        if i % 200 == 0:
            _discard(dealer)
    after = wait_for(lambda: _caught_up(fz, before, "control", sent, drain=dealer), timeout=120,
                     what="the aggregator to read every control frame", interval=POLL_S, ignoring=NOT_YET)
    send_side = ("control_send_again", "control_unroutable")
    got_drops = _drops(after, "control_", send_side) - _drops(before, "control_", send_side)
    assert got_drops == expected_drops, (got_drops, expected_drops, after["dropped"])
    report["control"] = {"sent": sent, "dropped": got_drops, "accepted": sent - got_drops, "kinds": dict(kinds)}
    dealer.close()

    # -------- queries: a DEALER speaking REQ's envelope (and not)
    query = fz.socket(zmq.DEALER, RCVHWM=0)
    query.connect(fz.eps.query)
    before = _settled(fz)
    mut = Mutator(rng, _bases_query(), QUERY_MAX)
    sent = expected_drops = replies = 0
    kinds = Counter()
    for i in range(FRAMES):
        kind, payload = mut.payload()
        frames = _shape(rng, payload, lambda p: [b"", p], [lambda p: [p], lambda p: [b"x", p], lambda p: [b"", b"", p]])
        kinds[kind] += 1
        query.send_multipart(frames)
        sent += 1
        expected_drops += _expect_query_drop(frames)
        if i % 100 == 0:
            replies += _discard(query)
    after = wait_for(lambda: _caught_up(fz, before, "query", sent), timeout=120,
                     what="the aggregator to read every query frame", interval=POLL_S, ignoring=NOT_YET)
    replies += _discard(query, wait_ms=500)
    send_side = ("query_reply_dropped",)
    got_drops = _drops(after, "query_", send_side) - _drops(before, "query_", send_side)
    assert got_drops == expected_drops, (got_drops, expected_drops, after["dropped"])
    report["query"] = {"sent": sent, "dropped": got_drops, "replies": replies, "kinds": dict(kinds)}
    query.close()

    # -------- frames above MAXMSGSIZE: libzmq disconnects the sender; xctl never sees them
    before = _settled(fz)
    oversized = 0
    for endpoint, kind, limit, shape in (
        (fz.eps.events, zmq.PUB, EVENTS_MAX, lambda p: [b"ev", p]),
        (fz.eps.control, zmq.DEALER, CONTROL_MAX, lambda p: [p]),
        (fz.eps.query, zmq.DEALER, QUERY_MAX, lambda p: [b"", p]),
    ):
        for _ in range(3):
            oversized += _send_until_dropped(fz, kind, endpoint, shape(b"\x92" + b"\xc0" * limit))
    # An observation window (what must NOT happen: xctl seeing any of them), then the counters
    # once they have stopped moving.
    time.sleep(OVERSIZED_WATCH_S)
    after = _settled(fz)
    polls = after["_polls"] - before["_polls"]
    seen = {k: after["received"][k] - before["received"][k] - (polls if k == "query" else 0) for k in after["received"]}
    assert seen == {"events": 0, "control": 0, "query": 0}, seen
    report["oversized"] = {"sent": oversized, "seen_by_xctl": 0, "dropped_by": "libzmq (MAXMSGSIZE: peer disconnected)"}

    # -------- afterwards: still correct, RSS bounded, no traceback
    assert set(real_ps()) == set(pids_before)
    why_after = fz.client.request("why", {"target": f"real1:{min(pids_before)}"})
    assert why_after["target"] == why_before["target"]
    agent2 = Proc(["agent", "--aggregator", f"127.0.0.1:{port}", "--node", "real2", "--probe",
                   "sim:gpus=1,interval=200ms"], tmp_path / "agent-real2.log")
    procs.append(agent2)

    def real2_alive() -> bool:
        nodes = fz.client.request("nodes", {})["items"]
        return any(n["node"] == "real2" and n["state"] == "alive" for n in nodes)

    wait_for(real2_alive, timeout=20, what="a new agent to get in after the fuzzing", interval=POLL_S,
             ignoring=NOT_YET)
    wait_for(lambda: fz.client.request("ps", {"node": "real2"})["items"], timeout=20, what="real2's processes in ps",
             interval=POLL_S, ignoring=NOT_YET)
    rss_after = rss_kib(agg.proc.pid)
    report["rss_mib"] = {"before": round(rss_before / 1024, 1), "after": round(rss_after / 1024, 1),
                         "bound": RSS_BOUND_MIB}
    report["dropped"] = after["dropped"]
    report["nodes_known"] = len(fz.client.request("nodes", {})["items"])  # names mutations invented
    print("fuzz aggregator:", report)
    assert (rss_after - rss_before) / 1024 < RSS_BOUND_MIB, report["rss_mib"]
    assert agg.proc.poll() is None
    assert "Traceback" not in agg.output()
    fz.client.close()


def _settled(fz: AggregatorFuzz) -> dict[str, Any]:
    """Counters once they stop moving (nothing left in flight): two readings SETTLE_S apart agree."""
    readings: list[dict[str, Any]] = []

    def still() -> dict[str, Any] | None:
        now = fz.health()
        last = readings[-1] if readings else None
        readings.append(now)
        same = last is not None and now["received"]["events"] == last["received"]["events"] and (
            now["received"]["control"] == last["received"]["control"]
        ) and now["dropped"] == last["dropped"]
        if not same:
            return None
        now["_polls"] = fz.polls
        return now

    return wait_for(still, timeout=120, what="the aggregator's counters to stop moving", interval=SETTLE_S)


def _send_until_dropped(fz: AggregatorFuzz, kind: int, endpoint: str, frames: list[bytes]) -> int:
    """Connect a fresh socket and send ``frames`` (an oversized message) until libzmq drops the
    connection over it: a PUB drops a message itself until the subscription has arrived. The
    number of sends."""
    sock = fz.socket(kind)
    monitor = sock.get_monitor_socket()
    seen: set[int] = set()
    sends = 0

    def had(event: int) -> bool:
        while monitor.poll(0):
            seen.add(recv_monitor_message(monitor)["event"])
        return event in seen

    def dropped() -> bool:
        nonlocal sends
        if had(zmq.EVENT_DISCONNECTED):
            return True
        sock.send_multipart(frames)
        sends += 1
        return False

    try:
        sock.connect(endpoint)
        wait_for(lambda: had(zmq.EVENT_HANDSHAKE_SUCCEEDED), timeout=10, what="the fuzzer's connection",
                 interval=0.01)
        wait_for(dropped, timeout=10, what="libzmq to disconnect the sender of an oversized frame")
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close()
    return sends


def _caught_up(fz: AggregatorFuzz, before: dict[str, Any], port: str, sent: int,
               drain: zmq.Socket[bytes] | None = None) -> dict[str, Any] | None:
    if drain is not None:
        _discard(drain)
    now = fz.health()
    got = now["received"][port] - before["received"][port]
    if port == "query":
        got -= fz.polls - before["_polls"]  # our own health queries
    assert got <= sent, (port, got, sent)
    return now if got == sent else None


def _discard(sock: zmq.Socket[bytes], wait_ms: int = 0) -> int:
    n = 0
    while sock.poll(wait_ms):
        sock.recv_multipart()
        n += 1
    return n


# ------------------------------------------------------------------------------ the agent


def _agent_metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("xctl_agent_dropped_total", "xctl_agent_control_received_total")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _agent_drops(metrics: dict[str, float]) -> int:
    reasons = ("bad_msgpack", "bad_schema", "too_large", "too_deep", "version", "bad_frame", "unencodable")
    return int(sum(v for k, v in metrics.items() if any(f'reason="{r}"' in k for r in reasons)))


def _agent_received(metrics: dict[str, float]) -> int:
    return int(sum(v for k, v in metrics.items() if k.startswith("xctl_agent_control_received_total")))


def test_the_agent_control_socket_survives_fuzzing(tmp_path: Path, ctx: zmq.Context[Any], procs: list[Proc]) -> None:
    rng = random.Random(SEED + 1)
    port = free_port_base()
    eps = endpoints("127.0.0.1", port)
    # A fake aggregator: the agent connects out to it.
    sub: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(eps.events)
    router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 0)
    router.setsockopt(zmq.SNDTIMEO, 10_000)
    router.bind(eps.control)
    mport = free_port_base()
    agent = Proc(["agent", "--aggregator", f"127.0.0.1:{port}", "--node", "fz", "--probe", "sim:gpus=1,interval=200ms",
                  "--metrics-port", str(mport), "--metrics-bind", "127.0.0.1"], tmp_path / "agent.log")
    procs.append(agent)

    def hello() -> bytes:
        """The routing id of the agent's latest hello (other control messages are read and skipped)."""
        while True:
            assert router.poll(20_000), "no hello from the agent"
            rid, payload = router.recv_multipart()
            if msgpack.unpackb(payload).get("t") == "hello":
                return rid

    rid = hello()
    metrics_before = wait_for(lambda: _agent_metrics(mport), timeout=15, what="the agent's /metrics", interval=POLL_S,
                              ignoring=NOT_YET)
    # Up and sampling (its first batch is here) before the RSS baseline.
    wait_for(lambda: sub.poll(0), timeout=15, what="the agent's first event batch")
    rss_before = rss_kib(agent.proc.pid)
    received_before = _agent_received(_agent_metrics(mport))
    mut = Mutator(rng, _bases_control("fz"), CONTROL_MAX)
    sent = expected_drops = 0
    kinds: Counter[str] = Counter()
    for i in range(FRAMES):
        kind, payload = mut.payload()
        frames = _shape(rng, payload, lambda p: [p], [lambda p: [b"x", p], lambda p: [p, b""]])
        kinds[kind] += 1
        router.send_multipart([rid, *frames])
        sent += 1
        try:
            read_control(frames[-1])
        except ProtocolError:
            expected_drops += 1
        if i % 200 == 0:
            while router.poll(0):
                router.recv_multipart()  # the agent's heartbeats, snapshots, results
            while sub.poll(0):
                sub.recv_multipart()

    def caught_up() -> dict[str, float] | None:
        while router.poll(0):
            router.recv_multipart()
        m = _agent_metrics(mport)
        return m if _agent_received(m) - received_before >= sent else None

    metrics_after = wait_for(caught_up, timeout=120, what="the agent to read every control frame", interval=POLL_S,
                             ignoring=NOT_YET)
    got_received = _agent_received(metrics_after) - received_before
    got_drops = _agent_drops(metrics_after) - _agent_drops(metrics_before)
    assert got_received == sent
    assert got_drops == expected_drops, (got_drops, expected_drops, metrics_after)

    # Still answering: a snapshot request gets the snapshot of node fz.
    router.send_multipart([rid, pack(SnapshotReq("fz", "after-fuzz").to_dict())])

    def snapshot() -> bool:
        while router.poll(200):
            _rid, payload = router.recv_multipart()
            msg = msgpack.unpackb(payload)
            if msg.get("t") == "snapshot" and msg.get("req_id") == "after-fuzz":
                return msg["node"] == "fz"
        return False

    wait_for(snapshot, timeout=10, what="a snapshot after the fuzzing", interval=POLL_S, ignoring=NOT_YET)

    # An oversized frame: libzmq drops the agent's connection; the agent replaces it after
    # its silence timeout (a new routing id) and says hello again.
    router.send_multipart([rid, b"\x92" + b"\xc0" * CONTROL_MAX])
    new_rid = hello()
    assert new_rid != rid
    rss_after = rss_kib(agent.proc.pid)
    report = {"sent": sent, "decode_drops": got_drops, "oversized": 1, "kinds": dict(kinds),
              "rss_mib": {"before": round(rss_before / 1024, 1), "after": round(rss_after / 1024, 1),
                          "bound": RSS_BOUND_MIB}}
    print("fuzz agent:", report)
    assert (rss_after - rss_before) / 1024 < RSS_BOUND_MIB
    assert agent.proc.poll() is None
    assert "Traceback" not in agent.output()
