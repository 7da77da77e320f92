"""Real clusters on this one machine, for the Slurm and multi-node tests.

`slurm_cluster`: slurmctld + slurmd + munged from Debian's packages (installed with apt-get when
missing; the tests run as root here and in CI), configured for this host only. A Slurm that already
answers is reused and left running; one started here is stopped at the end of the session.

`two_hosts`: two network namespaces joined by a veth pair, each with its own address, so torchrun's
rendezvous and gloo really cross a network between two "nodes".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest

SLURM_PACKAGES = ("slurm-wlm", "munge")
SLURM_CONF = "/etc/slurm/slurm.conf"
# State, spool, pid and log files of a Slurm started by the tests: one place, easy to inspect.
SLURM_STATE_DIR = "/var/spool/mmtrain-test-slurm"
SLURM_PARTITION = "mmtrain"
MUNGE_KEY = "/etc/munge/munge.key"
MUNGE_RUN_DIR = "/run/munge"
SLURM_START_TIMEOUT_S = 120


class ClusterSetupError(RuntimeError):
    """A step of setting up the test cluster failed; the message names the step and its output."""


def _run(cmd, step: str, timeout_s: int = 600, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, **kwargs)
    if done.returncode != 0:
        raise ClusterSetupError(f"{step}: `{' '.join(cmd)}` exited {done.returncode}\n{done.stdout[-3000:]}"
                                f"\n{done.stderr[-3000:]}")
    return done


def _slurm_answers() -> bool:
    if shutil.which("scontrol") is None:
        return False
    done = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    return done.returncode == 0 and "UP" in done.stdout


def _install_packages() -> None:
    missing = [p for p in SLURM_PACKAGES
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterSetupError(f"installing {missing} needs root (apt-get); run the Slurm tests as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    retries = ["-o", "Acquire::Retries=5"]  # a mirror's hiccup is not a test failure
    install = ["apt-get", *retries, "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(install, capture_output=True, text=True, env=env, timeout=900).returncode != 0:
        # A fresh CI image may have no package lists yet; fetch them once and try again.
        _run(["apt-get", *retries, "update", "-q"], "apt-get update", env=env)
        _run(install, f"apt-get install {' '.join(missing)}", timeout_s=900, env=env)


def _start_munge() -> bool:
    """Start munged unless it already answers; returns whether this call started it."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return False
    if not os.path.exists(MUNGE_KEY):
        _run(["mungekey", "--create", "--keyfile", MUNGE_KEY], "munge key")
    os.makedirs(MUNGE_RUN_DIR, exist_ok=True)
    for path in (MUNGE_KEY, MUNGE_RUN_DIR, "/var/lib/munge", "/var/log/munge"):
        if os.path.exists(path):
            shutil.chown(path, "munge", "munge")
    os.chmod(MUNGE_KEY, 0o400)
    # munged refuses to run as root; the package's service runs it as the munge user too.
    _run(["runuser", "-u", "munge", "--", "munged"], "start munged")
    return True


