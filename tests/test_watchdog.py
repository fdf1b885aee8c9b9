"""Collapse watchdog: the rule on hand-made records, the statistics by hand, real runs that do and do not collapse."""

import json
import logging
import math

import pytest
import torch

from poa_hpc.config import load_config
from poa_hpc.models.subnets import Subnet
from poa_hpc.train import trainer as trainer_mod
from poa_hpc.train.meta_arch import branch_logits
from poa_hpc.train.watchdog import CollapseWatchdog
from test_losses import sk_reference
from test_meta_arch import batch, floats, make, tiny_cfg
from test_train import TINY

KS = [32, 48]


def rec(step, ent_t, ent_s, spread=0.0):
    """A logged record with the given per-head teacher and student entropies."""
    r = {"step": step}
    for i, (t, s) in enumerate(zip(ent_t, ent_s)):
        r[f"collapse/teacher_entropy_h{i}"] = t
        r[f"collapse/student_entropy_h{i}"] = s
        r[f"collapse/logit_spread_h{i}"] = spread
    return r


UNIFORM = [math.log(k) for k in KS]
NEAR = [0.995 * math.log(k) for k in KS]  # within 1 % of ln K
INFORMATIVE = [0.9 * math.log(k) for k in KS]


def feed(wd, records):
    return [(r["step"], wd.update(r)) for r in records]


def test_fires_exactly_once_after_patience_collapsed_steps():
    wd = CollapseWatchdog(KS, tolerance=0.01, patience=3)
    out = feed(wd, [rec(s * 10, NEAR, UNIFORM) for s in range(8)])
    fired = [(step, msg) for step, msg in out if msg is not None]
    assert [step for step, _ in fired] == [20]  # the 3rd consecutive collapsed logged step
    msg = fired[0][1]
    assert "step 20" in msg and "head 0 (K=32)" in msg and "head 1 (K=48)" in msg
    assert f"{math.log(32):.4f}" in msg and f"{math.log(48):.4f}" in msg
    for cause in ("teacher temperature", "freeze_last_layer_epochs", "head.prototypes", "layerscale_init",
                  "base_lr"):
        assert cause in msg
    assert wd.collapsed and wd.fired_step == 20


def test_does_not_fire_when_one_head_or_one_branch_is_informative():
    one_head = CollapseWatchdog(KS, 0.01, 3)
    assert all(m is None for _, m in feed(one_head, [rec(s, [NEAR[0], INFORMATIVE[1]], UNIFORM) for s in range(10)]))
    student = CollapseWatchdog(KS, 0.01, 3)  # uniform teacher targets (e.g. early LayerScale) but a sharp student
    assert all(m is None for _, m in feed(student, [rec(s, UNIFORM, INFORMATIVE) for s in range(10)]))
    assert not one_head.collapsed and not student.collapsed
    # the tolerance is relative to ln K: 0.9 ln K is collapsed for tolerance 0.2
    loose = CollapseWatchdog(KS, 0.2, 3)
    assert [s for s, m in feed(loose, [rec(s, INFORMATIVE, INFORMATIVE) for s in range(5)]) if m] == [2]


def test_a_non_collapsed_step_resets_the_count():
    wd = CollapseWatchdog(KS, 0.01, 3)
    seq = [rec(0, NEAR, NEAR), rec(1, NEAR, NEAR), rec(2, INFORMATIVE, NEAR),  # reset at 2
           rec(3, NEAR, NEAR), rec(4, NEAR, NEAR), rec(5, NEAR, NEAR), rec(6, NEAR, NEAR)]
    assert [s for s, m in feed(wd, seq) if m] == [5]


def test_patience_zero_disables_and_state_round_trips():
    off = CollapseWatchdog(KS, 0.01, 0)
    assert all(m is None for _, m in feed(off, [rec(s, UNIFORM, UNIFORM) for s in range(30)]))
    wd = CollapseWatchdog(KS, 0.01, 4)
    feed(wd, [rec(s, NEAR, NEAR) for s in range(2)])
    resumed = CollapseWatchdog(KS, 0.01, 4)
    resumed.load_state_dict(json.loads(json.dumps(wd.state_dict())))  # checkpoints store it as JSON
    assert [s for s, m in feed(resumed, [rec(s, NEAR, NEAR) for s in range(2, 6)]) if m] == [3]
    again = CollapseWatchdog(KS, 0.01, 4)
    again.load_state_dict(resumed.state_dict())
    assert again.collapsed and all(m is None for _, m in feed(again, [rec(s, NEAR, NEAR) for s in range(6, 20)]))


