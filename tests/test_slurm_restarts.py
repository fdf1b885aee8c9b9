"""Restart after a failed step, on a real single-node Slurm cluster (2-task CPU jobs, gloo, ddp).

* one task's process SIGKILLed mid-run (as the OOM killer would), under `poa submit` and under
  `slurm/train_srun.sbatch`: `srun --kill-on-bad-exit=1` ends the step, the batch script requeues
  the job, the next run resumes from the newest checkpoint, and the finished run equals an
  uninterrupted one (every step logged once, same losses, same weights);
* a task killed at every start, before any checkpoint: the job gives up after `--max-restarts`
  failed runs without progress, with a message naming the last error and the log (exit code 5).

Every test here runs under `cpu_load` (tests/conftest.py: a spinning process pinned to each core):
the restart cap once held only on an idle machine (the count was written after `scontrol requeue`,
whose SIGTERM to the batch script then often came first).

The cluster is the session fixture `slurm_cluster` (tests/slurm_cluster.py); the uninterrupted run
is `ddp2_reference` (tests/reference_runs.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from poa_hpc.cli import main
from reference_runs import RESTART_RUN, RESTART_STEPS, TINY2, assert_same_run
from test_slurm_launch import SUBMIT, TINY, _logs, _sbatch, _wait_step

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("cpu_load")]
pytest.importorskip("submitit")


@pytest.fixture(autouse=True)
def _one_thread_per_task(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # jobs inherit the submitter's environment
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


assert TINY == TINY2  # the sbatch helper's tiny model is the reference run's


def _report(out: Path, rank: int) -> dict:
    try:
        return json.loads((out / "status" / f"rank_{rank:05d}.json").read_text())
    except (OSError, ValueError):
        return {}


def _kill_rank(out: Path, rank: int = 1, restart: int = 0) -> int:
    """SIGKILL the training process of ``rank`` in run ``restart`` of the job (its pid from its report)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = _report(out, rank)
        if r.get("restart") == restart and r.get("state") == "running":
            os.kill(r["pid"], signal.SIGKILL)
            return r["pid"]
        time.sleep(0.05)
    pytest.fail(f"no running rank {rank} in run {restart}: {_report(out, rank)}")


def _submit(capsys, *args: str) -> str:
    assert main([*SUBMIT, *args]) == 0, capsys.readouterr().err
    return re.search(r"submitted Slurm job (\d+)", capsys.readouterr().out).group(1)


def _assert_restarted_once_and_equal(cluster, job, out: Path, log: str, pid: int, reference: Path) -> None:
    assert cluster.job_info(job).get("Restarts") == "1", log[-3000:]
    assert re.search(rf"poa: run 0 of job {job} failed: rank 1 \(pid {pid} on \S+\) ended without a report", log), \
        log[-3000:]
    requeued = re.search(r"Requeuing; the next run resumes from step (\d+) \(made progress\)", log)
    resumed = re.search(r"resumed from .* at step (\d+)", log)
    assert requeued and resumed and requeued.group(1) == resumed.group(1), log[-3000:]
    assert 8 <= int(resumed.group(1)) < RESTART_STEPS
    assert_same_run(reference, out, RESTART_STEPS)
    state = json.loads((out / "status" / "restarts.json").read_text())
    assert [r["outcome"] for r in state["runs"]] == ["requeued", "completed"] and state["no_progress"] == 0


def test_submit_restarts_the_job_after_a_task_is_killed(slurm_cluster, ddp2_reference, tmp_path, capsys):
    out = tmp_path / "run"
    job = _submit(capsys, "--partition", slurm_cluster.partition, "--max-restarts", "2", *RESTART_RUN,
                  f"train.output_dir={out}")
    _wait_step(slurm_cluster, job, out, 9)
    pid = _kill_rank(out)
    assert slurm_cluster.wait_done(job, timeout=300) == "COMPLETED", _logs(out, job)
    log = (out / "slurm" / job / f"{job}_0_log.err").read_text()  # the batch script's and rank 0's stderr
    assert str(out / "slurm" / job / f"{job}_1_log.err") in log  # the killed rank's log is named
    _assert_restarted_once_and_equal(slurm_cluster, job, out, log, pid, ddp2_reference)


