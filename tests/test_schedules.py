"""Schedules checked against formulas written out by hand (math.cos, not numpy)."""

import math

import numpy as np
import pytest

from poa_hpc.config import POAConfig
from poa_hpc.train.schedules import PhaseSteps, Schedules, build_schedules, phase_steps, scaled_lr

IPE = 10  # iterations per epoch


def make_cfg(**optim):
    cfg = POAConfig()
    o = cfg.optim
    o.epochs = 10
    o.batch_size = 64
    o.base_lr = 0.004
    o.lr_ref_batch = 1024
    o.min_lr = 1e-5
    o.warmup_epochs = 2
    o.weight_decay = 0.04
    o.weight_decay_end = 0.4
    o.momentum_teacher = 0.992
    o.final_momentum_teacher = 0.9999
    o.freeze_last_layer_epochs = 1
    o.schedule_fraction = 0.5
    cfg.loss.teacher_temp = 0.07
    cfg.loss.warmup_teacher_temp = 0.04
    cfg.loss.warmup_teacher_temp_epochs = 3
    for k, v in optim.items():
        setattr(o, k, v)
    return cfg


def hand_cos(base, final, i, n):
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / n))


# world_size=4, batch 64 -> global 256 -> peak = 0.004 * sqrt(256/1024) = 0.002
PEAK = 0.002


def test_lengths_and_types():
    s = build_schedules(make_cfg(), IPE, world_size=4)
    assert isinstance(s, Schedules)
    for name in ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr"):
        arr = getattr(s, name)
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float64
        assert arr.shape == (100,)
        assert np.all(np.isfinite(arr))
    assert s.total_iters == 100


def test_sqrt_batch_scaling():
    cfg = make_cfg()
    assert scaled_lr(cfg, 4) == pytest.approx(0.004 * 0.5, rel=1e-12)
    assert scaled_lr(cfg, 16) == pytest.approx(0.004, rel=1e-12)  # global 1024 = ref
    assert scaled_lr(cfg, 1) == pytest.approx(0.004 * math.sqrt(64 / 1024), rel=1e-12)
    cfg256 = make_cfg(batch_size=256)
    s = build_schedules(cfg256, IPE, world_size=1)
    assert s.lr[19] == pytest.approx(0.004 * 0.5, rel=1e-12)  # end of warm-up = peak
    assert s.lr.max() == pytest.approx(0.002, rel=1e-12)


def test_lr_warmup_and_span_cosine_by_hand():
    s = build_schedules(make_cfg(), IPE, world_size=4)
    W, span = 20, 200  # warmup 2 epochs; span = int(100 / 0.5)
    n_cos = span - W
    assert s.lr[0] == 0.0
    assert s.lr[10] == pytest.approx(PEAK * 10 / (W - 1), rel=1e-12)  # linspace(0, peak, W)
    assert s.lr[19] == pytest.approx(PEAK, rel=1e-12)
    assert s.lr[20] == pytest.approx(PEAK, rel=1e-12)  # cosine starts at base
    for i in (20, 37, 60, 99):
        assert s.lr[i] == pytest.approx(hand_cos(PEAK, 1e-5, i - W, n_cos), rel=1e-12), i
    # truncation: run stops ~44% of the way down the cosine, nowhere near min_lr
    assert s.lr[-1] > 0.5 * PEAK
    assert s.lr[-1] > 50 * 1e-5


def test_span_truncation_halfway():
    # no warm-up, s = 0.5: the last lr is the cosine at (almost) its midpoint
    s = build_schedules(make_cfg(warmup_epochs=0), IPE, world_size=4)
    assert s.lr[0] == pytest.approx(PEAK, rel=1e-12)
    assert s.lr[-1] == pytest.approx(hand_cos(PEAK, 1e-5, 99, 200), rel=1e-12)
    assert s.lr[-1] == pytest.approx((PEAK + 1e-5) / 2, rel=0.02)
    # s = 1: plain DINOv2 cosine, ending next to min_lr
    s1 = build_schedules(make_cfg(warmup_epochs=0, schedule_fraction=1.0), IPE, world_size=4)
    assert s1.lr[-1] == pytest.approx(hand_cos(PEAK, 1e-5, 99, 100), rel=1e-12)
    assert s1.lr[-1] < 2e-5
    assert s1.lr[50] == pytest.approx(hand_cos(PEAK, 1e-5, 50, 100), rel=1e-12)


