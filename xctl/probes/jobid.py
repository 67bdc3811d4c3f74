"""Job identity of a process: pure parsers of its environment and its cgroup file.

Nothing here reads a file. :func:`identify` takes the decoded environment (a dict, see
:func:`xctl.probes.procfs.parse_environ`) and the text of ``/proc/PID/cgroup`` and returns a
:class:`JobIdentity`.

Job id preference (first that is known): ``SLURM_JOB_ID``, ``TORCHELASTIC_RUN_ID`` (not its
default ``none``), the Slurm job in the cgroup path, the Kubernetes pod uid (as ``pod:<uid>``),
and, last, ``torch:<MASTER_ADDR>:<MASTER_PORT>`` for a distributed job with nothing better —
ranks of the same job on different nodes share it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """Who a process works for. Every field is optional."""

    job: str | None = None
    rank: int | None = None
    local_rank: int | None = None
    world_size: int | None = None
    step: str | None = None
    #: slurm, kubernetes, torchelastic, mpi, docker, systemd — whichever placed the process.
    scheduler: str | None = None
    pod_uid: str | None = None
    container_id: str | None = None
    unit: str | None = None
    master_addr: str | None = None


NO_IDENTITY: Final = JobIdentity()

_RANK_VARS: Final = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
_LOCAL_RANK_VARS: Final = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
_WORLD_SIZE_VARS: Final = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
_MAX_ID_LEN: Final = 128


def _int_var(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        raw = env.get(name)
        if raw is None:
            continue
        raw = raw.strip()
        if raw.isascii() and raw.isdigit() and len(raw) < 10:
            return int(raw)
    return None


def _str_var(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    if raw is None:
        return None
    raw = raw.strip()
    if not raw or len(raw) > _MAX_ID_LEN or not raw.isprintable():
        return None
    return raw


def from_environ(env: Mapping[str, str]) -> JobIdentity:
    """Identity from environment variables (Slurm, torchrun/torchelastic, Open MPI, PMI)."""
    slurm_job = _str_var(env, "SLURM_JOB_ID")
    run_id = _str_var(env, "TORCHELASTIC_RUN_ID")
    if run_id is not None and run_id.lower() == "none":  # torchrun's default --rdzv-id
        run_id = None
    master_addr = _str_var(env, "MASTER_ADDR")
    master_port = _str_var(env, "MASTER_PORT")
    rank = _int_var(env, _RANK_VARS)
    world_size = _int_var(env, _WORLD_SIZE_VARS)
    step = _str_var(env, "SLURM_STEP_ID")

    job: str | None
    scheduler: str | None
    if slurm_job is not None:
        job, scheduler = slurm_job, "slurm"
    elif run_id is not None:
        job, scheduler = run_id, "torchelastic"
    else:
        job = None
        if any(n in env for n in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
            scheduler = "mpi"
        elif "TORCHELASTIC_RESTART_COUNT" in env or "GROUP_RANK" in env:
            scheduler = "torchelastic"
        else:
            scheduler = None
    return JobIdentity(
        job=job,
        rank=rank,
        local_rank=_int_var(env, _LOCAL_RANK_VARS),
        world_size=world_size,
        step=step,
        scheduler=scheduler,
        master_addr=f"{master_addr}:{master_port}" if master_addr and master_port else master_addr,
    )


# --- cgroup paths ----------------------------------------------------------------------------

_HEX_ID: Final = r"[0-9a-f]{12,64}"
_POD_UID: Final = r"[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12}"

#: ``kubepods-burstable-pod<uid>.slice`` (systemd driver) or ``/kubepods/besteffort/pod<uid>/``.
_POD_RE: Final = re.compile(rf"[/-]pod({_POD_UID})(?:\.slice|/|$)")
#: Container ids, by runtime.
_CONTAINER_RES: Final = (
    ("containerd", re.compile(rf"cri-containerd[-:]({_HEX_ID})(?:\.scope)?(?:/|$)")),
    ("crio", re.compile(rf"crio-(?!conmon-)({_HEX_ID})(?:\.scope)?(?:/|$)")),
    ("docker", re.compile(rf"docker-({_HEX_ID})\.scope(?:/|$)")),
    ("docker", re.compile(rf"/docker/({_HEX_ID})(?:/|$)")),
    ("containerd", re.compile(rf"/kubepods/(?:[a-z]+/)?pod{_POD_UID}/({_HEX_ID})(?:/|$)")),
)
_SLURM_RES: Final = (
    re.compile(r"/slurm[^/]*/uid_\d+/job_(\d+)(?:/step_([A-Za-z0-9_]+))?"),
    re.compile(r"slurmstepd\.scope/job_(\d+)(?:/step_([A-Za-z0-9_]+))?"),
)
_UNIT_RE: Final = re.compile(r"/([A-Za-z0-9:_.@\\-]+\.service)(?:/|$)")


@dataclass(frozen=True, slots=True)
class CgroupInfo:
    """What one process's cgroup paths say."""

    slurm_job: str | None = None
    slurm_step: str | None = None
    pod_uid: str | None = None
    container_id: str | None = None
    runtime: str | None = None
    unit: str | None = None


