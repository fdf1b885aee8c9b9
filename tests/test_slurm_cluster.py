"""Batch jobs, requeue, signals and submitit against a real single-node Slurm cluster.

The cluster comes from the session fixture `slurm_cluster` (tests/slurm_cluster.py, started with
slurm/local_cluster.sh); without Slurm installed these tests are skipped.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

try:
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - submitit is optional here
    submitit = None
    Checkpointable = object

pytestmark = pytest.mark.slurm

# The `slurm_cluster` fixture and the `slurm` marker (tests/slurm_cluster.py).

TESTS_DIR = Path(__file__).resolve().parent


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body.lstrip())
    path.chmod(0o755)
    return path


def _wait_file(path: Path, timeout: float = 30, cluster=None, job_id=None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            extra = f"\njob {job_id}: {cluster.job_info(job_id)}\n{cluster.log_tail()}" if cluster else ""
            raise AssertionError(f"{path} did not appear within {timeout}s{extra}")
        time.sleep(0.1)


def test_two_task_job(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    script = _script(
        tmp_path / "job.sh",
        """
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=2
srun bash -c 'echo "rank=$SLURM_PROCID local=$SLURM_LOCALID ntasks=$SLURM_NTASKS nodes=$SLURM_STEP_NODELIST"'
echo "master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
""",
    )
    job = slurm_cluster.sbatch(script, f"--output={out}", f"--partition={slurm_cluster.partition}")
    assert slurm_cluster.wait_state(job, "COMPLETED", timeout=30) == "COMPLETED"
    lines = out.read_text().splitlines()
    node = subprocess.run(["hostname", "-s"], check=True, capture_output=True, text=True).stdout.strip()
    ranks = sorted(line for line in lines if line.startswith("rank="))
    assert ranks == [
        f"rank=0 local=0 ntasks=2 nodes={node}",
        f"rank=1 local=1 ntasks=2 nodes={node}",
    ], lines
    assert f"master={node}" in lines


def test_requeue_runs_job_again(slurm_cluster, tmp_path):
    log, started = tmp_path / "runs.log", tmp_path / "started"
    script = _script(
        tmp_path / "job.sh",
        f"""
#SBATCH --ntasks=1
#SBATCH --open-mode=append
echo "start restart=${{SLURM_RESTART_COUNT:-0}}" >> {log}
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then
    trap 'echo "term restart=0" >> {log}; exit 0' TERM
    touch {started}
    while :; do sleep 0.1; done
fi
echo "done restart=$SLURM_RESTART_COUNT" >> {log}
""",
    )
    job = slurm_cluster.sbatch(script, f"--output={tmp_path / 'out.txt'}", "--requeue")
    _wait_file(started, cluster=slurm_cluster, job_id=job)
    slurm_cluster.scontrol("requeue", job)
    # A requeued job waits for its old credential to expire (AuthInfo cred_expire) before it starts again.
    slurm_cluster.wait_state(job, "COMPLETED", timeout=40)
    assert log.read_text().splitlines() == [
        "start restart=0",
        "term restart=0",
        "start restart=1",
        "done restart=1",
    ]
    assert slurm_cluster.job_info(job)["Restarts"] == "1"


def test_signals_reach_the_batch_script(slurm_cluster, tmp_path):
    started, usr1, term = tmp_path / "started", tmp_path / "usr1", tmp_path / "term"
    script = _script(
        tmp_path / "job.sh",
        f"""
