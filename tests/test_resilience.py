"""What a long run survives, without Slurm: real processes, real file-system faults.

* a truncated newest checkpoint: the resume reports it and uses the previous one; the run
  finishes as an uninterrupted one (checkpoint history, keep_checkpoints / keep_every, --step);
* a full file system and a read-only checkpoint folder during a save (a tiny tmpfs filled up,
  a read-only bind mount): one-line error, exit code 4, the committed checkpoints intact.

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

from poa_hpc.cli import main
from poa_hpc.train.checkpoint import load_checkpoint
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


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, caplog, one_thread):
    caplog.set_level("INFO", logger="poa_hpc")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(train_args(ref, "train.checkpoint_every=100")) == 0
    keep = ["train.checkpoint_every=3", "train.keep_checkpoints=2", "train.keep_every=4"]
    assert main(train_args(cut, *keep, "train.max_steps=9")) == 0
    ckpts = cut / "checkpoints"
    # saved at 3, 4, 6, 8, 9: the newest two (8, 9) and every 4th (4, 8) are kept
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004.pt", "step_00000008.pt", "step_00000009.pt"]
    assert os.readlink(ckpts / "last.pt") == "step_00000009.pt"

    newest = ckpts / "step_00000009.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write of the newest
    caplog.clear()
    assert main(["train", "--resume", *train_args(cut, *keep)[1:]]) == 0
    log = caplog.text
    assert re.search(rf"cannot resume from the checkpoint of step 9: '{re.escape(str(newest))}' could not be read "
                     r"\(.+\); trying the previous one \(step 8\)", log), log
    assert re.search(r"resumed from .* at step 8 ", log), log
    assert_same_run(ref, cut, 12)  # metrics cut back to step 8, then steps 8-11 once more
    assert sorted(p.name for p in ckpts.glob("step_*")) == [
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
    assert [p.name for p in ckpts.glob("step_*")] == ["step_00000001.pt"]
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
