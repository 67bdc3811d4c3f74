"""End-to-end latency (issue 3): a probe prints a line → the event is answerable by `why`.

A real aggregator and a real agent (subprocesses); the agent runs an `exec:` probe that
prints one event every 10 ms with its own wall-clock timestamp. The benchmark polls the
aggregator's `events` op (filled in the same loop step that applies the batch to the graph
`why` reads) and records now - ts for each event. Also reports both daemons' RSS at idle.

    .venv/bin/python bench/e2e_latency.py [--events 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xctl.cli.daemons import free_port_base
from xctl.wire.client import QueryClient
from xctl.wire.sockets import endpoints

PROBE = r"""
import json, sys, time
n = int(sys.argv[1])
time.sleep(1.0)
for i in range(n):
    ts = int(time.time() * 1000)
    sys.stdout.write(json.dumps({"ts": ts, "type": "error.hw", "entity": "gpu-%d" % (i % 8),
                                 "value": "XID_%d" % (1000 + i)}) + "\n")
    sys.stdout.flush()
    time.sleep(0.01)
while True:
    time.sleep(1)
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="xctl-e2e-"))
    script = tmp / "probe.py"
    script.write_text(PROBE)
    port = free_port_base()
    xctl = [sys.executable, "-m", "xctl.cli.main"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    agg = subprocess.Popen([*xctl, "aggregator", "--port", str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = QueryClient(endpoints("127.0.0.1", port).query, timeout_s=2)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.request("health")
            break
        except Exception:  # not up yet
            if time.monotonic() > deadline:
                raise
    agent = subprocess.Popen([*xctl, "agent", "--aggregator", f"127.0.0.1:{port}", "--node", "bench",
                              "--probe", f"exec:{sys.executable} {script} {args.events}"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latencies: list[float] = []
    cursor = 0
    seen: set[str] = set()
    deadline = time.monotonic() + 60 + args.events * 0.02
    try:
        while len(seen) < args.events and time.monotonic() < deadline:
            data = client.request("events", {"after": cursor, "type": "error.hw", "limit": 2000})
            now = time.time() * 1000
            cursor = data["cursor"]
            for item in data["items"]:
                if item["value"].startswith("XID_1") and item["value"] not in seen:
                    seen.add(item["value"])
                    latencies.append(now - item["ts"])
            time.sleep(0.001)  # polling cadence; adds at most ~1 ms to each figure
        time.sleep(3)  # let both daemons settle before reading idle RSS
        result = {
            "benchmark": "e2e_latency",
            "events": len(latencies),
            "method": "exec probe line (its own ts) -> aggregator events op, polled every ~1 ms",
            "p50_ms": round(percentile(latencies, 0.5), 1) if latencies else None,
            "p99_ms": round(percentile(latencies, 0.99), 1) if latencies else None,
            "max_ms": round(max(latencies), 1) if latencies else None,
            "aggregator_rss_mib": rss_mib(agg.pid),
            "agent_rss_mib": rss_mib(agent.pid),
        }
    finally:
        client.close()
        for proc in (agent, agg):
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    idle = subprocess.Popen([*xctl, "agent", "--aggregator", f"127.0.0.1:{port}", "--node", "idle"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(5)  # the default probes' first samples, then idle
    result["agent_default_probes_idle_rss_mib"] = rss_mib(idle.pid)
    idle.send_signal(signal.SIGTERM)
    idle.wait(10)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