def _slurm_conf(host: str) -> str:
    cpus = os.cpu_count() or 1
    with open("/proc/meminfo") as f:
        mem_available_mib = next(int(line.split()[1]) // 1024 for line in f if line.startswith("MemAvailable:"))
    # slurmd rejects a node whose RealMemory exceeds what it sees; leave room for other users.
    real_memory_mib = max(1024, int(mem_available_mib * 0.8))
    d = SLURM_STATE_DIR
    return f"""# Written by mmtrain's tests (tests/cluster_fixtures.py): a one-host cluster, no cgroups, no accounting.
ClusterName=mmtrain-test
SlurmctldHost={host}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/slurmd
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MaxJobCount=100000
# Finished jobs stay visible to `scontrol show job` long enough for the tests to read them.
MinJobAge=3600
KillWait=30
NodeName={host} CPUs={cpus} RealMemory={real_memory_mib} State=UNKNOWN
PartitionName={SLURM_PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _wait_node_idle(host: str) -> None:
    deadline = time.monotonic() + SLURM_START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        done = subprocess.run(["sinfo", "-h", "-N", "-n", host, "-o", "%T"], capture_output=True, text=True)
        state = done.stdout.strip()
        if state.startswith("idle") or state.startswith("mixed") or state.startswith("alloc"):
            return
        time.sleep(1)
    logs = ""
    for name in ("slurmctld.log", "slurmd.log"):
        path = os.path.join(SLURM_STATE_DIR, name)
        if os.path.exists(path):
            logs += f"\n--- {path} (tail)\n" + open(path).read()[-2000:]
    raise ClusterSetupError(f"node {host} not idle after {SLURM_START_TIMEOUT_S}s (sinfo says {state!r}){logs}")


def start_slurm():
    """Install and start a one-host Slurm unless one answers; returns (host, started_here), where
    started_here lists what to stop afterwards ("slurm", "munge")."""
    host = socket.gethostname().split(".")[0]
    if _slurm_answers():
        _wait_node_idle(host)
        return host, []
    _install_packages()
    started = ["munge"] if _start_munge() else []
    for sub in ("state", "slurmd"):
        os.makedirs(os.path.join(SLURM_STATE_DIR, sub), exist_ok=True)
    os.makedirs(os.path.dirname(SLURM_CONF), exist_ok=True)
    with open(SLURM_CONF, "w") as f:
        f.write(_slurm_conf(host))
    # -c: a clean start, no jobs remembered from an earlier session's state files.
    _run(["slurmctld", "-c"], "start slurmctld")
    _run(["slurmd"], "start slurmd")
    started.append("slurm")
    _wait_node_idle(host)
    return host, started


def stop_slurm(started: list) -> None:
    """Stop what start_slurm started: slurmctld and slurmd, then munged."""
    if "slurm" in started:
        subprocess.run(["scontrol", "shutdown"], capture_output=True, timeout=60)
    pid_file = os.path.join(MUNGE_RUN_DIR, "munged.pid")
    if "munge" in started and os.path.exists(pid_file):
        with open(pid_file) as f:
            os.kill(int(f.read().strip()), signal.SIGTERM)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-host Slurm; yields {"host", "partition"}. Fails (never skips) when it cannot start."""
    host, started_here = start_slurm()
    yield {"host": host, "partition": SLURM_PARTITION}
    stop_slurm(started_here)


@contextlib.contextmanager
def two_hosts(subnet: str = "10.231.0"):
    """Two network namespaces joined by a veth pair: yields [(netns, address, interface)] x 2.

    Names carry a random suffix so parallel sessions do not clash; both namespaces (and with them
    the veth ends) are deleted on exit, also after a failure.
    """
    tag = uuid.uuid4().hex[:6]
    hosts = [(f"mmt{tag}n{i}", f"{subnet}.{i + 1}", f"mmt{tag}v{i}") for i in range(2)]
    created = []
    try:
        for ns, _, _ in hosts:
            _run(["ip", "netns", "add", ns], f"create network namespace {ns}")
            created.append(ns)
        (ns0, addr0, if0), (ns1, addr1, if1) = hosts
        _run(["ip", "link", "add", if0, "type", "veth", "peer", "name", if1], "create veth pair")
        for ns, addr, ifname in hosts:
            _run(["ip", "link", "set", ifname, "netns", ns], f"move {ifname} into {ns}")
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname], f"address {addr} on {ns}")
            _run(["ip", "-n", ns, "link", "set", ifname, "up"], f"bring up {ifname} in {ns}")
            _run(["ip", "-n", ns, "link", "set", "lo", "up"], f"bring up lo in {ns}")
        yield hosts
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


TERMINAL_JOB_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                       "DEADLINE", "PREEMPTED")


def job_fields(job_id: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once Slurm forgot the job."""
    done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return {}
    return dict(field.split("=", 1) for field in done.stdout.split() if "=" in field)


def wait_for_job(job_id: str, until, timeout_s: float, what: str, log_path: str = "") -> dict:
    """Poll the job until `until(fields)` holds; returns its fields. Fails with the job's state and log
    when the time runs out or the job ends without `until` holding."""
    deadline = time.monotonic() + timeout_s
    fields = {}
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields and until(fields):
            return fields
        if fields.get("JobState") in TERMINAL_JOB_STATES:
            break
        time.sleep(1)
    log = open(log_path).read()[-6000:] if log_path and os.path.exists(log_path) else "(no log)"
    ended = "ended" if fields.get("JobState") in TERMINAL_JOB_STATES else f"not within {timeout_s:.0f} s"
    raise AssertionError(f"job {job_id}: {what}: {ended}; JobState={fields.get('JobState')} "
                         f"Restarts={fields.get('Restarts')} ExitCode={fields.get('ExitCode')}\n--- {log_path}\n{log}")
