"""The agent's own, optional Prometheus ``/metrics`` (``xctl agent --metrics-port 9446``).

The aggregator already exports every node's graph, liveness and probe states; this endpoint
adds what only the agent knows: its probes' restarts, crashes, hangs and rejected input,
its hand-over queue, and what it could not send. Like the aggregator's, the collector builds
fresh families on each scrape, in the HTTP server's thread, from counters that the agent
loop and the probe threads keep updating: it copies each dict before walking it and builds
the scrape once more if one changed under it (see xctl/aggregator/metrics.py).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from xctl import __version__
from xctl.metrics_http import MetricsServer, start_server

log = logging.getLogger(__name__)

#: The documented port for agents (off unless ``--metrics-port`` is given).
DEFAULT_AGENT_METRICS_PORT: Final = 9446
#: The node label, as in the aggregator's metrics (dcgm-exporter's name for it).
NODE: Final = "Hostname"


class AgentCollector(Collector):
    def __init__(self, agent: Any) -> None:
        self._agent = agent
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        with self._lock:
            try:
                return self._build()
            except RuntimeError as exc:
                if "during iteration" not in str(exc):
                    raise
                return self._build()

    def _build(self) -> list[Metric]:
        agent = self._agent
        node = agent.node
        sup = agent.supervisor
        info = GaugeMetricFamily(
            "xctl_agent_build_info", "Version and epoch of this agent (always 1).", labels=[NODE, "version", "epoch"]
        )
        info.add_metric([node, __version__, agent.epoch], 1)
        up = GaugeMetricFamily(
            "xctl_probe_up",
            "1 if the probe is running, else 0; state is running, restarting, hung, disabled or starting.",
            labels=[NODE, "probe", "state"],
        )
        restarts = CounterMetricFamily(
            "xctl_probe_restarts", "Probe restarts after a crash or hang.", labels=[NODE, "probe"]
        )
        crashes = CounterMetricFamily(
            "xctl_probe_crashes", "Probe crashes (raised, or ended on its own).", labels=[NODE, "probe"]
        )
        hangs = CounterMetricFamily(
            "xctl_probe_hangs", "Probes abandoned for silence beyond their heartbeat.", labels=[NODE, "probe"]
        )
        bad = CounterMetricFamily(
            "xctl_probe_bad_input",
            "Input lines or readings a probe rejected, by reason (bad_json, line_too_long, wrong_node, …).",
            labels=[NODE, "probe", "reason"],
        )
        cycles = CounterMetricFamily(
            "xctl_probe_cycles", "Sampling passes a probe completed (sampling probes only).", labels=[NODE, "probe"]
        )
        cycle_seconds = CounterMetricFamily(
            "xctl_probe_cycle_seconds",
            "Wall-clock seconds spent in sampling passes; rate(..._seconds) / rate(..._cycles) = one pass.",
            labels=[NODE, "probe"],
        )
        for slot in list(sup.slots):
            up.add_metric([node, slot.name, slot.state], 1 if slot.state == "running" else 0)
            if slot.cycles:
                cycles.add_metric([node, slot.name], slot.cycles)
                cycle_seconds.add_metric([node, slot.name], slot.cycle_s_total)
            restarts.add_metric([node, slot.name], slot.restarts)
            crashes.add_metric([node, slot.name], slot.crashes)
            hangs.add_metric([node, slot.name], slot.hangs)
            for reason, n in sorted(dict(slot.bad).items()):
                bad.add_metric([node, slot.name, reason], n)
        queue_dropped = CounterMetricFamily(
            "xctl_agent_queue_dropped",
            "Events dropped (oldest first) because the probe → agent queue was full.",
            labels=[NODE],
        )
        queue_dropped.add_metric([node], sup.dropped)
        queue_len = GaugeMetricFamily(
            "xctl_agent_queue_length", "Events waiting in the probe → agent queue.", labels=[NODE]
        )
        queue_len.add_metric([node], sup.pending())
        sent = CounterMetricFamily("xctl_agent_events_sent", "Events published to the aggregator.", labels=[NODE])
        sent.add_metric([node], agent.sent_events)
        control = CounterMetricFamily(
            "xctl_agent_control_received", "Control messages received from the aggregator (before any check).",
            labels=[NODE],
        )
        control.add_metric([node], getattr(agent, "control_received", 0))
        dropped = CounterMetricFamily(
            "xctl_agent_dropped",
            "Messages the agent dropped, by reason (pub_hwm: aggregator slow or away; event_too_large; "
            "control_hwm; bad control messages; handshake_refused: the aggregator refused our key).",
            labels=[NODE, "reason"],
        )
        for reason, n in sorted(agent.drops.as_dict().items()):
            dropped.add_metric([node, reason], n)
        return [
            info, up, restarts, crashes, hangs, bad, cycles, cycle_seconds, queue_dropped, queue_len, sent, control,
            dropped,
        ]


def make_registry(agent: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry


def serve_agent_metrics(agent: Any, bind: str, port: int) -> MetricsServer:
    """Serve the agent's /metrics in a daemon thread; ``.shutdown()`` stops it."""
    return start_server(make_registry(agent), bind, port, what="agent")