def test_wd_and_momentum_by_hand():
    s = build_schedules(make_cfg(), IPE, world_size=4)
    for i in (0, 13, 50, 99):
        assert s.wd[i] == pytest.approx(hand_cos(0.04, 0.4, i, 200), rel=1e-12), i
        assert s.momentum[i] == pytest.approx(hand_cos(0.992, 0.9999, i, 200), rel=1e-12), i
    assert s.wd[0] == pytest.approx(0.04)  # no warm-up on wd
    assert s.momentum[0] == pytest.approx(0.992)
    assert s.wd[-1] < 0.4 and s.momentum[-1] < 0.9999  # cut before the end
    s1 = build_schedules(make_cfg(schedule_fraction=1.0), IPE, world_size=4)
    assert s1.momentum[-1] == pytest.approx(hand_cos(0.992, 0.9999, 99, 100), rel=1e-12)
    assert s1.momentum[-1] == pytest.approx(0.9999, abs=1e-5)
    assert s1.wd[-1] == pytest.approx(0.4, abs=1e-3)
    # past the end: final values (CosineScheduler.__getitem__)
    end = s1.at(100)
    assert end["momentum"] == 0.9999 and end["wd"] == 0.4 and end["lr"] == 1e-5


def test_teacher_temp_warmup_then_constant():
    s = build_schedules(make_cfg(), IPE, world_size=4)
    W = 30
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_temp[15] == pytest.approx(0.04 + (0.07 - 0.04) * 15 / (W - 1), rel=1e-12)
    assert s.teacher_temp[29] == pytest.approx(0.07)
    np.testing.assert_allclose(s.teacher_temp[30:], 0.07, rtol=0, atol=0)
    # not affected by the span trick
    s1 = build_schedules(make_cfg(schedule_fraction=1.0), IPE, world_size=4)
    np.testing.assert_array_equal(s.teacher_temp, s1.teacher_temp)


def test_last_layer_lr_frozen_first_epoch_then_lr():
    s = build_schedules(make_cfg(), IPE, world_size=4)
    np.testing.assert_array_equal(s.last_layer_lr[:IPE], 0.0)
    np.testing.assert_array_equal(s.last_layer_lr[IPE:], s.lr[IPE:])
    assert s.lr[IPE] > 0
    s0 = build_schedules(make_cfg(freeze_last_layer_epochs=0), IPE, world_size=4)
    np.testing.assert_array_equal(s0.last_layer_lr, s0.lr)


