"""Daemon commands: `xctl run`, `xctl agent`, `xctl aggregator`, `xctl demo`."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any, Final

import click
from click.core import ParameterSource

from xctl.agent.actuator import Actuator, NvmlGpuPids
from xctl.agent.daemon import Agent, AgentConfig
from xctl.aggregator.metrics import DEFAULT_METRICS_PORT
from xctl.aggregator.queries import Enricher
from xctl.aggregator.server import DEFAULT_MAX_NODES, Aggregator, AggregatorConfig, check_plaintext_bind
from xctl.cli import config, render
from xctl.cli.common import guarded
from xctl.core.cluster import LivenessConfig
from xctl.core.errors import ProbeError, UsageError, XctlError
from xctl.probes.registry import make_probe
from xctl.rules import Engine, load_rules
from xctl.wire.client import QueryClient
from xctl.wire.sockets import DEFAULT_PORT, endpoints, parse_address

log = logging.getLogger(__name__)

#: What `xctl run` and `xctl agent` watch when no --probe is given (issue 5).
DEFAULT_PROBES: Final = ("procfs", "kmsg", "network", "storage", "nvml")
STOP_GRACE_S: Final = 2.0


def default_node_name() -> str:
    return str(config.resolve("node", None, socket.gethostname().split(".")[0] or "localhost"))


def usable_probes(specs: Iterable[str], *, explicit: bool) -> tuple[list[str], dict[str, str]]:
    """Probes that can run here, and the defaults that cannot (name → reason).

    Each probe is built and, where it has one, opened once (NVML initialised, /dev/kmsg
    opened), so a GPU-less or unprivileged machine says so up front instead of crash-looping.
    An explicit --probe that cannot run is a usage error; a default one is reported as
    disabled (``xctl nodes`` shows the reason).
    """
    usable: list[str] = []
    disabled: dict[str, str] = {}
    for spec in specs:
        try:
            _preflight(spec)
        except ProbeError as exc:
            if explicit:
                raise UsageError(f"--probe {spec}: {exc}") from exc
            log.info("default probe %s not used here: %s", spec, exc)
            disabled[spec.partition(":")[0]] = str(exc)
            continue
        usable.append(spec)
    return usable, disabled


def _say_disabled(con: Any, disabled: dict[str, str]) -> None:
    for name, reason in disabled.items():
        con.print(f"  {name}: off here ({reason})", markup=False, style="dim")


def _preflight(spec: str) -> None:
    probe: Any = make_probe(spec)
    opener = getattr(probe, "open", None)
    if opener is None:
        return
    try:
        if opener() is False:
            raise ProbeError(probe.describe())
    finally:
        probe.close()


def _serve(
    workers: list[tuple[str, Callable[[], None], Callable[[], None]]], *, reload: Callable[[], None] | None = None
) -> None:
    """Run each (name, run, stop) in a thread until SIGTERM/SIGINT; stop within the grace time.
    SIGHUP calls ``reload`` (the aggregator re-reads its key allow-lists)."""
    done = threading.Event()
    failures: list[BaseException] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        done.set()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        log.info("SIGHUP: reloading")
        if reload is not None:
            reload()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    threads = []
    for name, run, _stop in workers:

        def target(run: Callable[[], None] = run, name: str = name) -> None:
            try:
                run()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread, which sets the exit code
                failures.append(exc)
                log.error("%s failed: %s", name, exc)
                done.set()

        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        threads.append(thread)
    while not done.wait(0.2):
        if not any(t.is_alive() for t in threads):
            break
    for _name, _run, stop in workers:
        stop()
    deadline = time.monotonic() + STOP_GRACE_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if failures:
        first = failures[0]
        raise first if isinstance(first, XctlError) else XctlError(str(first))


def _liveness(suspect: float, dead: float) -> LivenessConfig:
    if not 0 < suspect < dead:
        raise UsageError("--suspect-after must be positive and less than --dead-after")
    return LivenessConfig(int(suspect * 1000), int(dead * 1000))


rules_option = click.option(
    "--rules",
    "rules_dirs",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    metavar="DIR",
    help="site rules directory or file (repeatable; overrides built-in rules with the same id)",
)


def load_enricher(rules_dirs: tuple[Path, ...]) -> Enricher:
    """The rules engine for `why`: built-ins plus site rules; broken files are reported and skipped."""
    ruleset = load_rules(list(rules_dirs))
    con = render.console(stderr=True)
    for error in ruleset.errors:
        con.print(f"xctl: rules: {error} (skipped)", markup=False, style="yellow")
    return Engine(ruleset).enrich


probe_option = click.option(
    "--probe",
    "probes",
    multiple=True,
    metavar="SPEC",
    help="probe to run (repeatable): procfs, nvml, kmsg, network, storage, exec:CMD, "
    "replay:FILE, sim[:k=v,...]; default: the node probes that work here",
)
keys_option = click.option(
    "--keys",
    "keys",
    default=None,
    metavar="DIR",
    help="CURVE keys directory (env XCTL_KEYS; see `xctl keys` and docs/security.md)",
)
audit_option = click.option(
    "--audit-log",
    "audit_log",
    default=None,
    metavar="PATH",
    envvar="XCTL_AUDIT_LOG",
    help="append every zap command and its outcome to PATH as JSON lines (env XCTL_AUDIT_LOG; default: none)",
)


def make_actuator(node: str, audit_log: str | None) -> Actuator:
    """The agent's zap executor; NVML (for the GPU-memory check) is opened on first use only."""
    return Actuator(node, audit_log=audit_log, gpu_pids=NvmlGpuPids())


