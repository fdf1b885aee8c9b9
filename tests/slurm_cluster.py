"""A real single-node Slurm cluster for tests (a pytest plugin module, not a test file).

`slurm/local_cluster.sh start DIR` runs munged, slurmctld and slurmd as root with everything
(config, munge key/socket, spool, logs, pid files) in DIR; client commands find that cluster through
SLURM_CONF. The session fixture `slurm_cluster` starts one in a temporary directory on free ports,
points SLURM_CONF (and PATH, for the sacct stand-in) of this process at it for the session, and stops
the daemons by PID at the end. Without Slurm installed (`slurm/local_cluster.sh install`), or when
not root, or when it does not come up, tests using it are skipped with the reason; set
POA_SLURM_REQUIRED=1 (CI with Slurm installed) to make that a failure instead.

Exposed to the tests by `pytest_plugins = ["slurm_cluster"]` in tests/conftest.py; tests using the
fixture are marked `@pytest.mark.slurm` (the marker is registered here).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "local_cluster.sh"
PARTITION = "debug"
PREEMPT_PARTITION = "urgent"

# Job states after which a job does not run again (a requeued job goes back to PENDING).
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)

# Environment of the caller that must not leak into jobs submitted to the test cluster (e.g. when
# pytest itself runs inside a Slurm allocation).
_LEAKY_ENV = re.compile(r"^(SLURM_|SBATCH_|SALLOC_|SRUN_|SQUEUE_|SUBMITIT_)")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not installed, not root, no script)."""


class SlurmStartError(RuntimeError):
    """The cluster was started but did not come up; the message holds the daemons' log tails."""


def unavailable_reason(nodes: int = 1) -> Optional[str]:
    """Why a local cluster (of ``nodes`` nodes) cannot be started here, or None."""
    if not SCRIPT.is_file():
        return f"{SCRIPT} not found"
    tools = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol") + (("ip", "unshare", "nsenter") if nodes > 1 else ())
    missing = [c for c in tools if shutil.which(c) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} not on PATH; run: bash slurm/local_cluster.sh install)"
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root"
    return None