def test_sbatch_srun_script_restarts_the_job_after_a_task_is_killed(slurm_cluster, ddp2_reference, tmp_path):
    out = tmp_path / "run"
    job = _sbatch(slurm_cluster, "train_srun.sbatch", tmp_path, ["--ntasks-per-node=2", "--cpus-per-task=1"], out,
                  RESTART_RUN[len(TINY2):])  # (_sbatch adds the tiny model of TINY2 itself)
    _wait_step(slurm_cluster, job, out, 9)
    pid = _kill_rank(out)
    text = lambda: (tmp_path / "job.out").read_text()  # noqa: E731
    assert slurm_cluster.wait_done(job, timeout=300) == "COMPLETED", text()[-3000:]
    _assert_restarted_once_and_equal(slurm_cluster, job, out, text(), pid, ddp2_reference)


def test_a_task_that_dies_at_every_start_ends_the_job_after_max_restarts(slurm_cluster, tmp_path, capsys):
    out = tmp_path / "run"
    job = _submit(capsys, "--partition", slurm_cluster.partition, "--max-restarts", "1", *RESTART_RUN,
                  "optim.epochs=100", "train.checkpoint_every=100000", f"train.output_dir={out}")
    killed = []
    deadline = time.monotonic() + 300
    while slurm_cluster.job_state(job) not in ("FAILED", "COMPLETED", "CANCELLED") and time.monotonic() < deadline:
        r = _report(out, 1)  # each run's rank 1, as soon as it starts (before any checkpoint)
        if r.get("state") == "running" and r.get("restart") not in [k[0] for k in killed]:
            os.kill(r["pid"], signal.SIGKILL)
            killed.append((r["restart"], r["pid"]))
        time.sleep(0.05)
    info = slurm_cluster.job_info(job)
    log = (out / "slurm" / job / f"{job}_0_log.err").read_text()
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "5:0", (info, log[-3000:])
    assert info.get("Restarts") == "1" and [k[0] for k in killed] == [0, 1], (info, killed)
    assert "1 of 1 restarts without progress" in log  # the first failed run counted, the job requeued
    gave_up = re.search(r"poa: job \d+ gave up: 2 failed run\(s\) without a newer checkpoint \(--max-restarts 1; "
                        r"newest checkpoint: none\)\. Last error: (.*)\. Log: (\S+)$", log, re.M)
    assert gave_up, log[-3000:]
    assert f"rank 1 (pid {killed[-1][1]} on " in gave_up.group(1) and Path(gave_up.group(2)).is_file()
    state = json.loads((out / "status" / "restarts.json").read_text())
    assert state["no_progress"] == 2 and state["gave_up"] and state["runs"][-1]["outcome"] == "gave_up"


def test_bad_input_ends_the_job_without_a_requeue(slurm_cluster, tmp_path, capsys):
    """A config that is only refused when training starts (train.checkpoint_every=0): every rank exits with
    code 2, and the batch script ends the job with it -- no requeue, although --max-restarts allows two."""
    out = tmp_path / "run"
    job = _submit(capsys, "--partition", slurm_cluster.partition, "--max-restarts", "2", *RESTART_RUN,
                  "train.checkpoint_every=0", f"train.output_dir={out}")
    assert slurm_cluster.wait_done(job, timeout=300) == "FAILED", _logs(out, job)
    info = slurm_cluster.job_info(job)
    log = (out / "slurm" / job / f"{job}_0_log.err").read_text()
    assert info.get("ExitCode") == "2:0" and info.get("Restarts") == "0", (info, log[-3000:])
    assert re.search(rf"poa: not restarting job {job}: bad input .*\(exit code 2\).*train\.checkpoint_every", log), \
        log[-3000:]
    assert "Traceback" not in log
    state = json.loads((out / "status" / "restarts.json").read_text())
    assert [r["outcome"] for r in state["runs"]] == ["fatal"] and state["no_progress"] == 0