liveness_options = [
    click.option("--suspect-after", type=float, default=3.0, show_default=True, help="seconds of silence → suspect"),
    click.option("--dead-after", type=float, default=30.0, show_default=True, help="seconds of silence → dead"),
]


def _with(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def apply(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


@click.command()
@click.option("--node", default=None, help="this node's name (default: hostname)")
@probe_option
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="base port P (P, P+1, P+2)")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="serve Prometheus /metrics on 127.0.0.1:M (0: off; the aggregator's usual port is 9445)",
)
@audit_option
@rules_option
@_with(liveness_options)
@guarded
def run(
    node: str | None,
    probes: tuple[str, ...],
    port: int,
    metrics_port: int,
    audit_log: str | None,
    rules_dirs: tuple[Path, ...],
    suspect_after: float,
    dead_after: float,
) -> None:
    """Everything on this machine in one process: aggregator + agent (loopback)."""
    name = node or default_node_name()
    specs, disabled = usable_probes(probes or DEFAULT_PROBES, explicit=bool(probes))
    aggregator = Aggregator(
        AggregatorConfig(
            bind="127.0.0.1",
            port=port,
            liveness=_liveness(suspect_after, dead_after),
            metrics_port=metrics_port,
            metrics_bind="127.0.0.1",
            audit_log=audit_log,
            gc_policy=True,
        ),
        enrich=load_enricher(rules_dirs),
    )
    agent = Agent(
        AgentConfig(
            node=name,
            aggregator_host="127.0.0.1",
            port=port,
            probes=specs,
            disabled_probes=disabled,
            systemd_notify=True,
        ),
        command_handler=make_actuator(name, audit_log),
    )
    con = render.console(stderr=True)
    con.print(f"xctl run: node {name}, probes {', '.join(specs) or 'none'}; aggregator on 127.0.0.1:{port}")
    _say_disabled(con, disabled)
    con.print(f"  try: xctl ps    xctl nodes    xctl why {name}:<pid>    (Ctrl-C stops)")
    _serve([("aggregator", aggregator.run, aggregator.request_stop), ("agent", agent.run, agent.request_stop)])


