"""`poa submit` (submitit) and the sbatch scripts, run on a real single-node Slurm cluster.

Every job here is a real 2-task POA training run (CPU, gloo, `dist.engine=ddp`): the
process group comes from Slurm's variables, and the tests requeue, signal and cancel
the running job through Slurm itself (`scontrol requeue`, `scancel`).
The cluster is the session fixture `slurm_cluster` (tests/slurm_cluster.py).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from backbones import tiny
from poa_hpc.checkpoint.layout import load_checkpoint
from poa_hpc.cli import main

pytestmark = pytest.mark.slurm
pytest.importorskip("submitit")

REPO = Path(__file__).resolve().parents[1]
TINY = tiny("vit") + [
    "data.n_local=2",
    "optim.batch_size=8", "optim.iters_per_epoch=10", "optim.warmup_epochs=1",
    "loss.ibot_start_epoch=1", "loss.warmup_teacher_temp_epochs=1", "data.num_workers=0",
    "train.log_every=1", "dist.engine=ddp",
]
SUBMIT = ["submit", "--config", "configs/demo_cpu.yaml", "--gpus-per-node", "0", "--tasks-per-node", "2",
          "--cpus-per-task", "1", "--time", "15"]


@pytest.fixture(autouse=True)
def _one_thread_per_task(monkeypatch):
    # jobs inherit the submitter's environment: two 1-thread tasks on the 2-core node
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


def _metrics(out: Path) -> list:
    f = out / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []


def _submit(capsys, *args: str) -> str:
    assert main([*SUBMIT, *args]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    m = re.search(r"submitted Slurm job (\d+)", text)
    assert m, text
    return m.group(1)


def _wait_step(cluster, job: str, out: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in _metrics(out)):
            return
        state = cluster.job_state(job)
        if state not in (None, "PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job} is {state} before step {step}:\n{_logs(out, job)}")
        time.sleep(0.1)
    pytest.fail(f"job {job} did not reach step {step} in {timeout}s:\n{_logs(out, job)}\n{cluster.log_tail()}")


def _logs(out: Path, job: str) -> str:
    folder = out / "slurm" / job
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(folder.glob("*_log.*"))) if folder.exists() else "(no logs)"


def _assert_complete_run(out: Path, steps: int) -> dict:
    assert [r["step"] for r in _metrics(out)] == list(range(steps))  # each step once, none lost or repeated
    ckpt = load_checkpoint(out / "checkpoints")
    assert ckpt["step"] == steps and ckpt["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    return ckpt


def test_submit_trains_two_tasks_to_completion(slurm_cluster, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SUBMIT, "--partition", slurm_cluster.partition, "--wait", *TINY, "optim.epochs=2",
                 f"train.output_dir={out}"]) == 0
    text = capsys.readouterr().out
    job = re.search(r"submitted Slurm job (\d+)", text).group(1)
    assert "finished: step 20" in text
    _assert_complete_run(out, 20)
    logs = sorted(p.name for p in (out / "slurm" / job).glob("*_log.out"))
    assert logs == [f"{job}_0_log.out", f"{job}_1_log.out"]  # one log per task
    assert "2 ranks" in (out / "slurm" / job / f"{job}_0_log.err").read_text()  # one process group of 2
    assert (out / "submitted_config.yaml").exists() and (out / "config.yaml").exists()


def _running_job(cluster, capsys, tmp_path: Path, at_step: int = 8):
    """A 60-step 2-task run (no periodic checkpoint before the end), once it has logged ``at_step``."""
    out = tmp_path / "run"
    job = _submit(capsys, "--partition", cluster.partition, *TINY, "optim.epochs=6",
                  "train.checkpoint_every=1000", f"train.output_dir={out}")
    _wait_step(cluster, job, out, at_step)
    return job, out


def _assert_resumed_to_the_end(cluster, job: str, out: Path, signals: str) -> str:
    """The job ran a second time, resumed from the step the signal stopped it at, and finished."""
    assert cluster.wait_done(job, timeout=240) == "COMPLETED", _logs(out, job)
    assert cluster.job_info(job).get("Restarts") == "1"
    _assert_complete_run(out, 60)
    log0 = (out / "slurm" / job / f"{job}_0_log.err").read_text()
    stopped = re.search(rf"stopped by ({signals}) after step (\d+)", log0)
    resumed = re.search(r"resumed from .* at step (\d+)", log0)
    assert stopped and resumed, log0[-3000:]
    assert int(resumed.group(1)) == int(stopped.group(2)) + 1 >= 9  # nothing lost but the step in flight
    return log0


def test_scontrol_requeue_mid_run_resumes_from_the_checkpoint(slurm_cluster, tmp_path, capsys):
    job, out = _running_job(slurm_cluster, capsys, tmp_path)
    slurm_cluster.scontrol("requeue", job)  # SIGTERM to every task, then the job runs again
    _assert_resumed_to_the_end(slurm_cluster, job, out, "SIGTERM")


def test_time_limit_signal_checkpoints_and_requeues_itself(slurm_cluster, tmp_path, capsys):
    """USR2 (what --signal sends before the time limit): rank 0 requeues the job itself."""
    job, out = _running_job(slurm_cluster, capsys, tmp_path)
    slurm_cluster.scancel("--signal=USR2", job)  # to every task of the job's steps, as --signal=USR2@T
    log0 = _assert_resumed_to_the_end(slurm_cluster, job, out, "SIGUSR2")
    assert f"requeued Slurm job {job}" in log0


def test_real_time_limit_checkpoints_requeues_and_finishes_over_several_runs(slurm_cluster, tmp_path, capsys):
    """A run longer than its 3-minute limit: Slurm's USR2 (90 s before the limit; Slurm checks every 30 s, so
    60-90 s into each run) stops each run with a checkpoint, rank 0 requeues, and the job finishes after as many
    runs as it needs.  The warning is due a minute after the start, when the tasks exist: one due while the job
    is still starting reaches no task and Slurm does not repeat it (poa submit refuses such a --signal-delay)."""
    out = tmp_path / "run"
    # ~115 s of training at ~14 steps/s (2 ranks, idle 2-core machine): more than the at most 90 s before a
    # run's warning, so at least one requeue; on a loaded machine each run does less and more runs are needed.
    steps = 1600
    assert main([*SUBMIT, "--partition", slurm_cluster.partition, "--time", "3", "--signal-delay", "90",
                 *TINY, f"optim.epochs={steps // 10}", "train.checkpoint_every=100000", "train.log_every=10",
                 f"train.output_dir={out}"]) == 0
    job = re.search(r"submitted Slurm job (\d+)", capsys.readouterr().out).group(1)
    assert slurm_cluster.wait_done(job, timeout=900) == "COMPLETED", _logs(out, job)
    restarts = int(slurm_cluster.job_info(job).get("Restarts", "0"))
    log0 = (out / "slurm" / job / f"{job}_0_log.err").read_text()
    assert restarts >= 1, f"the run finished before Slurm's time-limit signal; make it longer\n{log0[-2000:]}"
    assert log0.count("stopped by SIGUSR2") == restarts and log0.count(f"requeued Slurm job {job}") == restarts
    ckpt = load_checkpoint(out / "checkpoints")
    assert ckpt["step"] == steps
    assert [r["step"] for r in _metrics(out)] == list(range(0, steps, 10)) + [steps - 1]


def test_preempted_by_a_higher_priority_job_then_resumes(slurm_cluster, tmp_path, capsys):
    """A job of the 'urgent' partition preempts the run (PreemptMode=REQUEUE): it checkpoints, waits, resumes."""
    job, out = _running_job(slurm_cluster, capsys, tmp_path)
    urgent_script = tmp_path / "urgent.sh"
    urgent_script.write_text("#!/bin/bash\nsleep 2\n")
    urgent = slurm_cluster.sbatch(urgent_script, f"--partition={slurm_cluster.preempt_partition}", "--ntasks=2",
                                  f"--output={tmp_path / 'urgent.txt'}")
    assert slurm_cluster.wait_done(urgent, timeout=60) == "COMPLETED"
    _assert_resumed_to_the_end(slurm_cluster, job, out, "SIGUSR2|SIGTERM")


def test_scancel_leaves_a_valid_checkpoint(slurm_cluster, tmp_path, capsys):
    job, out = _running_job(slurm_cluster, capsys, tmp_path, at_step=5)
    slurm_cluster.scancel(job)
    assert slurm_cluster.wait_done(job, timeout=60) == "CANCELLED"
    ckpt = load_checkpoint(out / "checkpoints")
    assert 5 < ckpt["step"] < 60
    assert [r["step"] for r in _metrics(out)] == list(range(ckpt["step"]))  # every logged step is in it
    assert not list((out / "checkpoints").glob("*.tmp"))
    # and it is usable: a sub-network extracts from it
    assert main(["extract", str(out / "checkpoints" / "last.pt"), "--width", "16", "--depth", "2",
                 "-o", str(tmp_path / "s.safetensors")]) == 0


@pytest.mark.parametrize("args, message", [
    (["--partition", "nosuch"], "invalid partition"),
    (["--cpus-per-task", "999"], "More processors requested than permitted"),
    (["--nodes", "2", "--tasks-per-node", "1"], "Node count specification invalid"),
])
def test_impossible_jobs_fail_with_slurms_message(slurm_cluster, tmp_path, capsys, args, message):
    t0 = time.monotonic()
    code = main([*SUBMIT, *args, *TINY, f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Slurm refused the job" in err and message.lower() in err.lower(), err
    assert "Traceback" not in err and time.monotonic() - t0 < 30


@pytest.mark.parametrize("args, message", [
    (["--time", "2", "--signal-delay", "90"], "--signal-delay 90: expected 1 to 60 seconds"),
    (["--time", "15", "--signal-delay", "0"], "--signal-delay 0: expected 1 to 840 seconds"),
    (["--time", "1:xx"], "--time: time limit '1:xx': expected minutes"),
    (["--max-restarts", "-1"], "--max-restarts must be >= 0"),
])
def test_submit_refuses_bad_arguments_before_calling_slurm(tmp_path, capsys, args, message):
    """No cluster needed: the arguments are checked before sbatch; one line naming the option, nothing written."""
    code = main([*SUBMIT, *args, *TINY, f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_sbatch_srun_script(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    job = _sbatch(slurm_cluster, "train_srun.sbatch", tmp_path, ["--ntasks-per-node=2", "--cpus-per-task=1"], out)
    assert slurm_cluster.wait_done(job, timeout=240) == "COMPLETED", (tmp_path / "job.out").read_text()
    _assert_complete_run(out, 20)


def test_sbatch_torchrun_script(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    job = _sbatch(slurm_cluster, "train_torchrun.sbatch", tmp_path, ["--cpus-per-task=2"], out)
    assert slurm_cluster.wait_done(job, timeout=240) == "COMPLETED", (tmp_path / "job.out").read_text()
    _assert_complete_run(out, 20)


def test_sbatch_torchrun_script_requeues_on_the_time_limit_signal(slurm_cluster, tmp_path):
    """USR2 to the batch shell (--signal=B:USR2@120): it requeues; torchrun's workers checkpoint on the SIGTERM."""
    out = tmp_path / "run"
    job = _sbatch(slurm_cluster, "train_torchrun.sbatch", tmp_path, ["--cpus-per-task=2"], out,
                  ["optim.epochs=6", "train.checkpoint_every=1000"])
    _wait_step(slurm_cluster, job, out, 8)
    slurm_cluster.scancel("--batch", "--signal=USR2", job)
    text = lambda: (tmp_path / "job.out").read_text()  # noqa: E731
    assert slurm_cluster.wait_done(job, timeout=240) == "COMPLETED", text()
    assert slurm_cluster.job_info(job).get("Restarts") == "1"
    _assert_complete_run(out, 60)
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", text())
    resumed = re.search(r"resumed from .* at step (\d+)", text())
    assert "requeueing job" in text() and stopped and resumed, text()[-3000:]
    assert int(resumed.group(1)) == int(stopped.group(1)) + 1


def _sbatch(cluster, script: str, tmp_path: Path, resources: list, out: Path, extra=("optim.epochs=2",)) -> str:
    """sbatch a repository script the way README shows, with CPU resources instead of GPUs (2 ranks)."""
    env = {**cluster.env, "POA_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "POA_PROCS_PER_NODE": "2"}
    r = cluster.run(
        "sbatch", "--parsable", "--partition", cluster.partition, "--gpus-per-node=0", *resources, "--time=15",
        f"--output={tmp_path / 'job.out'}", str(REPO / "slurm" / script),
        "configs/demo_cpu.yaml", *TINY, *extra, "train.progress=false", "train.device=cpu",
        f"train.output_dir={out}",
        env=env, cwd=REPO,
    )
    return r.stdout.strip().split(";")[0]
