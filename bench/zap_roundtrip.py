"""Zap round trip (issue 7): `xctl zap NODE:PID --yes` on a real tree of N processes.

Starts a real aggregator and agent (procfs probe watching the tree), then, per round, a fresh
tree (tests/fixtures/zaptree.py: a root and N-1 sleeping children under a reaping launcher)
and times `xctl zap` as a subprocess. Reported per tree size (medians over the rounds):

- ``cli_s``: the whole CLI invocation (Python start-up, the preview query, the zap, the reply);
- ``aggregator_ms``: aggregator send → agent result (``elapsed_ms`` of the ZapResult);
- ``agent_ms``: the agent's execution (resolve, freeze, signal, wait, verify);
- ``signal_at_ms``: when the first signal went out (resolve + freeze of the tree).

    .venv/bin/python bench/zap_roundtrip.py [--sizes 4,50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from xctl.cli.daemons import free_port_base
from xctl.wire.client import QueryClient
from xctl.wire.sockets import endpoints

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("zaptree", ROOT / "tests" / "fixtures" / "zaptree.py")
assert _spec is not None
assert _spec.loader is not None
zaptree = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zaptree)
XCTL = [sys.executable, "-m", "xctl.cli.main"]


def wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")  # see the daemons' log in the temp directory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="4,50")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    port = free_port_base()
    tmp = Path(tempfile.mkdtemp(prefix="zap-bench-"))
    log = (tmp / "daemons.log").open("ab")
    agg = subprocess.Popen([*XCTL, "aggregator", "--port", str(port), "--metrics-port", "0"], stdout=log, stderr=log)
    agent = subprocess.Popen(
        [*XCTL, "agent", "--aggregator", f"127.0.0.1:{port}", "--node", "n1",
         "--probe", "procfs:interval=200ms,watch=zaptree-.*"],
        stdout=log,
        stderr=log,
    )
    client = QueryClient(endpoints("127.0.0.1", port).query, timeout_s=3.0)
    env = {**os.environ, "XCTL_AGGREGATOR": f"127.0.0.1:{port}", "NO_COLOR": "1"}
    figures: dict[str, Any] = {"rounds": args.rounds, "sizes": {}}
    try:
        wait(lambda: any(n["node"] == "n1" for n in client.request("nodes", {})["items"]), 20, "the agent")
        for size in (int(s) for s in args.sizes.split(",")):
            runs: list[dict[str, float]] = []
            for r in range(args.rounds):
                tree = zaptree.Tree(tmp / f"tree-{size}-{r}.pids", ",".join(["sleeper"] * (size - 1)), timeout=60)
                try:
                    members = set(tree.members)

                    def missing(members: set[int] = members) -> set[int]:
                        rows = client.request("ps", {"node": "n1"})["items"]
                        return members - {row["pid"] for row in rows if row["state"] == "running"}

                    wait(lambda: not missing(), 30, f"the tree in ps (size {size}; missing {missing()})")
                    started = time.perf_counter()
                    out = subprocess.run(
                        [*XCTL, "zap", f"n1:{tree.pid('root')}", "--yes", "--grace", "10", "-o", "json"],
                        capture_output=True, text=True, env=env, timeout=60, check=False,
                    )
                    cli_s = time.perf_counter() - started
                    data = json.loads(out.stdout)
                    assert out.returncode == 0, out.stdout + out.stderr
                    assert data["ok"], out.stdout
                    assert len(data["tree"]) == size, len(data["tree"])
                    gone = not any(Path(f"/proc/{p}").exists() and zaptree.starttime(p) == tree.started[p]
                                   for p in members)
                    assert gone
                    runs.append({
                        "cli_s": cli_s,
                        "aggregator_ms": data["elapsed_ms"],
                        "agent_ms": data["duration_ms"],
                        "signal_at_ms": data["signals"][0]["at_ms"],
                    })
                finally:
                    tree.close()
            figures["sizes"][str(size)] = {
                key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]
            } | {"cli_s_max": round(max(run["cli_s"] for run in runs), 3)}
    finally:
        client.close()
        for proc in (agent, agg):
            proc.terminate()
            proc.wait(10)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
