"""The network probe: NIC bandwidth and drops, link state, InfiniBand port counters, TCP retransmits.

Sources (all optional; a missing file is normal, e.g. no InfiniBand):

- ``<proc>/net/dev`` deltas → ``transport.bw`` per interface (value = rx+tx Gbit/s, 3 decimals;
  attrs rx_gbps, tx_gbps, interval_s) and ``transport.drop`` when drops+errors grew (value = the
  delta; attrs counter="drops+errors", rx_drop, rx_errs, tx_drop, tx_errs, interval_s).
- ``<sys>/class/net/*/{operstate,carrier,carrier_changes,flags}`` → ``error.net`` ``LINK_DOWN``
  when a link goes down, ``OK`` when it comes back (plus ``LINK_FLAP`` if it was down less than
  :data:`~xctl.probes.kmsg_parse.FLAP_WINDOW_S`), ``LINK_FLAP`` when carrier_changes moved by
  ≥ 2 between two samples that both saw it up. Administratively-down interfaces are ignored.
- ``<sys>/class/infiniband/DEV/ports/P/``: ``state`` (LINK_DOWN / OK as above), counters
  ``symbol_error``, ``link_downed``, ``port_rcv_errors`` and hw_counters ``rnr_nak_retry_err``,
  ``out_of_sequence``, ``np_cnp_sent`` → ``transport.drop`` on ``DEV`` (attrs counter, port,
  interval_s) when they grew; ``link_downed`` growing → ``LINK_FLAP``; ``np_cnp_sent`` faster than
  :data:`CNP_STORM_PER_S` → ``PFC_STORM`` (a proxy: see the constant); ``port_xmit_data`` /
  ``port_rcv_data`` → ``transport.bw`` on ``DEV``.
- ``<proc>/net/snmp`` Tcp RetransSegs/OutSegs > :data:`TCP_RETRANS_RATIO` over an interval with
  at least :data:`TCP_MIN_OUT_SEGS` segments sent → ``error.net`` ``TCP_RETRANS_HIGH`` on ``tcp``.

Interfaces matching :data:`DEFAULT_IGNORE` (loopback and container/VM plumbing) are skipped.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from xctl.core.errors import ProbeError
from xctl.core.events import AttrValue, Event, EventType
from xctl.probes.base import ProbeContext, run_every
from xctl.probes.kmsg_parse import FLAP_WINDOW_S
from xctl.probes.procfs import spec_args, spec_interval

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S: Final = 5.0
#: Loopback and virtual plumbing whose traffic is not the job's fabric.
DEFAULT_IGNORE: Final = (
    r"lo|veth.*|docker\d+|br-[0-9a-f]+|virbr\d+.*|cali.*|flannel.*|cni\d+|tunl\d+|ifb\d+|kube-.*|dummy\d+"
)
#: TCP retransmitted/sent segment ratio above which TCP_RETRANS_HIGH is reported.
TCP_RETRANS_RATIO: Final = 0.01
#: ... but only over an interval that sent at least this many segments (no alarms on idle hosts).
TCP_MIN_OUT_SEGS: Final = 1000
#: np_cnp_sent per second above which PFC_STORM is reported. CNPs are ECN congestion
#: notifications, not PFC pause frames (those are only in ``ethtool -S``); a sustained CNP
#: flood is the closest congestion-storm signal sysfs offers. Debatable; tune per fabric.
CNP_STORM_PER_S: Final = 100_000.0
IB_COUNTERS: Final = ("symbol_error", "link_downed", "port_rcv_errors")
IB_HW_COUNTERS: Final = ("rnr_nak_retry_err", "out_of_sequence", "np_cnp_sent")
NET_DEV_FIELDS: Final = (
    "rx_bytes", "rx_packets", "rx_errs", "rx_drop", "rx_fifo", "rx_frame", "rx_compressed", "rx_multicast",
    "tx_bytes", "tx_packets", "tx_errs", "tx_drop", "tx_fifo", "tx_colls", "tx_carrier", "tx_compressed",
)  # fmt: skip
_DROP_FIELDS: Final = ("rx_drop", "rx_errs", "tx_drop", "tx_errs")
_IFF_UP: Final = 0x1


def _noop_bad(reason: str) -> None:
    del reason


# --- pure parsers ------------------------------------------------------------------------------


def parse_net_dev(text: str, bad: Callable[[str], None] = _noop_bad) -> dict[str, dict[str, int]]:
    """``/proc/net/dev`` → {iface: {field: value}}. Malformed lines are skipped and counted."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep or "|" in line:
            continue  # the two header lines
        values = rest.split()
        name = name.strip()
        if not name or len(values) < len(NET_DEV_FIELDS) or not all(v.isdigit() for v in values[:16]):
            bad("net_dev_malformed")
            continue
        out[name] = {f: int(v) for f, v in zip(NET_DEV_FIELDS, values[:16], strict=True)}
    return out


