"""The batch script's restart decisions (poa_hpc.launch.restarts) with no cluster: the count holds when
`scontrol requeue` ends the batch script at once (as slurmd does, and as a loaded machine makes
likely before anything after the requeue runs), reports arriving in any order or late from another
run change nothing, and every run entry of status/restarts.json ends with its real outcome.

`python -m poa_hpc.launch.restarts` runs as the real process the batch script runs; `scontrol` is a
stand-in on PATH that records the requeue and then SIGTERMs its caller, as Slurm does to every
process of a requeued job.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from poa_hpc.launch.status import RankReport, record_run_outcome

REPO = Path(__file__).resolve().parent.parent
JOB = "77"

FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "{log}"
kill -TERM $PPID   # slurmd signals every process of the requeued job, the batch script's included
sleep 5
"""


@pytest.fixture
def cluster(tmp_path):
    """(run_dir, env, requeue log): a stand-in `scontrol` that kills its caller on requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "requeues.log"
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL.format(log=log))
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID=JOB, SLURM_NTASKS="2", PYTHONPATH=str(REPO))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_dir, env, log


def batch(run_dir: Path, env: dict, phase: str, restart: int, code: int = 0, max_restarts: int = 1):
    """One call of the batch script's guard as run `restart` of the job; (exit code, stderr)."""
    args = [sys.executable, "-m", "poa_hpc.launch.restarts", phase, "--run-dir", str(run_dir),
            "--max-restarts", str(max_restarts), "--log", str(run_dir / "%j_%t.log")]
    if phase == "end":
        args += ["--exit-code", str(code)]
    p = subprocess.run(args, env={**env, "SLURM_RESTART_COUNT": str(restart)}, capture_output=True, text=True,
                       timeout=60)
    return p.returncode, p.stderr


def report(run_dir: Path, rank: int, state: str, code=None, message="", restart=0, job=JOB) -> None:
    r = RankReport(run_dir, rank, job)
    r.base["restart"] = restart
    r.write(state, code, message)


def state_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "status" / "restarts.json").read_text())


def killed_run(run_dir: Path, restart: int) -> None:
    """Rank 1 SIGKILLed before any checkpoint (its report still says running), rank 0 lost it."""
    report(run_dir, 0, "failed", 1, "lost the connection to another rank (it probably died; see its log): x",
           restart=restart)
    report(run_dir, 1, "running", restart=restart)


def test_max_restarts_1_holds_when_the_requeue_kills_the_batch_script_at_once(cluster):
    """The bug CI hit under load: the count was written after `scontrol requeue`, whose SIGTERM often came
    first, so the next run started from the old count and --max-restarts 1 allowed a 2nd restart."""
    run_dir, env, log = cluster
    for restart in (0, 1):
        assert batch(run_dir, env, "start", restart)[0] == 0
        killed_run(run_dir, restart)
        code, err = batch(run_dir, env, "end", restart, code=137)
        if restart == 0:
            assert code == -15, err  # killed by the stand-in's SIGTERM inside the requeue, as on a cluster
            assert "Requeuing; the next run resumes from none (1 of 1 restarts without progress)" in err
            s = state_of(run_dir)
            assert s["no_progress"] == 1 and [r["outcome"] for r in s["runs"]] == ["requeued"], s
    assert code == 5, err
    assert "gave up: 2 failed run(s) without a newer checkpoint (--max-restarts 1" in err
    assert log.read_text().split("\n")[:-1] == [f"requeue {JOB}"]  # one requeue, not two
    s = state_of(run_dir)
    assert [r["outcome"] for r in s["runs"]] == ["requeued", "gave_up"] and s["no_progress"] == 2


STALE = [  # reports that are not run 1's: a straggler of run 0, another job's leftover
    dict(rank=2, state="stopped", code=143, message="stopped by SIGTERM at step 4", restart=0),
    dict(rank=3, state="failed", code=2, message="config error: bad key", restart=1, job="12"),
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_the_decision_does_not_depend_on_the_order_reports_arrive_in_or_on_stale_reports(tmp_path, order,
                                                                                        monkeypatch, capsys):
    """Run 1's own reports (rank 0 lost its peer, rank 1 was killed) and two stale ones (a late 'stopped'
    from run 0 -- which, read as this run's, would end the job without a restart -- and another job's
    'bad input'), written in every order, some after `start` cleared the folder: run 1 is a failure of
    rank 1, counted and requeued."""
    from poa_hpc.launch import restarts

    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (tmp_path / "empty.conf").write_text("")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "empty.conf"))  # no cluster: the requeue itself fails
    own = [dict(rank=0, state="failed", code=1, restart=1,
                message="lost the connection to another rank (it probably died; see its log): x"),
           dict(rank=1, state="running", restart=1)]
    every = own + STALE
    early = [every[i] for i in order[:2]]  # left over before the run started
    for r in early:
        report(tmp_path, **r)
    assert restarts.main(["start", "--run-dir", str(tmp_path), "--max-restarts", "3"]) == 0
    for r in [every[i] for i in order[2:]] + [r for r in early if r in own]:  # late ones, and run 1's own
        report(tmp_path, **r)
    code = restarts.main(["end", "--exit-code", "137", "--run-dir", str(tmp_path), "--max-restarts", "3"])
    err = capsys.readouterr().err
    assert code == 137, err
    assert "Requeuing; the next run resumes from none (1 of 3 restarts without progress)" in err
    assert "rank 1 (pid" in err and "ended without a report" in err and "not restarting" not in err
    s = state_of(tmp_path)
    assert s["no_progress"] == 1 and s["runs"][-1]["outcome"] == "failed"  # (the stand-in-less requeue failed)


def test_every_run_entry_ends_with_its_real_outcome(cluster):
    """A time-limit stop (rank 0 records it, then requeues, which ends the batch script before `end`),
    a run lost without any verdict (counted), and the cap then applies at the next start."""
    run_dir, env, _ = cluster
    assert batch(run_dir, env, "start", 0, max_restarts=1)[0] == 0
    report(run_dir, 0, "stopped", 140, "stopped by SIGUSR2 at step 6; job requeued")
    record_run_outcome(run_dir, JOB, 0, "stopped", "stopped by SIGUSR2 at step 6")
    record_run_outcome(run_dir, JOB, 0, "completed")  # a closed run stays closed
    record_run_outcome(run_dir, "other", 0, "completed")  # and another job's call changes nothing
    assert state_of(run_dir)["runs"][0]["outcome"] == "stopped"
    # run 1: its batch script died with the job (no `end`, no report): lost, without progress
    assert batch(run_dir, env, "start", 1, max_restarts=1)[0] == 0
    assert batch(run_dir, env, "start", 2, max_restarts=1)[0] == 0
    s = state_of(run_dir)
    assert [r["outcome"] for r in s["runs"]] == ["stopped", "lost", "running"] and s["no_progress"] == 1
    # run 2 stopped too without its own record, but its ranks said so: closed as stopped from the reports
    report(run_dir, 0, "stopped", 143, "stopped by SIGTERM at step 6", restart=2)
    assert batch(run_dir, env, "start", 3, max_restarts=1)[0] == 0
    # run 3 lost again: 2 runs without progress > --max-restarts 1, the job ends at the next start
    code, err = batch(run_dir, env, "start", 4, max_restarts=1)
    assert code == 5 and "gave up: 2 failed run(s) without a newer checkpoint" in err, err
    s = state_of(run_dir)
    assert [r["outcome"] for r in s["runs"]] == ["stopped", "lost", "stopped", "lost"] and s["gave_up"]