#SBATCH --ntasks=1
trap 'touch {usr1}' USR1
# The TERM handler takes a while: KillWait (5 s) must leave it the time to finish.
trap 'sleep 1; echo trapped > {term}; exit 0' TERM
touch {started}
while :; do sleep 0.1; done
""",
    )
    job = slurm_cluster.sbatch(script, f"--output={tmp_path / 'out.txt'}")
    _wait_file(started, cluster=slurm_cluster, job_id=job)
    # --batch: only the batch shell gets the signal, and the job goes on.
    slurm_cluster.scancel("--batch", "--signal=USR1", job)
    _wait_file(usr1, timeout=10)
    assert slurm_cluster.job_state(job) == "RUNNING"
    slurm_cluster.scancel(job)
    slurm_cluster.wait_state(job, "CANCELLED", timeout=20)
    _wait_file(term, timeout=10)
    assert term.read_text() == "trapped\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--partition=nosuch"], "invalid partition"),
        (["--cpus-per-task=999"], "More processors requested than permitted"),
        (["--mem=10T"], "Requested node configuration is not available"),
        (["--nodes=2"], "Node count specification invalid"),
    ],
)
def test_impossible_jobs_are_refused_at_submission(slurm_cluster, tmp_path, args, message):
    script = _script(tmp_path / "job.sh", "true\n")
    t0 = time.monotonic()
    with pytest.raises(subprocess.CalledProcessError) as e:
        slurm_cluster.sbatch(script, f"--output={tmp_path / 'out.txt'}", *args)
    assert time.monotonic() - t0 < 10
    assert message.lower() in e.value.stderr.lower(), e.value.stderr
    assert "Batch job submission failed" in e.value.stderr or "error" in e.value.stderr


# -- submitit -------------------------------------------------------------------------------------------
# The job's python unpickles these by reference (module `test_slurm_cluster`): the jobs get the tests
# directory on PYTHONPATH through `slurm_setup`.


def _global_rank():
    return submitit.JobEnvironment().global_rank


class _Preemptible(Checkpointable):
    """Waits to be preempted on its first run; returns (rank, SLURM_RESTART_COUNT)."""

    def __init__(self, marker_dir: str):
        self.marker_dir = marker_dir

    def __call__(self):
        env = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts == 0:
            Path(self.marker_dir, f"started-{env.global_rank}").touch()
            # Preempted meanwhile. Short sleeps, like the steps of a training loop: a signal that lands
            # just before one long sleep() starts would only be handled when that sleep ends.
            for _ in range(1200):
                time.sleep(0.1)
        return env.global_rank, restarts

    def checkpoint(self, *args, **kwargs):
        Path(self.marker_dir, "checkpointed").touch()
        return super().checkpoint(*args, **kwargs)


def _executor(cluster, folder: Path, tasks: int):
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(
        nodes=1,
        tasks_per_node=tasks,
        cpus_per_task=1,
        timeout_min=5,
        slurm_partition=cluster.partition,
        slurm_setup=[f'export PYTHONPATH="{TESTS_DIR}${{PYTHONPATH:+:$PYTHONPATH}}"'],
    )
    return ex


def _wait_done(cluster, job, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"submitit job {job.job_id} not done after {timeout}s: {cluster.job_info(job.job_id)}\n"
                f"stdout: {job.stdout()}\nstderr: {job.stderr()}\n{cluster.log_tail()}"
            )
        time.sleep(0.2)


@pytest.mark.skipif(submitit is None, reason="submitit is not installed")
def test_submitit_two_tasks(slurm_cluster, tmp_path):
    job = _executor(slurm_cluster, tmp_path / "submitit", tasks=2).submit(_global_rank)
    _wait_done(slurm_cluster, job, timeout=60)
    assert sorted(job.results()) == [0, 1]
    # submitit polls `sacct` for the state; the cluster's stand-in answers without accounting storage
    # (the real sacct fails there, and submitit then reports UNKNOWN forever).
    deadline = time.monotonic() + 20
    while job.watcher.get_state(job.job_id, mode="force") != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job.watcher.get_state(job.job_id, mode="cache") == "COMPLETED"


@pytest.mark.skipif(submitit is None, reason="submitit is not installed")
def test_submitit_checkpoint_and_requeue_on_preemption(slurm_cluster, tmp_path):
    folder = tmp_path / "submitit"
    # timeout_min > 10: submitit counts a USR2 within the first min(80%, timeout - 10 min) of the
    # time limit as a preemption, later ones as a time-out (with timeout_min <= 10, always a time-out).
    ex = _executor(slurm_cluster, folder, tasks=2)
    ex.update_parameters(timeout_min=60)
    job = ex.submit(_Preemptible(str(tmp_path)))
    for rank in (0, 1):
        _wait_file(tmp_path / f"started-{rank}", timeout=60, cluster=slurm_cluster, job_id=job.job_id)
    # A job in the higher-priority partition preempts it: the tasks get submitit's USR2 at once
    # (preempt_send_user_signal), rank 0 calls checkpoint(), requeues the job and exits.
    urgent = slurm_cluster.sbatch(
        _script(tmp_path / "urgent.sh", "true\n"),
        f"--partition={slurm_cluster.preempt_partition}",
        "--ntasks=2",
        f"--output={tmp_path / 'urgent.txt'}",
    )
    slurm_cluster.wait_state(urgent, "COMPLETED", timeout=40)
    _wait_done(slurm_cluster, job, timeout=60)
    assert (tmp_path / "checkpointed").exists()
    assert "this job is preempted" in (folder / f"{job.job_id}_0_log.err").read_text()
    assert sorted(job.results()) == [(0, 1), (1, 1)]
    assert slurm_cluster.job_info(job.job_id)["Restarts"] == "1"