def parse_snmp(text: str, section: str = "Tcp") -> dict[str, int]:
    """``/proc/net/snmp`` → the named section as {field: value} (header line + value line)."""
    header: list[str] | None = None
    prefix = section + ":"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        parts = line[len(prefix) :].split()
        if header is None:
            header = parts
            continue
        out: dict[str, int] = {}
        for key, value in zip(header, parts, strict=False):
            try:
                out[key] = int(value)
            except ValueError:
                continue
        return out
    return {}


def parse_operstate(operstate: str | None, carrier: str | None) -> bool | None:
    """True = up, False = down, None = unknown/not applicable."""
    state = (operstate or "").strip().lower()
    if state == "up":
        return True
    if state in ("down", "lowerlayerdown", "notpresent", "dormant"):
        return False
    if state == "unknown":  # many virtual and some physical drivers: look at carrier instead
        c = (carrier or "").strip()
        return True if c == "1" else (False if c == "0" else None)
    return None


def parse_ib_state(text: str | None) -> bool | None:
    """``4: ACTIVE`` → True, ``1: DOWN`` → False, INIT/ARMED/unknown → None."""
    if not text:
        return None
    code = text.strip().split(":", 1)[0].strip()
    if code == "4":
        return True
    if code == "1":
        return False
    return None


def _gbps(delta_bytes: int, dt_s: float) -> float:
    return delta_bytes * 8 / dt_s / 1e9


def net_dev_events(
    prev: Mapping[str, Mapping[str, int]],
    cur: Mapping[str, Mapping[str, int]],
    dt_s: float,
    now_ms: int,
    ignore: re.Pattern[str] | None = None,
) -> list[Event]:
    """transport.bw (every interface) and transport.drop (only when nonzero) from two samples."""
    events: list[Event] = []
    if dt_s <= 0:
        return events
    for name in sorted(cur):
        if ignore is not None and ignore.fullmatch(name):
            continue
        before, after = prev.get(name), cur[name]
        if before is None:
            continue
        delta = {k: after[k] - before[k] for k in NET_DEV_FIELDS}
        if any(v < 0 for v in delta.values()):
            continue  # counter reset (driver reload) or 32-bit wrap: re-base, say nothing
        rx, tx = _gbps(delta["rx_bytes"], dt_s), _gbps(delta["tx_bytes"], dt_s)
        interval = round(dt_s, 3)
        bw_attrs: dict[str, AttrValue] = {"rx_gbps": round(rx, 3), "tx_gbps": round(tx, 3), "interval_s": interval}
        events.append(Event(now_ms, EventType.TRANSPORT_BW, name, f"{rx + tx:.3f}", attrs=MappingProxyType(bw_attrs)))
        drops = sum(delta[k] for k in _DROP_FIELDS)
        if drops > 0:
            drop_attrs: dict[str, AttrValue] = {"counter": "drops+errors", "interval_s": interval}
            drop_attrs.update({k: delta[k] for k in _DROP_FIELDS})
            events.append(Event(now_ms, EventType.TRANSPORT_DROP, name, str(drops), attrs=MappingProxyType(drop_attrs)))
    return events


def tcp_retrans_event(prev: Mapping[str, int], cur: Mapping[str, int], dt_s: float, now_ms: int) -> Event | None:
    """TCP_RETRANS_HIGH on ``tcp`` when retransmits exceed :data:`TCP_RETRANS_RATIO` of segments sent."""
    try:
        retrans = cur["RetransSegs"] - prev["RetransSegs"]
        out = cur["OutSegs"] - prev["OutSegs"]
    except KeyError:
        return None
    if out < TCP_MIN_OUT_SEGS or retrans < 0:
        return None
    ratio = retrans / out
    if ratio <= TCP_RETRANS_RATIO:
        return None
    attrs: dict[str, AttrValue] = {
        "retrans_segs": retrans,
        "out_segs": out,
        "ratio_pct": round(ratio * 100, 2),
        "interval_s": round(dt_s, 3),
    }
    return Event(now_ms, EventType.ERROR_NET, "tcp", "TCP_RETRANS_HIGH", attrs=MappingProxyType(attrs))


@dataclass
class _Link:
    up: bool
    changes: int | None
    down_since: float | None


