"""The training loop: exact resume after SIGKILL, NaN handling, bad input, atomic checkpoints."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from backbones import tiny
from poa_hpc.checkpoint.layout import atomic_save, load_checkpoint
from poa_hpc.cli import main
from poa_hpc.config import load_config
from poa_hpc.train import trainer as trainer_mod

TINY = tiny("vit") + [
    "data.n_local=2",
    "optim.batch_size=16", "optim.iters_per_epoch=4", "optim.epochs=3", "optim.warmup_epochs=1",
    "loss.ibot_start_epoch=1", "loss.warmup_teacher_temp_epochs=1",
    "train.log_every=1", "train.progress=false",
]


# Bitwise-reproducible CPU arithmetic needs a fixed thread count: MKL's dynamic threading may
# use fewer threads under load, which changes reduction order (and KoLeo on the near-identical
# features of a fresh model amplifies the last bit).  One thread each also keeps runs independent.
DETERMINISTIC_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}


def run_cli(out_dir, *extra, resume=False, **popen):
    cmd = [sys.executable, "-m", "poa_hpc", "train", "--config", "configs/demo_cpu.yaml"]
    if resume:
        cmd.append("--resume")
    cmd += TINY + [f"train.output_dir={out_dir}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DETERMINISTIC_ENV,
                            **popen)


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


LOSS_KEYS = ("loss", "intact/dino", "intact/ibot", "elastic/dino", "elastic/same_view", "lr", "width", "depth",
             "grad_norm", "teacher_temp")


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    # 40 steps: the kill lands early (step 7) with a wide margin before the run would end.
    p = run_cli(ref_dir, "data.num_workers=1", "train.checkpoint_every=100", "optim.epochs=10")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    ref = metrics(ref_dir)
    assert [r["step"] for r in ref] == list(range(40))
    assert any("intact/ibot" in r for r in ref)  # iBOT switched on after epoch 1

    # Same run, checkpoint every 3 steps, killed with SIGKILL (whole process group, workers too)
    # once step 7 is logged: the last checkpoint is at step 6, steps 6-7 are lost work.
    p = run_cli(cut_dir, "data.num_workers=1", "train.checkpoint_every=3", "optim.epochs=10", start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        f = cut_dir / "metrics.jsonl"
        if f.exists() and any(json.loads(ln)["step"] >= 7 for ln in f.read_text().splitlines() if ln.strip()):
            break
        if p.poll() is not None:
            pytest.fail("run ended before it could be killed:\n" + p.stdout.read())
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    killed_at = load_checkpoint(cut_dir / "checkpoints")["step"]
    assert 6 <= killed_at < 40
    assert not list((cut_dir / "checkpoints").glob("*.tmp"))

    p = run_cli(cut_dir, "data.num_workers=1", "train.checkpoint_every=3", "optim.epochs=10", resume=True)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    got = metrics(cut_dir)
    assert [r["step"] for r in got] == list(range(40))  # no duplicated steps from the killed run
    for a, b in zip(ref, got):
        for k in LOSS_KEYS:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), (a["step"], k)
    ra, rb = load_checkpoint(ref_dir / "checkpoints"), load_checkpoint(cut_dir / "checkpoints")
    for k, v in ra["model"].items():
        torch.testing.assert_close(rb["model"][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_stop_signal_checkpoints_the_finished_step_then_resume_completes(tmp_path, sig):
    """SIGTERM (scancel) or SIGUSR2 (time-limit warning): finish the step, checkpoint it, exit 128+sig."""
    out = tmp_path / "run"
    p = run_cli(out, "data.num_workers=0", "train.checkpoint_every=1000", "optim.epochs=10")
    deadline = time.time() + 300
    while time.time() < deadline:
        f = out / "metrics.jsonl"
        if f.exists() and any(json.loads(ln)["step"] >= 3 for ln in f.read_text().splitlines() if ln.strip()):
            break
        if p.poll() is not None:
            pytest.fail("run ended before the signal:\n" + p.stdout.read())
        time.sleep(0.02)
    p.send_signal(sig)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, text
    assert f"stopped by {signal.Signals(sig).name}" in text
    saved = load_checkpoint(out / "checkpoints")["step"]
    logged = [r["step"] for r in metrics(out)]
    assert 3 < saved < 40 and logged == list(range(saved))  # the checkpoint holds every logged step
    p = run_cli(out, "data.num_workers=0", "train.checkpoint_every=1000", "optim.epochs=10", resume=True)
    text, _ = p.communicate(timeout=600)
    assert p.returncode == 0, text
    assert [r["step"] for r in metrics(out)] == list(range(40))


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "configs/demo_cpu.yaml", *TINY, f"train.output_dir={out}",
            "train.checkpoint_every=2", "data.num_workers=0"]
    real = trainer_mod.POA.forward_backward

    def poisoned(self, batch, sub, *a, **kw):
        terms = real(self, batch, sub, *a, **kw)
        if self._calls == 5:
            terms["loss"] = float("nan")
        self._calls += 1
        return terms

    monkeypatch.setattr(trainer_mod.POA, "_calls", 0, raising=False)
    monkeypatch.setattr(trainer_mod.POA, "forward_backward", poisoned)
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "not finite at step 5" in err and "last good checkpoint" in err
    ckpt = load_checkpoint(out / "checkpoints")
    assert ckpt["step"] == 4  # written after step 3; the step-5 failure wrote nothing
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3, 4]


def test_bad_data_root_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--config", "configs/demo_cpu.yaml", "data.dataset=imagefolder",
                 f"data.root={tmp_path / 'missing'}", f"train.output_dir={tmp_path / 'o'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "missing" in err


def test_unknown_override_is_a_clear_error(capsys):
    assert main(["train", "--config", "configs/demo_cpu.yaml", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_atomic_save_never_leaves_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    atomic_save({"model": {}, "config": {}, "v": 1}, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        atomic_save({"model": {}, "config": {}, "v": 2}, path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("loader", ["torch", "dali_cpu"])
def test_training_on_an_image_folder_with_bad_files(tmp_path, caplog, loader):
    """Real JPEGs in ImageNet layout, two of them broken: skipped, counted, reported, training goes on."""
    import numpy as np
    from PIL import Image

    if loader != "torch":
        pytest.importorskip("nvidia.dali")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        d = tmp_path / "data" / "train" / c
        d.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (24 + i, 30, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    (tmp_path / "data" / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    good = (tmp_path / "data" / "train" / "b" / "0.jpg").read_bytes()
    (tmp_path / "data" / "train" / "b" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    cfg = load_config("configs/demo_cpu.yaml", TINY + [
        "data.dataset=imagefolder", f"data.root={tmp_path / 'data'}", "optim.iters_per_epoch=0",
        "optim.batch_size=8", "optim.epochs=2", f"train.output_dir={tmp_path / 'run'}",
        f"data.loader={loader}", "data.num_workers=0" if loader == "torch" else "data.num_workers=1"])
    summary = trainer_mod.train(cfg)
    assert summary["step"] == 2 * (26 // 8)
    assert summary["skipped_images"] >= 1
    assert metrics(tmp_path / "run")[-1]["skipped_images"] == summary["skipped_images"]
    epoch_reports = [r.getMessage() for r in caplog.records if "unreadable images skipped" in r.getMessage()]
    assert epoch_reports and all(m.startswith("epoch ") for m in epoch_reports)


def test_resume_with_a_changed_model_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--config", "configs/demo_cpu.yaml", *TINY, f"train.output_dir={out}", "data.num_workers=0",
            "train.max_steps=2"]
    assert main(base) == 0
    assert main(base[:1] + ["--resume"] + base[1:] + ["model.vit.depth=5"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "model.vit.depth: 4 -> 5" in err
    (out / "checkpoints" / "last.pt").write_bytes(b"garbage")
    assert main(base[:1] + ["--resume"] + base[1:]) == 2
    # the manifest (checkpoint/manifest.py) names the file before torch.load would fail on it
    assert "step_00000002.pt' is 7 bytes, its manifest 'step_00000002.manifest.json' says" in capsys.readouterr().err


def test_eval_knn_cli_on_extracted_subnets(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "configs/demo_cpu.yaml", *TINY, f"train.output_dir={out}",
                 "data.num_workers=0", "train.max_steps=2"]) == 0
    assert main(["extract", str(out), "--subnet", "16x2", "--subnet", "32x4", "-o", str(tmp_path / "s")]) == 0
    files = sorted(str(p) for p in (tmp_path / "s").glob("*.safetensors"))
    capsys.readouterr()
    assert main(["eval", "knn", *files]) == 0
    table = capsys.readouterr().out
    rows = [ln for ln in table.splitlines() if ln.startswith("vit_")]
    assert len(rows) == 2 and "vit_16x2" in rows[0] and "vit_32x4" in rows[1]
    top1 = [float(r.split()[-1].rstrip("%")) for r in rows]
    assert all(0.0 <= t <= 100.0 for t in top1)
    assert main(["eval", "knn", str(tmp_path / "nope.safetensors")]) == 2
    # overrides written after the files are overrides, not files: k = 1 as knn_evaluate gives it
    from poa_hpc.eval.evaluate import knn_evaluate
    from poa_hpc.models.extract import load_subnet

    capsys.readouterr()
    assert main(["eval", "knn", *files, "eval.knn_k=1"]) == 0
    got = [float(ln.split()[-1].rstrip("%")) for ln in capsys.readouterr().out.splitlines() if ln.startswith("vit_")]
    loaded = [load_subnet(f) for f in files]
    cfg1 = load_config(None, ["eval.knn_k=1"], base=loaded[0][1]["config"])
    want = [r.top1 for r in knn_evaluate([(Path(f).stem, m) for f, (m, _) in zip(files, loaded)], cfg1)]
    assert got == pytest.approx(want, abs=0.006)  # printed with 2 decimals


def test_demo_command_end_to_end_short(tmp_path, capsys):
    """`poa demo` prints the raw-pixel reference, trains, extracts 3 sub-networks from the teacher, prints init vs
    trained k-NN, then sweeps every sub-network (k-NN + linear) into sweep.json/csv/png."""
    from poa_hpc.config import load_config
    from poa_hpc.eval.baseline import raw_pixel_knn

    overrides = [o for o in TINY if not o.startswith("optim.epochs")] + ["optim.epochs=1", "data.num_workers=0"]
    demo = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(demo), "--linear-epochs", "2", *overrides]) == 0
    out = capsys.readouterr().out
    assert "sub-networks at initialisation" in out and "after POA training" in out
    lines = [ln for ln in out.splitlines() if "at init ->" in ln]
    assert [ln.split(":")[0] for ln in lines] == ["vit_16x2", "vit_24x3", "vit_32x4"]
    assert len(list((demo / "subnets").glob("*.safetensors"))) == 3
    # the reference line carries the raw-pixel k-NN of the same (tiny, 16 px) evaluation data
    expected = raw_pixel_knn(load_config("configs/demo_cpu.yaml", overrides))
    assert f"raw pixels (centred): k-NN top-1 {expected:.2f}%" in out
    # the sweep: every sub-network of the tiny space (widths 16/24/32 x depths 2/3/4), files and plot path printed
    sweep = json.loads((demo / "sweep" / "sweep.json").read_text())
    assert sorted((r["width"], int(r["depth"])) for r in sweep["rows"]) == [(w, d) for w in (16, 24, 32) for d in (2, 3, 4)]
    assert all(r["knn_top1"] is not None and r["linear_top1"] is not None for r in sweep["rows"])
    assert sweep["provenance"]["linear"]["epochs"] == 2
    assert (demo / "sweep" / "sweep.csv").read_text().count("\n") == 10
    assert f"plot: {demo / 'sweep' / 'sweep.png'}" in out and (demo / "sweep" / "sweep.png").stat().st_size > 0
    # the summary's trained k-NN of the intact network is the sweep's
    intact = next(r for r in sweep["rows"] if r["name"] == "vit_32x4")
    assert f"-> {intact['knn_top1']:.2f}% trained" in lines[-1]


def test_phases_in_steps_and_the_step_hook(tmp_path):
    """Phase lengths given in steps reach the training loop: the hook sees every step once, after its update,
    with the step's lr and teacher temperature, iBOT from loss.ibot_start_step on, and the last head layer
    unchanged while its lr is held at 0."""
    from poa_hpc.config import load_config
    from poa_hpc.train.trainer import build_model, train

    cfg = load_config("configs/demo_cpu.yaml", [
        *TINY, "data.num_workers=0", "optim.epochs=2", f"train.output_dir={tmp_path / 'run'}",  # 8 steps, 4 per epoch
        "optim.warmup_steps=3", "optim.freeze_last_layer_steps=5", "loss.warmup_teacher_temp_steps=6",
        "loss.ibot_start_step=3", "optim.warmup_epochs=0", "loss.ibot_start_epoch=0",
        "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07", "optim.base_lr=0.004"])
    init = build_model(cfg).student.heads[0].last_layer.weight_v.detach().clone()
    seen = []

    def hook(step, model, record):
        seen.append((step, record, model.student.heads[0].last_layer.weight_v.detach().clone()))

    train(cfg, on_step=hook)
    assert [s for s, _, _ in seen] == list(range(8))
    peak = 0.004 * math.sqrt(16 / 1024)  # TINY: batch 16
    # warm-up over 3 steps: linspace(0, peak, 3); then a cosine from the peak
    assert [rec["lr"] for _, rec, _ in seen[:4]] == pytest.approx([0.0, peak / 2, peak, peak], rel=1e-12)
    # teacher temperature: linspace(0.04, 0.07, 6), then 0.07
    assert [rec["teacher_temp"] for _, rec, _ in seen] == pytest.approx(
        [0.04 + 0.03 * i / 5 for i in range(6)] + [0.07, 0.07], rel=1e-12)
    for step, rec, last_layer in seen:
        assert ("intact/ibot" in rec) == (step >= 3), step
        assert torch.equal(last_layer, init) == (step < 5), step  # frozen for steps 0..4, updated from step 5