def _free_ports(n: int) -> List[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _parse_kv(line: str) -> Dict[str, str]:
    """`scontrol show ... -o` / job completion log line -> {Key: value} (values without spaces)."""
    return dict(m.groups() for m in re.finditer(r"(?:^|\s)([A-Za-z_:/]+)=(\S*)", line))


@dataclasses.dataclass
class SlurmCluster:
    state_dir: Path
    partition: str = PARTITION
    # Jobs submitted here preempt (requeue) the jobs of `partition`.
    preempt_partition: str = PREEMPT_PARTITION
    # The namespaced nodes of a several-node cluster (`start --nodes N`: poa-node01, ...); () for one node.
    nodes: Tuple[str, ...] = ()

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def bin_dir(self) -> Path:
        """Holds the sacct stand-in (there is no accounting storage)."""
        return self.state_dir / "bin"

    @property
    def env(self) -> Dict[str, str]:
        """Environment for subprocesses (and jobs, which inherit the submitter's environment)."""
        env = {k: v for k, v in os.environ.items() if not _LEAKY_ENV.match(k)}
        env["SLURM_CONF"] = str(self.conf)
        path = env.get("PATH", os.defpath).split(os.pathsep)
        env["PATH"] = os.pathsep.join([str(self.bin_dir)] + [p for p in path if p != str(self.bin_dir)])
        return env

    # -- commands -------------------------------------------------------------------------------------

    def run(
        self, *cmd: Union[str, os.PathLike], check: bool = True, timeout: float = 60, **kw
    ) -> subprocess.CompletedProcess:
        """Run a command against this cluster; text output captured."""
        kw.setdefault("env", self.env)
        r = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
        return r

    def sbatch(self, script: Union[str, os.PathLike], *args: str, **kw) -> str:
        """Submit a batch script (sbatch ARGS... SCRIPT); returns the job id. Raises CalledProcessError
        (with Slurm's message in .stderr) when the submission is refused."""
        r = self.run("sbatch", "--parsable", *args, script, **kw)
        return r.stdout.strip().split(";")[0]

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("scontrol", *args, check=check)

    def scancel(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("scancel", *args, check=check)

    # -- job state ------------------------------------------------------------------------------------

    def job_info(self, job_id: str) -> Dict[str, str]:
        """Fields of `scontrol show job -o ID` (first line for an array), or, once slurmctld has
        forgotten the finished job (MinJobAge), of its last line in the job completion log;
        {} for an unknown job. (There is no accounting storage: sacct does not work.)"""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if r.returncode == 0 and r.stdout.strip():
            return _parse_kv(r.stdout.strip().splitlines()[0])
        base = str(job_id).split("_")[0]
        comp = self.state_dir / "jobcomp.log"
        if comp.exists():
            for line in reversed(comp.read_text(errors="replace").splitlines()):
                if line.startswith(f"JobId={base} "):
                    return _parse_kv(line)
        return {}

    def job_state(self, job_id: str) -> Optional[str]:
        """PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, ...; None if unknown."""
        state = self.job_info(job_id).get("JobState")
        return state.split()[0].rstrip("+") if state else None

    def wait_state(
        self, job_id: str, states: Union[str, Iterable[str]], timeout: float = 30, poll: float = 0.2
    ) -> str:
        """Wait until the job is in one of `states`; returns that state. Raises AssertionError on
        timeout, or as soon as the job has ended in a state not asked for."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = None
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            # Ended otherwise: no point waiting (PREEMPTED may still be requeued).
            if state in FINAL_STATES and state != "PREEMPTED":
                break
            if time.monotonic() > deadline:
                break
            time.sleep(poll)
        info = " ".join(f"{k}={v}" for k, v in self.job_info(job_id).items())
        raise AssertionError(
            f"job {job_id}: state {state}, expected {sorted(wanted)} (timeout {timeout}s)\n{info}\n{self.log_tail()}"
        )

    def wait_done(self, job_id: str, timeout: float = 30) -> str:
        """Wait until the job has finished for good; returns its final state."""
        return self.wait_state(job_id, FINAL_STATES, timeout=timeout)

    # -- lifecycle ------------------------------------------------------------------------------------

    # -- nodes of a several-node cluster ---------------------------------------------------------------

    def node_pids(self, node: str) -> List[int]:
        """Every process in ``node``'s network namespace: its slurmd, job steps and tasks."""
        r = subprocess.run(["ip", "netns", "pids", node], check=True, capture_output=True, text=True, timeout=30)
        return [int(p) for p in r.stdout.split()]

    def kill_node(self, node: str) -> List[int]:
        """SIGKILL every process of ``node`` (as if it lost power); returns their PIDs."""
        pids = self.node_pids(node)
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        return pids

    def start_nodes(self, timeout: float = 60) -> None:
        """(Re)start the slurmd of every node that is not running (a node coming back), wait until idle."""
        r = subprocess.run(["bash", str(SCRIPT), "start", "--nodes", str(len(self.nodes)), str(self.state_dir)],
                           check=False, capture_output=True, text=True, timeout=timeout + 60,
                           env={**self.env, "POA_SLURM_START_TIMEOUT": str(int(timeout))}, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise SlurmStartError(f"local_cluster.sh start failed (rc={r.returncode}):\n{r.stdout}{r.stderr}")

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", *(f"slurmd-{n}.log" for n in self.nodes), "munged.log"):
            p = self.state_dir / name
            if p.exists():
                tail = p.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"----- {p} (tail) -----\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        subprocess.run(
            ["bash", str(SCRIPT), "stop", str(self.state_dir)], check=False, capture_output=True, text=True, timeout=120
        )


def start_local_slurm(
    state_dir: Union[str, os.PathLike],
    ctld_port: Optional[int] = None,
    slurmd_port: Optional[int] = None,
    timeout: float = 60,
    nodes: int = 1,
) -> SlurmCluster:
    """Start (or find running) the local cluster in `state_dir`; free ports unless given; ``nodes`` >= 2:
    that many namespaced nodes (slurm/local_cluster.sh start --nodes N).
    Raises SlurmUnavailable or SlurmStartError (message with the daemons' log tails)."""
    reason = unavailable_reason(nodes)
    if reason:
        raise SlurmUnavailable(reason)
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if ctld_port is None or slurmd_port is None:
        ctld_port, slurmd_port = _free_ports(2)
    env = {k: v for k, v in os.environ.items() if not _LEAKY_ENV.match(k)}
    if (os.cpu_count() or 1) < 2 and "POA_SLURM_CPUS" not in env:
        env["POA_SLURM_CPUS"] = "2"  # tests run 2-task jobs; oversubscribe a 1-CPU machine
    env.update(
        POA_SLURM_CTLD_PORT=str(ctld_port),
        POA_SLURM_D_PORT=str(slurmd_port),
        POA_SLURM_START_TIMEOUT=str(int(timeout)),
    )
    try:
        r = subprocess.run(
            ["bash", str(SCRIPT), "start", "--nodes", str(nodes), str(state_dir)],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout + 60,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        cluster = SlurmCluster(state_dir)
        cluster.stop()
        raise SlurmStartError(f"local_cluster.sh start timed out\n{e.stdout or ''}{e.stderr or ''}") from e
    names = tuple(f"poa-node{i:02d}" for i in range(1, nodes + 1)) if nodes >= 2 else ()
    cluster = SlurmCluster(state_dir, nodes=names)
    if r.returncode != 0:
        cluster.stop()
        raise SlurmStartError(f"local_cluster.sh start failed (rc={r.returncode}):\n{r.stdout}{r.stderr}")
    return cluster


def _state_dir(tmp_path_factory) -> Tuple[Path, bool]:
    """A state dir from tmp_path_factory, unless that path is too long for the unix sockets that
    munged and slurmstepd create in it (108 bytes with the file name): then a new /tmp dir, to be
    removed after the session (second value True)."""
    d = tmp_path_factory.mktemp("slurm")
    if len(str(d)) <= 60:
        return d, False
    return Path(tempfile.mkdtemp(prefix="poa-slurm-", dir="/tmp")), True


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: needs the local Slurm cluster of slurm/local_cluster.sh (skipped without Slurm)"
    )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-node cluster (partition `debug`) for the whole session; SLURM_CONF and PATH
    of this process point at it while the session lasts (submitit and subprocesses find it)."""
    yield from _cluster(tmp_path_factory, nodes=1)


@pytest.fixture(scope="module")
def slurm_nodes(tmp_path_factory):
    """A running three-node cluster (poa-node01 .. poa-node03, each in its own network and UTS namespace,
    at 10.233.0.11 .. .13) for the tests of one module, which run two-node jobs: the third node is where a
    job requeued after a node failure goes, as on a real cluster. SLURM_CONF and PATH point at it meanwhile.
    Several-node clusters use fixed names: one at a time on a machine."""
    yield from _cluster(tmp_path_factory, nodes=3)


def _cluster(tmp_path_factory, nodes: int):
    required = os.environ.get("POA_SLURM_REQUIRED", "") not in ("", "0")
    give_up = pytest.fail if required else pytest.skip
    reason = unavailable_reason(nodes)
    if reason:
        give_up(reason)
    state_dir, remove = _state_dir(tmp_path_factory)
    try:
        cluster = start_local_slurm(state_dir, nodes=nodes)
    except (SlurmUnavailable, SlurmStartError) as e:
        if remove:
            shutil.rmtree(state_dir, ignore_errors=True)
        give_up(f"local Slurm cluster did not start: {e}")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ.update({k: cluster.env[k] for k in saved})
    try:
        yield cluster
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        cluster.stop()
        if remove:
            shutil.rmtree(state_dir, ignore_errors=True)