@click.command()
@click.option(
    "--aggregator",
    "aggregator_addr",
    default=None,
    metavar="HOST[:P]",
    help="aggregator address (env XCTL_AGGREGATOR; default 127.0.0.1:7400)",
)
@click.option("--node", default=None, help="this node's name (default: hostname)")
@probe_option
@click.option("--batch-max", type=click.IntRange(1, 1000), default=1000, show_default=True,
              help="most events per batch (flushes also every 50 ms)")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="serve this agent's Prometheus /metrics on port M (0: off; the usual port is 9446)",
)
@click.option("--metrics-bind", default="0.0.0.0", show_default=True, help="address for --metrics-port")
@audit_option
@keys_option
@guarded
def agent(
    aggregator_addr: str | None,
    node: str | None,
    probes: tuple[str, ...],
    batch_max: int,
    metrics_port: int,
    metrics_bind: str,
    audit_log: str | None,
    keys: str | None,
) -> None:
    """The node agent: run probes and publish events to the aggregator."""
    host, port = parse_address(str(config.resolve("aggregator", aggregator_addr, config.DEFAULT_AGGREGATOR)))
    name = node or default_node_name()
    specs, disabled = usable_probes(probes or DEFAULT_PROBES, explicit=bool(probes))
    daemon = Agent(
        AgentConfig(
            node=name,
            aggregator_host=host,
            port=port,
            probes=specs,
            disabled_probes=disabled,
            flush_max=batch_max,
            metrics_port=metrics_port,
            metrics_bind=metrics_bind,
            systemd_notify=True,
            keys=_keys_dir(keys),
        ),
        command_handler=make_actuator(name, audit_log),
    )
    con = render.console(stderr=True)
    secured = f" (CURVE key {daemon.client_keys.path.name})" if daemon.client_keys else ""
    con.print(f"xctl agent {name}: probes {', '.join(specs) or 'none'} → {host}:{port}{secured}")
    _say_disabled(con, disabled)
    _serve([("agent", daemon.run, daemon.request_stop)])


@click.command()
@click.option("--bind", default="127.0.0.1", show_default=True, help="address to listen on (* for all)")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="base port P (P, P+1, P+2)")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_METRICS_PORT,
    show_default=True,
    help="Prometheus /metrics port (0: off; 9400 is dcgm-exporter's)",
)
@click.option("--metrics-bind", default=None, metavar="ADDR", help="address for /metrics (default: --bind)")
@audit_option
@rules_option
@keys_option
@click.option(
    "--insecure",
    is_flag=True,
    help="allow plaintext (no --keys) on an address other than loopback; warned about every hour",
)
@click.option(
    "--max-nodes",
    type=click.IntRange(1),
    default=DEFAULT_MAX_NODES,
    show_default=True,
    help="distinct node names kept at most; messages naming more new nodes are refused and counted",
)
@_with(liveness_options)
@guarded
def aggregator(
    bind: str,
    port: int,
    metrics_port: int,
    metrics_bind: str | None,
    audit_log: str | None,
    rules_dirs: tuple[Path, ...],
    keys: str | None,
    insecure: bool,
    max_nodes: int,
    suspect_after: float,
    dead_after: float,
) -> None:
    """The head-node aggregator: cluster graph, queries, command routing, /metrics.

    With --keys DIR (server.key_secret and the agents/ operators/ admins/ allow-lists) every
    connection is CURVE-authenticated; SIGHUP re-reads the allow-lists. Without keys it
    listens on loopback only, unless --insecure."""
    keys_dir = _keys_dir(keys)
    if not keys_dir:
        check_plaintext_bind(bind, insecure)
    mbind = metrics_bind or bind
    explicit = click.get_current_context().get_parameter_source("metrics_port") is not ParameterSource.DEFAULT
    if metrics_port and not explicit and not _port_free(mbind, metrics_port):
        log.warning("port %d is taken on %s: /metrics is off (give --metrics-port to choose one)", metrics_port, mbind)
        metrics_port = 0
    daemon = Aggregator(
        AggregatorConfig(
            bind=bind,
            port=port,
            liveness=_liveness(suspect_after, dead_after),
            metrics_port=metrics_port,
            metrics_bind=mbind,
            audit_log=audit_log,
            keys=keys_dir,
            insecure=insecure,
            max_nodes=max_nodes,
            gc_policy=True,
        ),
        enrich=load_enricher(rules_dirs),
    )
    served = f"; /metrics on {mbind}:{metrics_port}" if metrics_port else ""
    mode = {"curve": f"CURVE keys from {keys_dir}", "insecure": "PLAINTEXT (--insecure)"}.get(
        daemon.security()["mode"], "plaintext"
    )
    render.console(stderr=True).print(f"xctl aggregator listening on {bind}:{port}-{port + 2}{served}; {mode}")
    _serve([("aggregator", daemon.run, daemon.request_stop)], reload=daemon.request_reload)


