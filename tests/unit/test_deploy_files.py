"""The deployment files (deploy/, docker-compose.yml, Dockerfile) checked for what matters:
they parse, they ask for the privileges and mounts the probes need, every xctl command line
in them is accepted by the real CLI parser with probe SPECs the real registry accepts, and
the Grafana dashboard uses only metric names the collectors really export.

No container engine or Kubernetes cluster here: images are not built and manifests are not
applied (see docs/operations.md for what was validated how)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from xctl.agent.daemon import Agent, AgentConfig
from xctl.agent.metrics import make_registry as agent_registry
from xctl.aggregator.metrics import make_registry
from xctl.aggregator.queries import handle
from xctl.aggregator.server import Aggregator, AggregatorConfig
from xctl.cli.main import main as cli_main
from xctl.probes.registry import make_probe
from xctl.probes.sim import SimNode, parse_sim_spec

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), ROOT / "docker-compose.yml"])


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> Iterator[dict[str, Any]]:
    for path in sorted(K8S.glob("*.yaml")):
        yield from load_all(path)


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o.get("kind") == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def check_cli(args: list[str]) -> None:
    """``args`` (after ``xctl``) parse with the real click commands; probe SPECs are valid."""
    command = cli_main.commands[args[0]]
    ctx = command.make_context(args[0], list(args[1:]), parent=click.Context(cli_main))
    for spec in ctx.params.get("probes", ()):
        make_probe(spec)  # raises ProbeError on a SPEC the registry would refuse


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ------------------------------------------------------------------------------ YAML
@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert load_all(path), f"{path} is empty"


def test_kustomization_lists_existing_files() -> None:
    (kust,) = load_all(K8S / "kustomization.yaml")
    for resource in kust["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "servicemonitor.yaml" not in kust["resources"]  # needs the Prometheus Operator's CRDs


# ------------------------------------------------------------------------------ Kubernetes
def test_agent_daemonset_has_host_access_for_its_probes() -> None:
    ds = k8s("DaemonSet", "xctl-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path, host, kind in (
        ("/dev/kmsg", "/dev/kmsg", "CharDevice"),
        ("/host/proc", "/proc", "Directory"),
        ("/host/sys", "/sys", "Directory"),
    ):
        assert mounts[path]["readOnly"] is True, path
        assert volumes[mounts[path]["name"]]["hostPath"] == {"path": host, "type": kind}
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    args = container["args"]
    assert option(args, "--node") == "$(NODE_NAME)"
    assert option(args, "--aggregator") == "xctl-aggregator.xctl.svc:7400"
    assert container["ports"][0]["containerPort"] == int(option(args, "--metrics-port")) == 9446
    check_cli(args)
    probes = [option(args[i:], "--probe") for i, a in enumerate(args) if a == "--probe"]
    assert {p.split(":")[0] for p in probes} == {"procfs", "kmsg", "network", "storage", "nvml"}
    assert all("/host/" in p for p in probes if p.split(":")[0] in ("procfs", "network", "storage"))


def test_aggregator_deployment_and_service() -> None:
    dep = k8s("Deployment", "xctl-aggregator")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    check_cli(container["args"])
    assert option(container["args"], "--bind") == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"events": 7400, "control": 7401, "query": 7402, "metrics": 9445}
    svc = k8s("Service", "xctl-aggregator")
    assert {p["port"] for p in svc["spec"]["ports"]} == {7400, 7401, 7402, 9445}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    for name in secrets | {"xctl-agent-keys"}:
        k8s("Secret", name)


def test_kubectl_kustomize_builds_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomization is only parsed as YAML")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(out.stdout) if doc)
    assert kinds == ["DaemonSet", "Deployment", "Namespace", "Secret", "Secret", "Service"]


# ------------------------------------------------------------------------------ compose
def compose() -> dict[str, Any]:
    (doc,) = load_all(ROOT / "docker-compose.yml")
    return doc  # type: ignore[no-any-return]


def test_compose_tells_one_job_story_with_healthchecks() -> None:
    services = compose()["services"]
    agg = services["aggregator"]
    check_cli(agg["command"])
    assert "healthcheck" in agg
    specs = []
    for i, node in enumerate(("node1", "node2", "node3")):
        svc = services[node]
        check_cli(svc["command"])
        assert option(svc["command"], "--node") == node
        assert option(svc["command"], "--aggregator") == "aggregator:7400"
        assert svc["depends_on"]["aggregator"]["condition"] == "service_healthy"
        assert option(svc["command"], "--metrics-port") == "9446"
        assert "127.0.0.1:9446/metrics" in str(svc["healthcheck"]["test"])  # health = its own /metrics answers
        spec = option(svc["command"], "--probe")
        config = parse_sim_spec(spec.partition(":")[2])
        assert (config.index, config.nodes) == (i, 3)
        specs.append(spec.replace(f"index={i}", "index=N"))
    assert len(set(specs)) == 1, "the three sim probes must describe the same job"
    faults = parse_sim_spec(specs[0].partition(":")[2].replace("index=N", "index=0")).faults
    assert {(f.kind, f.node) for f in faults} == {("xid79", "node3"), ("thermal", "node2")}
    cli = services["cli"]
    assert {n: d["condition"] for n, d in cli["depends_on"].items()} == dict.fromkeys(
        ("node1", "node2", "node3"), "service_healthy"
    )
    assert "xctl why node1:4800" in cli["command"][0]
    assert services["prometheus"]["profiles"] == ["observability"]
    assert services["grafana"]["profiles"] == ["observability"]


def test_docker_compose_config_validates_the_file() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    for extra in ([], ["--profile", "observability"]):
        out = subprocess.run(
            [tool, *extra, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        assert out.returncode == 0, out.stderr


def test_compose_prometheus_config_scrapes_the_xctl_ports() -> None:
    (config,) = load_all(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"aggregator:9445", "node1:9446", "node2:9446", "node3:9446"}


def test_dockerfile_is_slim_and_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["python:3.11-slim", "python:3.11-slim"]
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["xctl"]' in text
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if not ln.startswith("#")]
    assert ".venv" in ignored and ".git" in ignored and "README.md" not in ignored  # pyproject reads README


# ------------------------------------------------------------------------------ systemd
def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section → key → values (keys may repeat, unlike configparser's INI)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def exec_args(service: dict[str, list[str]]) -> list[str]:
    args = shlex.split(service["ExecStart"][0])
    assert args[0] == "/usr/local/bin/xctl"
    return [a for a in args[1:] if not a.startswith("$")]


def test_agent_unit_notifies_and_keeps_the_host_visible() -> None:
    service = unit("xctl-agent.service")["Service"]
    assert service["Type"] == ["notify"]
    assert int(service["WatchdogSec"][0]) >= 5
    assert service["Restart"] == ["on-failure"]
    caps = set(service["CapabilityBoundingSet"][0].split())
    assert caps == {"CAP_KILL", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYSLOG"}
    assert service["ProtectSystem"] == ["strict"] and service["NoNewPrivileges"] == ["yes"]
    # Settings that would hide what the probes read must stay off.
    for key, forbidden in (
        ("ProtectKernelLogs", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        ("PrivateNetwork", "yes"),
        ("PrivateUsers", "yes"),
        ("DevicePolicy", "closed"),
    ):
        assert forbidden not in service.get(key, []), key
    check_cli(exec_args(service))


def test_aggregator_unit_is_unprivileged_and_sandboxed() -> None:
    service = unit("xctl-aggregator.service")["Service"]
    assert service["User"] == ["xctl"]
    assert service["CapabilityBoundingSet"] == [""]
    for key in ("PrivateDevices", "ProtectKernelLogs", "NoNewPrivileges", "MemoryDenyWriteExecute"):
        assert service[key] == ["yes"], key
    args = exec_args(service)
    check_cli(args)
    assert option(args, "--metrics-port") == "9445"


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the units are only parsed")
    xctl = shutil.which("xctl") or "/bin/true"  # verify wants ExecStart's binary to exist
    paths = []
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace("/usr/local/bin/xctl", xctl))
        paths.append(str(copy))
    out = subprocess.run([analyze, "verify", *paths], capture_output=True, text=True, timeout=60, check=False)
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if str(tmp_path) in line or "Unknown" in line]
    assert out.returncode == 0 and complaints == [], out.stdout + out.stderr


# ------------------------------------------------------------------------------ Grafana
def exported_names() -> set[str]:
    """Every sample name the aggregator and agent collectors export, from a real scrape."""
    now = [1_700_000_000_000]
    agg = Aggregator(AggregatorConfig(), clock=lambda: now[0])
    sims = [
        SimNode(parse_sim_spec(f"gpus=2,ranks=4,nodes=2,index={i},fault=xid79@gpu-1:node=n2:after=1s"), f"n{i + 1}", 0)
        for i in range(2)
    ]
    for t in range(0, 10_000, 500):
        now[0] = 1_700_000_000_000 + t
        for i, sim in enumerate(sims):
            agg.cluster.apply_all(f"n{i + 1}", sim.sample(t))
    for node in ("n1", "n2"):
        agg.cluster.seen(node).probes = [{"name": "sim", "state": "running", "detail": ""}]
    agg.drops.count("seq_gap")
    agg.cluster.nodes["n1"].ignored["late_event"] = 1
    agg.zap_results = {"ok": 1}  # type: ignore[attr-defined]
    agg.diag_runs = {"rules": 1}  # type: ignore[attr-defined]
    handle(agg.queries, "ps", {}, agg.handlers)
    agent = Agent(AgentConfig(node="n1", probes=["sim"]))
    agent.supervisor.slots[0].bad["bad_json"] = 1
    agent.supervisor.slots[0].record_cycle(0.001)
    agent.drops.count("pub_hwm")
    names: set[str] = set()
    for registry in (make_registry(agg), agent_registry(agent)):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            names.update(s.name for s in family.samples)
    return names


def dashboard_queries(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str | dict):
                yield value if isinstance(value, str) else str(value.get("query", ""))
            else:
                yield from dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "xctl.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    used = {name for q in dashboard_queries(dashboard) for name in re.findall(r"\bxctl_[a-z0-9_]+", q)}
    exported = exported_names()
    assert used, "the dashboard queries no xctl metric"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("agents", "blocked", "active errors", "gpu utilisation by node"):
        assert topic in titles, topic


def test_exported_names_cover_the_documented_families() -> None:
    """docs/operations.md lists every family; the list and the collectors agree."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(xctl_[a-z0-9_]+)`", doc, re.M))
    exported = exported_names()
    families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in exported}
    assert documented == families, (
        f"undocumented: {sorted(families - documented)}; documented but not exported: {sorted(documented - families)}"
    )