def test_at_returns_floats():
    s = build_schedules(make_cfg(), IPE, world_size=4)
    v = s.at(37)
    assert set(v) == {"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}
    assert all(type(x) is float for x in v.values())
    assert v["lr"] == s.lr[37] and v["wd"] == s.wd[37] and v["teacher_temp"] == s.teacher_temp[37]
    with pytest.raises(IndexError):
        s.at(-1)


def test_tiny_demo_warmup_longer_than_run():
    cfg = make_cfg(epochs=2, warmup_epochs=10, freeze_last_layer_epochs=5)
    cfg.loss.warmup_teacher_temp_epochs = 30
    s = build_schedules(cfg, 3, world_size=1)
    for name in ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr"):
        arr = getattr(s, name)
        assert arr.shape == (6,) and np.all(np.isfinite(arr)), name
    peak = 0.004 * math.sqrt(64 / 1024)
    assert s.lr[0] == 0.0
    assert np.all(np.diff(s.lr) > 0)  # still warming up, clipped to reach the peak
    assert s.lr[-1] == pytest.approx(peak, rel=1e-12)
    np.testing.assert_array_equal(s.last_layer_lr, 0.0)
    # teacher temp follows its own (longer) warm-up
    assert s.teacher_temp[5] == pytest.approx(0.04 + 0.03 * 5 / 89, rel=1e-12)
    # single-iteration run
    s1 = build_schedules(make_cfg(epochs=1, warmup_epochs=0, freeze_last_layer_epochs=0), 1)
    assert s1.lr.shape == (1,) and np.isfinite(s1.lr).all()


def test_bad_inputs():
    with pytest.raises(ValueError):
        build_schedules(make_cfg(), 0)


# ------------------------------------------------------------------ phases in steps
def test_step_keys_replace_epoch_keys_by_hand():
    """warmup 7, freeze 13, teacher-temperature warm-up 5 steps (epochs say 20, 10, 30)."""
    cfg = make_cfg(warmup_steps=7, freeze_last_layer_steps=13)
    cfg.loss.warmup_teacher_temp_steps = 5
    s = build_schedules(cfg, IPE, world_size=4)
    W, span = 7, 200
    assert s.lr[0] == 0.0
    for i in range(W):  # linspace(0, peak, 7)
        assert s.lr[i] == pytest.approx(PEAK * i / 6, rel=1e-12, abs=0), i
    for i in (7, 8, 50, 99):  # cosine over span - warm-up
        assert s.lr[i] == pytest.approx(hand_cos(PEAK, 1e-5, i - W, span - W), rel=1e-12), i
    np.testing.assert_array_equal(s.last_layer_lr[:13], 0.0)
    np.testing.assert_array_equal(s.last_layer_lr[13:], s.lr[13:])
    assert s.lr[12] > 0
    for i in range(5):  # linspace(0.04, 0.07, 5)
        assert s.teacher_temp[i] == pytest.approx(0.04 + 0.03 * i / 4, rel=1e-12), i
    np.testing.assert_array_equal(s.teacher_temp[5:], 0.07)
    # wd and momentum have no phase: unchanged
    ref = build_schedules(make_cfg(), IPE, world_size=4)
    np.testing.assert_array_equal(s.wd, ref.wd)
    np.testing.assert_array_equal(s.momentum, ref.momentum)


def test_step_keys_null_or_equal_keep_the_epoch_schedules():
    base = build_schedules(make_cfg(), IPE, world_size=4)
    cfg = make_cfg(warmup_steps=2 * IPE, freeze_last_layer_steps=1 * IPE)
    cfg.loss.warmup_teacher_temp_steps = 3 * IPE
    same = build_schedules(cfg, IPE, world_size=4)
    for name in ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr"):
        np.testing.assert_array_equal(getattr(same, name), getattr(base, name), err_msg=name)
    # zero steps: no warm-up, no freeze, no teacher-temperature warm-up
    cfg0 = make_cfg(warmup_steps=0, freeze_last_layer_steps=0)
    cfg0.loss.warmup_teacher_temp_steps = 0
    s0 = build_schedules(cfg0, IPE, world_size=4)
    assert s0.lr[0] == pytest.approx(PEAK, rel=1e-12)
    np.testing.assert_array_equal(s0.last_layer_lr, s0.lr)
    np.testing.assert_array_equal(s0.teacher_temp, 0.07)


def test_phase_steps():
    cfg = make_cfg()
    cfg.loss.ibot_start_epoch = 4
    assert phase_steps(cfg, IPE) == PhaseSteps(warmup=20, freeze_last_layer=10, warmup_teacher_temp=30, ibot_start=40)
    cfg.loss.ibot_start_step = 33
    cfg.optim.warmup_steps = 0
    assert phase_steps(cfg, IPE) == PhaseSteps(warmup=0, freeze_last_layer=10, warmup_teacher_temp=30, ibot_start=33)
    # the demo: 22 iterations per epoch
    assert phase_steps(make_cfg(), 22).warmup == 44


def test_phase_longer_than_run_is_clipped():
    cfg = make_cfg(epochs=1, warmup_steps=25, freeze_last_layer_steps=40)
    s = build_schedules(cfg, IPE, world_size=4)
    assert s.lr.shape == (10,)
    assert s.lr[9] == pytest.approx(PEAK, rel=1e-12)  # the warm-up reaches the peak on the last step
    np.testing.assert_array_equal(s.last_layer_lr, 0.0)