def _entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_step_statistics_against_hand_computation():
    cfg = tiny_cfg()
    m = make(cfg)
    b = batch(masked=False)
    with torch.no_grad():  # the same forward the step runs (no drop-path, no masks without iBOT)
        teacher = branch_logits(m.teacher(b["global_crops"]))
        student = branch_logits(m.student(b["global_crops"], width=m.intact.width, depth=m.intact.depth))
    plain = floats(m.forward_backward(b, Subnet(16, 2), 0.04, ibot=False))
    assert not any(k.startswith("collapse/") for k in plain)
    m.zero_grad()
    out = floats(m.forward_backward(b, Subnet(16, 2), 0.04, ibot=False, stats=True))
    tau = cfg.loss.student_temp
    for i in range(len(cfg.head.prototypes)):
        targets = sk_reference(teacher[i]["global"].double().tolist(), 0.04, cfg.loss.sinkhorn_iters).tolist()
        rows = student[i]["global"].double().tolist()
        ent_t = sum(_entropy(p) for p in targets) / len(targets)
        ent_s = 0.0
        for r in rows:
            z = sum(math.exp(x / tau) for x in r)
            ent_s += _entropy([math.exp(x / tau) / z for x in r]) / len(rows)
        spread = sum(max(r) - min(r) for r in rows) / len(rows)
        assert out[f"collapse/teacher_entropy_h{i}"] == pytest.approx(ent_t, rel=1e-5)
        assert out[f"collapse/student_entropy_h{i}"] == pytest.approx(ent_s, rel=1e-5)
        assert out[f"collapse/logit_spread_h{i}"] == pytest.approx(spread, rel=1e-5)
        assert 0 < ent_s < math.log(cfg.head.prototypes[i])  # a fresh model is not uniform at student temp 0.1
    assert out["loss"] == pytest.approx(plain["loss"], rel=1e-6)  # the statistics change nothing


def _train(tmp_path, caplog, name, *extra):
    out = tmp_path / name
    cfg = load_config("configs/demo_cpu.yaml", TINY + [
        "optim.epochs=10", "data.num_workers=0", "train.collapse_patience=8", f"train.output_dir={out}", *extra])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="poa_hpc.train"):
        trainer_mod.train(cfg)
    warnings = [r.getMessage() for r in caplog.records if "looks collapsed" in r.getMessage()]
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return cfg, records, warnings


def _first_collapsed_window(records, ks, tol, patience):
    """Independent reading of the rule: the step ending the first run of `patience` collapsed records."""
    run = 0
    for r in records:
        ok = all(r[f"collapse/teacher_entropy_h{i}"] >= (1 - tol) * math.log(k)
                 and r[f"collapse/student_entropy_h{i}"] >= (1 - tol) * math.log(k) for i, k in enumerate(ks))
        run = run + 1 if ok else 0
        if run == patience:
            return r["step"]
    return None


def test_a_collapsing_run_warns_once_and_a_healthy_run_does_not(tmp_path, caplog):
    """Two real 40-step runs of the tiny model on digits.

    Collapsing: the first demo recipe (LayerScale 1e-5 keeps the [CLS] image-independent, so the teacher's
    targets are uniform from the start, and the student learns to match them), spelled out here so that the
    demo's own recipe can change.  Healthy: LayerScale 1, a sharper teacher (0.02) and a lower learning rate.
    """
    first_demo = ["model.vit.layerscale_init=1e-5", "loss.teacher_temp=0.07", "loss.warmup_teacher_temp=0.04",
                  "loss.warmup_teacher_temp_epochs=2", "data.n_local=4", "data.global_scale_min=0.32",
                  "data.local_scale_min=0.05", "data.local_scale_max=0.32"]
    cfg, bad, warnings = _train(tmp_path, caplog, "collapse", *first_demo)
    ks = cfg.head.prototypes
    fired = _first_collapsed_window(bad, ks, 0.01, 8)
    assert fired is not None and len(warnings) == 1, warnings
    assert f"at step {fired}:" in warnings[0]
    assert [r["collapsed"] for r in bad] == [int(r["step"] >= fired) for r in bad]
    last = bad[-1]
    mean_ln_k = sum(math.log(k) for k in ks) / len(ks)
    assert last["intact/dino"] == pytest.approx(mean_ln_k, rel=0.01)  # the symptom: DINO loss at ln K
    assert all(last[f"collapse/logit_spread_h{i}"] < 0.2 for i in range(len(ks)))

    cfg, good, warnings = _train(tmp_path, caplog, "healthy", *first_demo, "model.vit.layerscale_init=1.0",
                                 "loss.teacher_temp=0.02",
                                 "loss.warmup_teacher_temp=0.02", "optim.base_lr=0.0005")
    assert [r["step"] for r in good] == [r["step"] for r in bad]
    assert warnings == [] and all(r["collapsed"] == 0 for r in good)
    assert _first_collapsed_window(good, ks, 0.01, 8) is None
    last = good[-1]
    assert all(last[f"collapse/teacher_entropy_h{i}"] < 0.95 * math.log(k) for i, k in enumerate(ks))
    assert all(last[f"collapse/logit_spread_h{i}"] > 0.3 for i in range(len(ks)))
