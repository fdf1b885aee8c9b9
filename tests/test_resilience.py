"""What a long run survives, without Slurm: real processes, real file-system faults, real signals.

* a truncated newest checkpoint: the resume reports it and uses the previous one; the run
  finishes as an uninterrupted one (checkpoint history, keep_checkpoints / keep_every, --step);
* a full file system and a read-only checkpoint folder during a save (a tiny tmpfs filled up,
  a read-only bind mount): one-line error, exit code 4, the committed checkpoints intact;
* torchrun's --max-restarts: a worker SIGKILLed mid-run, the workers restart and resume;
* a rank stuck (SIGSTOP) while the others wait in a collective: they fail after dist.timeout_s;
* two Slurm-launched jobs on one node whose ids differ by 20000 (the modulus of the old
  job-id port): each gets its own master port.

The file-system tests mount file systems, which needs root (CAP_SYS_ADMIN); without it they skip
with the reason, and with POA_FAULT_TESTS_REQUIRED=1 (CI) they fail instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from poa_hpc.checkpoint.layout import load_checkpoint
from poa_hpc.cli import main
from reference_runs import RESTART_RUN, RESTART_STEPS
from reference_runs import assert_same_run as assert_same_reference_run
from test_train import DETERMINISTIC_ENV, LOSS_KEYS, TINY, metrics

FAULTS_REQUIRED = os.environ.get("POA_FAULT_TESTS_REQUIRED", "") not in ("", "0")
CLEAN_ENV = {k: v for k, v in DETERMINISTIC_ENV.items()
             if not re.match(r"^(SLURM_|SBATCH_|SRUN_|SUBMITIT_|TORCHELASTIC_|MASTER_(ADDR|PORT)$|"
                             r"(RANK|WORLD_SIZE|LOCAL_RANK)$)", k)}


def poa(*args, env=None, **popen):
    return subprocess.Popen([sys.executable, "-m", "poa_hpc", *args], stdout=popen.pop("stdout", subprocess.PIPE),
                            stderr=subprocess.STDOUT, text=True, env=env or CLEAN_ENV, **popen)


def train_args(out, *extra, nproc=1):
    args = ["train", "--config", "configs/demo_cpu.yaml", *TINY, "data.num_workers=0", f"train.output_dir={out}"]
    if nproc > 1:
        args[1:1] = ["--nproc", str(nproc)]
        args += ["dist.engine=ddp", f"optim.batch_size={16 // nproc}"]
    return args + list(extra)


def finish(p, timeout=600):
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def wait_logged(out: Path, step: int, p, timeout=300):
    deadline = time.time() + timeout
    f = out / "metrics.jsonl"
    while time.time() < deadline:
        if f.exists() and any(json.loads(ln)["step"] >= step for ln in f.read_text().splitlines() if ln.strip()):
            return
        if p.poll() is not None:
            pytest.fail(f"run ended before step {step}:\n" + (p.stdout.read() if p.stdout else ""))
        time.sleep(0.02)
    pytest.fail(f"step {step} not logged within {timeout}s")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_run(ref_dir: Path, got_dir: Path, steps: int):
    ref, got = metrics(ref_dir), metrics(got_dir)
    assert [r["step"] for r in got] == list(range(steps))  # every step exactly once
    for a, b in zip(ref, got):
        for k in LOSS_KEYS:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), (a["step"], k)
    ra, rb = load_checkpoint(ref_dir / "checkpoints"), load_checkpoint(got_dir / "checkpoints")
    assert ra["step"] == rb["step"] == steps
    for k, v in ra["model"].items():
        torch.testing.assert_close(rb["model"][k], v, rtol=1e-5, atol=1e-6)


def one_line_error(text: str) -> str:
    errors = [ln for ln in text.splitlines() if ln.startswith("poa train: error")]
    assert errors and "Traceback" not in text, text[-3000:]
    return errors[0]


# ------------------------------------------------------------------ history and fallback

@pytest.fixture
def one_thread():
    """Runs in this process: one thread, for bitwise-equal CPU arithmetic between them (see test_train)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, caplog, one_thread):
    caplog.set_level("INFO", logger="poa_hpc")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(train_args(ref, "train.checkpoint_every=100")) == 0
    keep = ["train.checkpoint_every=3", "train.keep_checkpoints=2", "train.keep_every=4"]
    assert main(train_args(cut, *keep, "train.max_steps=9")) == 0
    ckpts = cut / "checkpoints"
    # saved at 3, 4, 6, 8, 9: the newest two (8, 9) and every 4th (4, 8) are kept
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_00000004.pt", "step_00000008.pt", "step_00000009.pt"]
    # each kept step has its manifest (checkpoint/manifest.py), pruned with it
    assert sorted(p.name for p in ckpts.glob("step_*.manifest.json")) == [
        "step_00000004.manifest.json", "step_00000008.manifest.json", "step_00000009.manifest.json"]
    assert os.readlink(ckpts / "last.pt") == "step_00000009.pt"

    newest = ckpts / "step_00000009.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write of the newest
    caplog.clear()
    assert main(["train", "--resume", *train_args(cut, *keep)[1:]]) == 0
    log = caplog.text
    # the manifest's size check names the torn file before the engine tries to read it
    assert re.search(rf"cannot resume from the checkpoint of step 9: '{re.escape(str(newest))}' is \d+ bytes, its "
                     r"manifest 'step_00000009.manifest.json' says \d+; trying the previous one \(step 8\)", log), log
    assert re.search(r"resumed from .* at step 8 ", log), log
    assert_same_run(ref, cut, 12)  # metrics cut back to step 8, then steps 8-11 once more
    assert sorted(p.name for p in ckpts.glob("step_*.pt*")) == [
        "step_00000004.pt", "step_00000008.pt", "step_00000009.pt", "step_00000009.pt.unreadable", "step_00000012.pt"]
    assert os.readlink(ckpts / "last.pt") == "step_00000012.pt"

    # a kept step is what extract and eval read with --step
    capsys.readouterr()
    assert main(["extract", str(cut), "--step", "4", "--subnet", "16x2", "-o", str(tmp_path / "s4.safetensors")]) == 0
    from poa_hpc.models.extract import load_subnet

    assert load_subnet(tmp_path / "s4.safetensors")[1]["step"] == 4
    assert main(["extract", str(cut), "--step", "5", "--subnet", "16x2", "-o", str(tmp_path / "s5.safetensors")]) == 2
    assert "no checkpoint of step 5" in capsys.readouterr().err
    assert main(["eval", "knn", str(cut), "--step", "8", "--subnet", "16x2"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("vit_")]
    assert len(rows) == 1 and rows[0].startswith("vit_16x2@step8")

    # a fresh run (no --resume) in the same folder moves the old history aside instead of mixing with it
    caplog.clear()
    assert main(train_args(cut, *keep, "train.max_steps=1")) == 0
    assert [p.name for p in ckpts.glob("step_*.pt")] == ["step_00000001.pt"]
    (moved,) = ckpts.glob("replaced_*")
    assert (moved / "step_00000012.pt").is_file() and "moved to" in caplog.text


# ------------------------------------------------------------------ file-system faults

@pytest.fixture
def mount():
    """mount(args..., target): a real mount, undone at teardown; skips (fails under
    POA_FAULT_TESTS_REQUIRED) where mounting is not possible here."""
    give_up = pytest.fail if FAULTS_REQUIRED else pytest.skip
    done = []

    def _mount(*args):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            give_up("mounting a file system needs root and mount(8)")
        r = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
        if r.returncode != 0:
            give_up(f"mount {' '.join(map(str, args))} is not possible here: {r.stderr.strip()}")
        if str(args[-1]) not in done:
            done.append(str(args[-1]))

    yield _mount
    for target in reversed(done):
        if subprocess.run(["umount", target], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", target], capture_output=True)


def _committed(ckpts: Path) -> dict:
    return {p.name: sha(p) for p in ckpts.glob("step_*.pt")}


@pytest.mark.slow
def test_disk_full_during_a_save_stops_with_exit_code_4_and_keeps_the_checkpoints(tmp_path, mount):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", ckpts)
    p = poa(*train_args(out, "train.checkpoint_every=2", "optim.epochs=50"))
    wait_logged(out, 3, p)
    # Fill the file system: the next checkpoint finds no space left.
    with open(ckpts / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    before = _committed(ckpts)
    code, text = finish(p)
    assert code == 4, text
    line = one_line_error(text)
    assert "No space left on device" in line and f"to '{ckpts}'" in line and "intact" in line, line
    failed = int(re.search(r"checkpoint of step (\d+)", line).group(1))
    assert failed < 200 and f"step_{failed:08d}.pt" not in _committed(ckpts)
    for name, digest in before.items():  # what was committed is untouched and readable
        assert sha(ckpts / name) == digest
    assert all(load_checkpoint(ckpts / n)["step"] < failed for n in _committed(ckpts))
    assert load_checkpoint(out)["step"] == max(int(n[5:13]) for n in _committed(ckpts))  # last.pt
    assert not list(ckpts.glob("*.tmp")) and not list(ckpts.glob(".*.tmp"))
    assert [r["step"] for r in metrics(out)] == list(range(failed))


@pytest.mark.slow
def test_read_only_checkpoint_folder_mid_run_stops_all_ranks_with_exit_code_4(tmp_path, mount):
    """2 ranks, FSDP: every rank writes its shards; rank 0's failure is agreed on by all (no hang)."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    mount("--bind", ckpts, ckpts)
    p = poa(*train_args(out, "train.checkpoint_every=5", "optim.epochs=50", "dist.timeout_s=60", "dist.engine=fsdp",
                        nproc=2))
    wait_logged(out, 6, p)
    for _ in range(100):  # EBUSY while a checkpoint file is open for writing
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ckpts)], capture_output=True).returncode == 0:
            break
        time.sleep(0.05)
    else:
        pytest.fail("could not remount the checkpoint folder read-only")
    before = _committed(ckpts)
    t0 = time.monotonic()
    code, text = finish(p)
    assert code == 4, text
    assert time.monotonic() - t0 < 60  # no rank left waiting for the one that failed
    line = one_line_error(text)
    assert "Read-only file system" in line and f"to '{ckpts}'" in line and "intact" in line, line
    assert "error (rank 1)" in text  # the other rank stopped on the same error, not on a lost peer
    assert _committed(ckpts) == before and before
    for name in before:
        assert load_checkpoint(ckpts / name)["model"]


# ------------------------------------------------------------------ torchrun restarts, hangs

def _worker(tag: str, rank: int, restart: int = 0, timeout: float = 120) -> int:
    """PID of the training worker of ``rank`` (torchrun attempt ``restart``) among processes carrying ``tag``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
            except OSError:
                continue
            if (env.get("POA_TEST_TAG") == tag and env.get("RANK") == str(rank)
                    and env.get("TORCHELASTIC_RESTART_COUNT", "0") == str(restart)):
                return int(d.name)
        time.sleep(0.05)
    pytest.fail(f"no worker of rank {rank} (attempt {restart}) found")


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_after_a_killed_worker(tmp_path, ddp2_reference):
    out = tmp_path / "run"
    tag = f"restart-{os.getpid()}"
    p = poa("train", "--nproc", "2", "--max-restarts", "1", "--config", "configs/demo_cpu.yaml", *RESTART_RUN,
            f"train.output_dir={out}", env={**CLEAN_ENV, "POA_TEST_TAG": tag})
    wait_logged(out, 9, p)
    os.kill(_worker(tag, 1), signal.SIGKILL)  # as the OOM killer would
    code, text = finish(p)
    assert code == 0, text
    assert "torchrun restart 1: resuming from the newest checkpoint" in text
    resumed = int(re.search(r"resumed from .* at step (\d+) ", text).group(1))
    assert 8 <= resumed < RESTART_STEPS and resumed % 4 == 0
    assert_same_reference_run(ddp2_reference, out, RESTART_STEPS)


@pytest.mark.slow
def test_a_rank_stuck_outside_a_collective_ends_the_others_after_dist_timeout_s(tmp_path):
    out = tmp_path / "run"
    tag = f"hang-{os.getpid()}"
    log = tmp_path / "out.txt"
    with open(log, "w") as f:
        p = poa(*train_args(out, "optim.epochs=200", "train.checkpoint_every=1000", "dist.timeout_s=5", nproc=2),
                env={**CLEAN_ENV, "POA_TEST_TAG": tag}, stdout=f, start_new_session=True)
        try:
            wait_logged(out, 3, p)
            stuck = _worker(tag, 1)
            os.kill(stuck, signal.SIGSTOP)  # a rank that stops making progress (a hung GPU, a deadlock)
            t0 = time.monotonic()
            message = "a collective did not complete within dist.timeout_s"
            while message not in log.read_text() and time.monotonic() - t0 < 60:
                time.sleep(0.05)
            waited = time.monotonic() - t0
            os.kill(stuck, signal.SIGCONT)  # let it take torchrun's SIGTERM, so the launcher ends promptly
            code = p.wait(timeout=120)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    text = log.read_text()
    assert message in text, text[-3000:]
    assert 4 <= waited < 5 + 15, waited  # the timeout, not something else, ended the wait
    assert code == 1 and "Traceback" not in text, text[-3000:]
    assert re.search(r"poa train: error: rank \d \(pid \d+\) (exited with code|was killed)", text), text[-2000:]


# ------------------------------------------------------------------ master port

@pytest.mark.slow
def test_two_slurm_jobs_whose_ids_differ_by_20000_get_their_own_master_port(tmp_path):
    """The port used to be 20000 + job id % 20000: the stores of jobs 7 and 20007 on one node collided.

    Each job here is one srun task (the environment srun gives it) with a process group of its own;
    both run at the same time.  (A 2-task job's rank 1 finding the port is covered by every Slurm test.)
    """
    procs = []
    for job in ("7", "20007"):
        env = {**CLEAN_ENV, "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
               "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "localhost",
               "SLURM_NODELIST": "localhost"}
        procs.append((job, poa(*train_args(tmp_path / job, "dist.engine=ddp", "train.max_steps=3",
                                           "dist.timeout_s=60"), env=env)))
    ports = {}
    for job, p in procs:
        code, out = finish(p, timeout=300)
        assert code == 0, f"job {job}:\n{out[-3000:]}"
        m = re.search(r"process group: 1 ranks, master localhost:(\d+) \((\d+)\.0\.r0\)", out)
        assert m and m.group(2) == job, out[-2000:]
        ports[job] = int(m.group(1))
    assert ports["7"] != ports["20007"]
    for job in ports:
        assert load_checkpoint(tmp_path / job)["step"] == 3
        assert not list((tmp_path / job / "status").glob("rendezvous_*"))  # removed once everyone joined


# ------------------------------------------------------------------ the batch script's restart decisions

def test_restart_decisions_of_the_batch_script(tmp_path, monkeypatch, capsys):
    """What `python -m poa_hpc.launch.restarts end` makes of a step's end (the Slurm tests run the real
    requeues; here the decisions that need no cluster)."""
    from poa_hpc.launch import restarts
    from poa_hpc.launch.status import RankReport

    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    (tmp_path / "empty.conf").write_text("")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "empty.conf"))  # no cluster: scontrol requeue fails at once
    args = ["--run-dir", str(tmp_path), "--log", str(tmp_path / "%j_%t.log")]

    def step(code, *states, max_restarts=1):
        assert restarts.main(["start", *args, "--max-restarts", str(max_restarts)]) == 0
        for rank, (state, rc) in enumerate(states):
            RankReport(tmp_path, rank, "41").write(state, rc, f"rank {rank} said so")
        return restarts.main(["end", "--exit-code", str(code), *args, "--max-restarts", str(max_restarts)])

    killed = (("failed", 1), ("running", None))  # rank 1 killed, rank 0 lost it
    assert step(3, ("failed", 3), ("failed", 3)) == 3  # a NaN loss: a restart would diverge at the same step
    assert step(143, ("stopped", 143), ("stopped", 143)) == 143  # a stop on a signal: Slurm or rank 0 requeue
    assert step(134, ("completed", 0), ("completed", 0)) == 0  # all finished: teardown noise is not a failure
    assert step(137, *killed, max_restarts=0) == 137  # restarts off
    assert step(137, *killed) == 137  # 1st run without progress: requeue attempted (no cluster here)
    assert step(137, *killed) == 5  # 2nd: past --max-restarts 1
    err = capsys.readouterr().err
    assert "not restarting job 41: non-finite loss (exit code 3)" in err
    assert "Not restarting (--max-restarts 0)" in err and "could not requeue itself" in err
    assert re.search(r"gave up: 2 failed run\(s\) without a newer checkpoint \(--max-restarts 1; newest checkpoint: "
                     r"none\)\. Last error: rank 1 \(pid \d+ on \S+\) ended without a report .*Log: \S+/41_1\.log", err)
    state = json.loads((tmp_path / "status" / "restarts.json").read_text())
    assert [r["outcome"] for r in state["runs"]] == ["fatal", "stopped", "completed", "failed", "failed", "gave_up"]


def test_the_rank_to_blame_for_a_failed_step():
    """A rank that left no report (killed) before one that reported losing its peer, whatever order srun
    saw them end in; an error of its own before a lost peer; srun's order among equals."""
    from poa_hpc.launch.restarts import _failure

    def r(rank, state, message=""):
        return {"rank": rank, "state": state, "pid": 100 + rank, "host": "n1", "message": message}

    lost = "lost the connection to another rank (it probably died; see its log): Connection reset by peer"
    exited, killed = "Exited with exit code 1", "Killed"
    text, blame = _failure(137, [r(0, "failed", lost), r(1, "running")], [(0, exited), (1, killed)])
    assert blame == 1 and text.startswith("rank 1 (pid 101 on n1) ended without a report (srun: 'Killed';")
    text, blame = _failure(137, [r(0, "running"), r(1, "running")], [(1, killed), (0, killed)])
    assert blame == 1 and "rank 0 ended by srun after it" in text
    assert _failure(137, [r(0, "running"), r(1, "running")], [])[1] is None  # no srun lines: no guess
    text, blame = _failure(1, [r(0, "failed", lost), r(1, "failed", "RuntimeError: CUDA error")],
                           [(0, exited), (1, exited)])
    assert blame == 1 and text.startswith("rank 1 on n1: RuntimeError: CUDA error")