def cgroup_paths(text: str) -> list[str]:
    """The paths of a ``/proc/PID/cgroup`` file (v1 ``N:ctrl:path`` and v2 ``0::path`` lines)."""
    paths: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        path = parts[2].strip()
        if path not in paths:
            paths.append(path)
    return paths


def parse_cgroup_path(path: str) -> CgroupInfo:
    """Scheduler facts from one cgroup path."""
    slurm_job = slurm_step = pod_uid = container_id = runtime = unit = None
    for regex in _SLURM_RES:
        m = regex.search(path)
        if m:
            slurm_job, slurm_step = m.group(1), m.group(2)
            break
    m = _POD_RE.search(path)
    if m:
        pod_uid = m.group(1).replace("_", "-").lower()
    for name, regex in _CONTAINER_RES:
        m = regex.search(path)
        if m:
            container_id, runtime = m.group(1), name
            break
    units = [u for u in _UNIT_RE.findall(path) if not u.startswith(("docker-", "crio-", "cri-containerd-"))]
    if units:
        unit = units[-1]
    return CgroupInfo(slurm_job, slurm_step, pod_uid, container_id, runtime, unit)


def parse_cgroup(text: str) -> CgroupInfo:
    """Merge what every line of a ``/proc/PID/cgroup`` file says (first non-empty wins, v2 first)."""
    paths = cgroup_paths(text)
    v2 = [line.split(":", 2)[2].strip() for line in text.splitlines() if line.startswith("0::")]
    ordered = [p for p in v2 if p in paths] + [p for p in paths if p not in v2]
    merged: dict[str, str | None] = dict.fromkeys(CgroupInfo.__slots__)
    for path in ordered:
        info = parse_cgroup_path(path)
        for key in CgroupInfo.__slots__:
            if merged[key] is None:
                merged[key] = getattr(info, key)
    return CgroupInfo(**merged)


def identify(env: Mapping[str, str] | None, cgroup_text: str | None) -> JobIdentity:
    """Combine environment and cgroup into one identity (see the module doc for the job order)."""
    ident = from_environ(env) if env else NO_IDENTITY
    cg = parse_cgroup(cgroup_text) if cgroup_text else CgroupInfo()
    job, scheduler = ident.job, ident.scheduler
    if job is None and cg.slurm_job is not None:
        job, scheduler = cg.slurm_job, "slurm"
    if job is None and cg.pod_uid is not None:
        job, scheduler = f"pod:{cg.pod_uid}", "kubernetes"
    if job is None and ident.master_addr is not None and ident.world_size is not None and ident.world_size > 1:
        job = f"torch:{ident.master_addr}"
    if scheduler is None:
        if cg.pod_uid is not None:
            scheduler = "kubernetes"
        elif cg.runtime == "docker":
            scheduler = "docker"
        elif cg.unit is not None:
            scheduler = "systemd"
    step = ident.step if ident.step is not None else cg.slurm_step
    return replace(
        ident,
        job=job,
        scheduler=scheduler,
        step=step,
        pod_uid=cg.pod_uid,
        container_id=cg.container_id,
        unit=cg.unit,
    )
