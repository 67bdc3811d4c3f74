"""Agent footprint (issue 5): CPU per probe cycle and agent RSS with 500 extra processes.

Spawns 500 extra processes (450 plain `sleep`, 50 named python3 so the procfs probe watches
them), then:
1. times each node probe's sample() in this process (CPU seconds per cycle, mean over N);
2. runs a real `xctl agent` with procfs, kmsg, network and storage at 1 s sampling against a
   real aggregator for a window, and reads its RSS and CPU% from /proc.

    .venv/bin/python bench/agent_footprint.py [--extra 500] [--window 20] [--threaded 8 --threads 64]

``--threaded K`` adds K python processes with ``--threads`` sleeping threads each (a training
process has dozens: the procfs probe reads their /proc/PID/task/TID/stat to find a worker
thread in D).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xctl.cli.daemons import free_port_base
from xctl.probes.kmsg import KmsgProbe
from xctl.probes.network import NetworkProbe
from xctl.probes.procfs import ProcfsProbe
from xctl.probes.storage import StorageProbe

CLK_TCK = os.sysconf("SC_CLK_TCK")


def spawn_extra(n: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        argv = ["bash", "-c", "exec -a python3 sleep 600"] if i % 10 == 0 else ["sleep", "600"]
        procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
    return procs


THREADED = (
    "import threading, time\n"
    "for _ in range({n}):\n"
    "    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
    "time.sleep(600)\n"
)


def spawn_threaded(n: int, threads: int) -> list[subprocess.Popen[bytes]]:
    code = THREADED.format(n=threads)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL) for _ in range(n)]
    deadline = time.monotonic() + 30
    for proc in procs:  # every thread started before the first sample
        while len(os.listdir(f"/proc/{proc.pid}/task")) <= threads and time.monotonic() < deadline:
            time.sleep(0.05)
    return procs


def cpu_per_cycle(probe: Any, cycles: int) -> dict[str, float]:
    now = int(time.time() * 1000)
    probe.sample(now)  # first cycle reads everything once
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    events = 0
    for i in range(cycles):
        out = probe.sample(now + (i + 1) * 1000)
        events += len(out[0] if isinstance(out, tuple) else out)
    cpu = (time.process_time() - start_cpu) / cycles
    wall = (time.perf_counter() - start_wall) / cycles
    return {"cpu_ms_per_cycle": round(cpu * 1000, 3), "wall_ms_per_cycle": round(wall * 1000, 3),
            "events_per_cycle": round(events / cycles, 1)}


def proc_stat(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return cpu, rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--extra", type=int, default=500)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--threaded", type=int, default=0)
    parser.add_argument("--threads", type=int, default=64)
    args = parser.parse_args()
    extra = spawn_extra(args.extra) + spawn_threaded(args.threaded, args.threads)
    result: dict[str, Any] = {"benchmark": "agent_footprint", "extra_processes": args.extra,
                              "threaded_processes": args.threaded, "threads_each": args.threads,
                              "host_processes": len([p for p in os.listdir("/proc") if p.isdigit()])}
    try:
        probes = {
            "procfs": ProcfsProbe("/proc", 1.0),
            "network": NetworkProbe("/proc", "/sys", 1.0),
            "storage": StorageProbe("/proc", "/sys", 1.0),
        }
        result["per_probe"] = {name: cpu_per_cycle(p, args.cycles) for name, p in probes.items()}
        kmsg = KmsgProbe("/dev/kmsg")
        try:
            kmsg.open()
            result["per_probe"]["kmsg"] = cpu_per_cycle(kmsg, args.cycles)
            kmsg.close()
        except Exception as exc:  # noqa: BLE001 - /dev/kmsg may be unreadable here
            result["per_probe"]["kmsg"] = {"unavailable": str(exc)}

        port = free_port_base()
        xctl = [sys.executable, "-m", "xctl.cli.main"]
        agg = subprocess.Popen([*xctl, "aggregator", "--port", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        agent = subprocess.Popen(
            [*xctl, "agent", "--aggregator", f"127.0.0.1:{port}", "--node", "footprint",
             "--probe", "procfs:interval=1s", "--probe", "kmsg", "--probe", "network:interval=1s",
             "--probe", "storage:interval=1s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(5)  # start-up and first samples are not the steady state
        cpu0, _ = proc_stat(agent.pid)
        t0 = time.monotonic()
        peak = 0.0
        while time.monotonic() - t0 < args.window:
            time.sleep(1)
            peak = max(peak, proc_stat(agent.pid)[1])
        cpu1, rss = proc_stat(agent.pid)
        result["agent"] = {
            "sampling_interval_s": 1.0,
            "window_s": args.window,
            "cpu_percent_of_one_core": round(100 * (cpu1 - cpu0) / (time.monotonic() - t0), 2),
            "rss_mib": round(rss, 1),
            "peak_rss_mib_in_window": round(peak, 1),
        }
        for proc in (agent, agg):
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    finally:
        for p in extra:
            p.kill()
        for p in extra:
            p.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