class LinkTracker:
    """Link up/down observations → LINK_DOWN / OK / LINK_FLAP events (pure; time passed in)."""

    def __init__(self, flap_window_s: float = FLAP_WINDOW_S) -> None:
        self.flap_window_s = flap_window_s
        self._links: dict[str, _Link] = {}

    def forget(self, key: str) -> None:
        self._links.pop(key, None)

    def update(
        self,
        key: str,
        entity: str,
        up: bool,
        now_ms: int,
        t_s: float,
        *,
        changes: int | None = None,
        attrs: Mapping[str, AttrValue] | None = None,
    ) -> list[Event]:
        base: dict[str, AttrValue] = dict(attrs or {})
        prev = self._links.get(key)
        events: list[Event] = []

        def emit(value: str, **extra: AttrValue) -> None:
            events.append(Event(now_ms, EventType.ERROR_NET, entity, value, attrs=MappingProxyType({**base, **extra})))

        if prev is None:
            self._links[key] = _Link(up, changes, None if up else t_s)
            if not up:
                emit("LINK_DOWN")
            return events
        if prev.up and not up:
            prev.down_since = t_s
            emit("LINK_DOWN")
        elif not prev.up and up:
            emit("OK", code="LINK_DOWN")  # clears only the down condition
            if prev.down_since is not None and t_s - prev.down_since <= self.flap_window_s:
                emit("LINK_FLAP", down_s=round(t_s - prev.down_since, 3))
            prev.down_since = None
        elif prev.up and up and changes is not None and prev.changes is not None and changes - prev.changes >= 2:
            emit("LINK_FLAP", carrier_changes=changes - prev.changes)
        prev.up = up
        if changes is not None:
            prev.changes = changes
        return events


# --- the reader ----------------------------------------------------------------------------------