def _keys_dir(flag: str | None) -> str | None:
    """--keys, else XCTL_KEYS, else the config file's ``keys``."""
    value = config.resolve("keys", flag, None)
    return str(value) if value else None


def _port_free(bind: str, port: int) -> bool:
    """Whether ``port`` can be listened on at ``bind`` now (the default metrics port is then used)."""
    host = "0.0.0.0" if bind in ("*", "") else bind
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------------ demo
DEMO_NODES: Final = 4
DEMO_FAULT_NODE: Final = "node3"


def free_port_base() -> int:
    """A base port P with P, P+1, P+2 free on loopback (best effort, then bound by the daemon)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + 2 > 65535:
            continue
        try:
            held = []
            for p in (base, base + 1, base + 2):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        return base
    raise XctlError("no three consecutive free ports on 127.0.0.1")


@click.command()
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="give up after this many seconds")
@guarded
def demo(output: str, timeout: float) -> None:
    """A simulated 4-node cluster running a 32-rank job; XID 79 strikes node3's gpu-3, and
    `why` on a rank of node1 names it."""
    con = render.console(stderr=True)
    port = free_port_base()
    agg = Aggregator(AggregatorConfig(bind="127.0.0.1", port=port), enrich=load_enricher(()))
    agents = []
    for i in range(DEMO_NODES):
        node = f"node{i + 1}"
        spec = (
            f"sim:gpus=8,job=job-42,ranks=32,nodes={DEMO_NODES},index={i},interval=500ms,"
            f"fault=xid79@gpu-3:node={DEMO_FAULT_NODE}:after=2s"
        )
        agents.append(Agent(AgentConfig(node=node, aggregator_host="127.0.0.1", port=port, probes=[spec])))
    threads = [threading.Thread(target=agg.run, name="aggregator", daemon=True)]
    threads += [threading.Thread(target=a.run, name=f"agent-{a.node}", daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        con.print(
            f"xctl demo: 4 simulated nodes (node1-node4), job-42 with 32 ranks; "
            f"XID 79 will hit {DEMO_FAULT_NODE}/gpu-3 after 2 s"
        )
        with QueryClient(endpoints("127.0.0.1", port).query, timeout_s=5.0) as client:
            answer = _wait_for_root(client, con, timeout)
            ps_data = client.request("ps", {"job": "job-42"})
        if output == "json":
            render.print_json({"apiVersion": "xctl/v1", "kind": "Demo", "ps": ps_data, "why": answer})
            return
        out = render.console()
        out.print("\n$ xctl ps --job job-42", style="bold")
        render.render_ps(out, ps_data)
        out.print("\n$ xctl why node1:4805", style="bold")
        render.render_why(out, answer)
    finally:
        for a in agents:
            a.request_stop()
        agg.request_stop()
        for t in threads:
            t.join(STOP_GRACE_S)


def _wait_for_root(client: QueryClient, con: Any, timeout: float) -> dict[str, Any]:
    """Poll `why` until the victim on node1 times out and the root cause on node3 is named."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    with con.status("waiting for the fault and its victims to show…"):
        while time.monotonic() < deadline:
            try:
                last = client.request("why", {"target": "node1:4805"})
            except XctlError:
                last = None  # node1 has not reported yet
            if last is not None and _explained(last):
                return last
            time.sleep(0.5)  # polling cadence for a human, not test synchronisation
    raise XctlError(f"the demo fault was not explained within {timeout:.0f} s (last answer: {last})")


def _explained(answer: dict[str, Any]) -> bool:
    root = answer.get("root_cause") or {}
    victim = any(s["code"] == "NCCL_TIMEOUT" for s in answer.get("symptoms", []))
    return bool(root.get("node") == DEMO_FAULT_NODE and victim)


COMMANDS: Final = [run, agent, aggregator, demo]
