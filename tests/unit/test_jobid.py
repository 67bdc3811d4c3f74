"""Job identity from environment variables and real-format /proc/PID/cgroup contents."""

from __future__ import annotations

import pytest

from xctl.probes.jobid import JobIdentity, from_environ, identify, parse_cgroup, parse_cgroup_path

CID = "0a1b22ec1361a97c3511db37a4bae932d41b22264e5b97611748f8b662312574"
POD = "fbc202d3-da21-11e8-ab5e-42010a80014b"


def test_environ_slurm_and_torchrun_worker() -> None:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "RANK": "11",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "16",
        "TORCHELASTIC_RUN_ID": "none",
        "MASTER_ADDR": "node001",
        "MASTER_PORT": "29500",
    }
    ident = from_environ(env)
    assert ident.job == "4242"
    assert ident.scheduler == "slurm"
    # RANK (torch's global rank) wins over SLURM_PROCID (the launcher task on this node)
    assert (ident.rank, ident.local_rank, ident.world_size, ident.step) == (11, 3, 16, "0")
    assert ident.master_addr == "node001:29500"


def test_environ_torchelastic_run_id_and_default_none() -> None:
    assert from_environ({"TORCHELASTIC_RUN_ID": "b7c1-run", "RANK": "0"}).job == "b7c1-run"
    assert from_environ({"TORCHELASTIC_RUN_ID": "b7c1-run"}).scheduler == "torchelastic"
    assert from_environ({"TORCHELASTIC_RUN_ID": "none", "RANK": "0"}).job is None


def test_environ_mpi_ranks() -> None:
    ident = from_environ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "8"})
    assert (ident.rank, ident.local_rank, ident.world_size, ident.scheduler) == (5, 1, 8, "mpi")
    assert from_environ({"PMI_RANK": "2", "PMI_SIZE": "4"}).rank == 2


def test_environ_garbage_is_ignored() -> None:
    ident = from_environ({"RANK": "three", "WORLD_SIZE": "-1", "SLURM_JOB_ID": "bad\x00id", "LOCAL_RANK": "\ufffd"})
    assert ident == JobIdentity()


@pytest.mark.parametrize(
    ("line", "pod", "cid", "runtime"),
    [
        # cgroup v2, systemd driver, containerd (burstable QoS): pod uid with underscores
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3e9b5f2c_8f3d_4c1a_9b2e_6f1c0d7a4e21"
            f".slice/cri-containerd-{CID}.scope",
            "3e9b5f2c-8f3d-4c1a-9b2e-6f1c0d7a4e21",
            CID,
            "containerd",
        ),
        # cgroup v1, cgroupfs driver, containerd
        (f"6:memory:/kubepods/burstable/pod{POD}/{CID}", POD, CID, "containerd"),
        # guaranteed QoS pods have no QoS level in the path
        (f"0::/kubepods/pod{POD}/{CID}", POD, CID, "containerd"),
        # cgroup v1 containerd with the systemd driver: slice:runtime:id
        (
            "12:cpu,cpuacct:/system.slice/containerd.service/kubepods-besteffort-podb41662f7_b03a_4c65_8ef9_6e4e55c3cf27"
            ".slice:cri-containerd:1753b7cbbf62734d812936961224d5bc0cf8f45214e0d5cdd1a781a053e7c48f",
            "b41662f7-b03a-4c65-8ef9-6e4e55c3cf27",
            "1753b7cbbf62734d812936961224d5bc0cf8f45214e0d5cdd1a781a053e7c48f",
            "containerd",
        ),
        # CRI-O
        (
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD.replace('-', '_')}.slice/"
            f"crio-{CID}.scope",
            POD,
            CID,
            "crio",
        ),
        # Kubernetes with the Docker runtime
        (
            "4:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c-b29f-11e7-9350-020968147796"
            ".slice/docker-9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961.scope",
            "2c48913c-b29f-11e7-9350-020968147796",
            "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961",
            "docker",
        ),
        # plain Docker, v2 and v1
        (f"0::/system.slice/docker-{CID}.scope", None, CID, "docker"),
        (f"12:pids:/docker/{CID}", None, CID, "docker"),
    ],
)
def test_container_cgroups(line: str, pod: str | None, cid: str, runtime: str) -> None:
    info = parse_cgroup(line + "\n")
    assert info.pod_uid == pod
    assert info.container_id == cid
    assert info.runtime == runtime


def test_crio_conmon_is_not_the_container() -> None:
    assert parse_cgroup_path(f"/kubepods.slice/crio-conmon-{CID}.scope").container_id is None


@pytest.mark.parametrize(
    ("text", "job", "step"),
    [
        ("10:devices:/slurm/uid_2101171/job_280678/step_0/task_0\n", "280678", "0"),
        ("0::/system.slice/slurmstepd.scope/job_1392969/step_0/user/task_0\n", "1392969", "0"),
        ("0::/system.slice/slurmstepd.scope/job_42/step_extern/user\n", "42", "extern"),
        ("0::/system.slice/node07_slurmstepd.scope/job_77/step_batch/user/task_special\n", "77", "batch"),
        ("0::/system.slice/slurmstepd.scope/job_42\n", "42", None),
    ],
)
def test_slurm_cgroups(text: str, job: str, step: str | None) -> None:
    ident = identify({}, text)
    assert (ident.job, ident.step, ident.scheduler) == (job, step, "slurm")


def test_systemd_unit() -> None:
    ident = identify(None, "0::/system.slice/foo.service\n")
    assert ident.unit == "foo.service"
    assert ident.scheduler == "systemd"
    assert ident.job is None


def test_v1_multi_line_file_merges_and_root_lines_say_nothing() -> None:
    text = (
        f"12:memory:/kubepods/burstable/pod{POD}/{CID}\n"
        f"11:cpu,cpuacct:/kubepods/burstable/pod{POD}/{CID}\n"
        "1:name=systemd:/\n"
        "0::/\n"
    )
    ident = identify(None, text)
    assert ident.job == f"pod:{POD}"
    assert ident.scheduler == "kubernetes"
    assert ident.container_id == CID
    assert identify(None, "0::/\n") == JobIdentity()


def test_job_id_preference_order() -> None:
    slurm_cg = "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n"
    pod_cg = f"0::/kubepods/pod{POD}/{CID}\n"
    assert identify({"SLURM_JOB_ID": "9", "TORCHELASTIC_RUN_ID": "r1"}, slurm_cg).job == "9"
    assert identify({"TORCHELASTIC_RUN_ID": "r1"}, slurm_cg).job == "r1"
    assert identify({}, slurm_cg).job == "7"
    assert identify({}, pod_cg).job == f"pod:{POD}"
    # a torchrun job with nothing better is still one job across nodes
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "16", "RANK": "3"}
    assert identify(env, None).job == "torch:10.0.0.1:29500"
    assert identify({**env, "WORLD_SIZE": "1"}, None).job is None


def test_malformed_cgroup_text_never_raises() -> None:
    for text in ("", "garbage", "::", "0::", "1:2", "\x00\xff", "0::relative/path", "9:cpu:/slurm/uid_x/job_y"):
        assert isinstance(identify({}, text), JobIdentity)