class NetworkProbe:
    """Samples NIC, InfiniBand and TCP counters every ``interval_s``; see the module doc."""

    name = "network"

    def __init__(
        self,
        proc_root: str = "/proc",
        sys_root: str = "/sys",
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        ignore: str = DEFAULT_IGNORE,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc_root = proc_root
        self.sys_root = sys_root
        self.interval_s = interval_s
        self.heartbeat_s: float | None = 3 * interval_s + 5.0
        try:
            self.ignore = re.compile(ignore)
        except re.error as exc:
            raise ProbeError(f"network: ignore pattern {ignore!r} is not a regular expression: {exc}") from exc
        self.monotonic = monotonic
        self.links = LinkTracker()
        self._prev_dev: dict[str, dict[str, int]] = {}
        self._prev_tcp: dict[str, int] = {}
        self._prev_ib: dict[tuple[str, str, str], int] = {}
        self._prev_t: float | None = None
        self._seen: str = "nothing read yet"

    @classmethod
    def from_spec(cls, arg: str | None) -> NetworkProbe:
        args = spec_args(arg, ("interval", "root", "sys", "ignore"), "network")
        return cls(
            args.get("root", "/proc"),
            args.get("sys", "/sys"),
            spec_interval(args, DEFAULT_INTERVAL_S, "network"),
            ignore=args.get("ignore", DEFAULT_IGNORE),
        )

    def describe(self) -> str:
        return f"network: every {self.interval_s:g}s; {self._seen}"

    def run(self, ctx: ProbeContext) -> None:
        run_every(ctx, self.interval_s, self.sample)

    def _read(self, *parts: str) -> str | None:
        try:
            with open(os.path.join(*parts), encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return None

    def _listdir(self, *parts: str) -> list[str]:
        try:
            return sorted(os.listdir(os.path.join(*parts)))
        except OSError:
            return []

    def sample(self, now_ms: int, bad: Callable[[str], None] = _noop_bad) -> list[Event]:
        t = self.monotonic()
        dt = t - self._prev_t if self._prev_t is not None else 0.0
        self._prev_t = t
        events: list[Event] = []
        seen: list[str] = []

        text = self._read(self.proc_root, "net", "dev")
        if text is not None:
            cur = parse_net_dev(text, bad)
            events.extend(net_dev_events(self._prev_dev, cur, dt, now_ms, self.ignore))
            self._prev_dev = cur
            seen.append(f"{sum(1 for n in cur if not self.ignore.fullmatch(n))} interfaces")

        events.extend(self._sys_links(now_ms, t))
        ib_events, ib_ports = self._infiniband(now_ms, t, dt)
        events.extend(ib_events)
        if ib_ports:
            seen.append(f"{ib_ports} InfiniBand ports")

        snmp = self._read(self.proc_root, "net", "snmp")
        if snmp is not None:
            tcp = parse_snmp(snmp, "Tcp")
            if not tcp:
                bad("snmp_malformed")
            elif self._prev_tcp and dt > 0:
                event = tcp_retrans_event(self._prev_tcp, tcp, dt, now_ms)
                if event is not None:
                    events.append(event)
            self._prev_tcp = tcp
            seen.append("TCP retransmits")
        self._seen = ", ".join(seen) if seen else f"nothing readable under {self.proc_root} and {self.sys_root}"
        return events

    def _sys_links(self, now_ms: int, t: float) -> list[Event]:
        events: list[Event] = []
        base = os.path.join(self.sys_root, "class", "net")
        for name in self._listdir(base):
            if self.ignore.fullmatch(name):
                continue
            flags_text = (self._read(base, name, "flags") or "").strip()
            try:
                flags = int(flags_text, 16) if flags_text else None
            except ValueError:
                flags = None
            if flags is not None and not flags & _IFF_UP:
                self.links.forget(name)  # administratively down: an operator's choice, not a fault
                continue
            up = parse_operstate(self._read(base, name, "operstate"), self._read(base, name, "carrier"))
            if up is None:
                continue
            changes_text = (self._read(base, name, "carrier_changes") or "").strip()
            changes = int(changes_text) if changes_text.isdigit() else None
            events.extend(self.links.update(name, name, up, now_ms, t, changes=changes))
        return events

    def _infiniband(self, now_ms: int, t: float, dt: float) -> tuple[list[Event], int]:
        events: list[Event] = []
        base = os.path.join(self.sys_root, "class", "infiniband")
        ports_seen = 0
        for dev in self._listdir(base):
            for port in self._listdir(base, dev, "ports"):
                pdir = os.path.join(base, dev, "ports", port)
                ports_seen += 1
                up = parse_ib_state(self._read(pdir, "state"))
                port_attrs: dict[str, AttrValue] = {"port": int(port) if port.isdigit() else port}
                if up is not None:
                    events.extend(self.links.update(f"ib:{dev}/{port}", dev, up, now_ms, t, attrs=port_attrs))
                events.extend(self._ib_counters(dev, port, pdir, port_attrs, now_ms, dt))
        return events, ports_seen

    def _ib_counters(
        self, dev: str, port: str, pdir: str, port_attrs: Mapping[str, AttrValue], now_ms: int, dt: float
    ) -> list[Event]:
        events: list[Event] = []
        deltas: dict[str, int] = {}
        names = [("counters", n) for n in (*IB_COUNTERS, "port_xmit_data", "port_rcv_data")]
        names += [("hw_counters", n) for n in IB_HW_COUNTERS]
        for sub, counter in names:
            text = self._read(pdir, sub, counter)
            if text is None or not text.strip().isdigit():
                continue
            value = int(text.strip())
            key = (dev, port, counter)
            before = self._prev_ib.get(key)
            self._prev_ib[key] = value
            if before is None or dt <= 0 or value < before:
                continue
            deltas[counter] = value - before
        interval = round(dt, 3)
        for counter in (*IB_COUNTERS, *IB_HW_COUNTERS):
            delta = deltas.get(counter, 0)
            if delta <= 0:
                continue
            attrs: dict[str, AttrValue] = {**port_attrs, "counter": counter, "interval_s": interval}
            events.append(Event(now_ms, EventType.TRANSPORT_DROP, dev, str(delta), attrs=MappingProxyType(attrs)))
            if counter == "link_downed":
                flap: dict[str, AttrValue] = {**port_attrs, "counter": counter, "delta": delta}
                events.append(Event(now_ms, EventType.ERROR_NET, dev, "LINK_FLAP", attrs=MappingProxyType(flap)))
            elif counter == "np_cnp_sent" and dt > 0 and delta / dt > CNP_STORM_PER_S:
                storm: dict[str, AttrValue] = {
                    **port_attrs,
                    "counter": counter,
                    "rate_per_s": round(delta / dt, 1),
                    "threshold_per_s": CNP_STORM_PER_S,
                }
                events.append(Event(now_ms, EventType.ERROR_NET, dev, "PFC_STORM", attrs=MappingProxyType(storm)))
        if "port_xmit_data" in deltas and "port_rcv_data" in deltas and dt > 0:
            # IB data counters count 4-octet words.
            tx, rx = _gbps(deltas["port_xmit_data"] * 4, dt), _gbps(deltas["port_rcv_data"] * 4, dt)
            bw: dict[str, AttrValue] = {**port_attrs, "rx_gbps": round(rx, 3), "tx_gbps": round(tx, 3)}
            bw["interval_s"] = interval
            events.append(Event(now_ms, EventType.TRANSPORT_BW, dev, f"{rx + tx:.3f}", attrs=MappingProxyType(bw)))
        return events
