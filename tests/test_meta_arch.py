"""The tri-branch POA step: gradients, stop-gradients, shared parameters and the EMA."""

import copy

import pytest
import torch

from backbones import MODEL
from poa_hpc.config import load_config
from poa_hpc.models.elastic import block_ids
from poa_hpc.models.subnets import Subnet
from poa_hpc.train.meta_arch import POA


def tiny_cfg(*overrides):
    base = [
        *MODEL["vit"], "model.vit.drop_path_rate=0.0", "head.prototypes=[16,24]", "head.hidden_dim=24",
        "head.bottleneck_dim=8", "data.n_local=2", "optim.batch_size=4",
    ]
    return load_config(overrides=base + list(overrides))


def batch(B=4, n_local=2, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2 * B, 16, dtype=torch.bool)
    if masked:
        masks[0, :5] = True
        masks[3, 7:9] = True
    w = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    return {
        "global_crops": torch.randn(2 * B, 3, 16, 16, generator=g),
        "local_crops": torch.randn(n_local * B, 3, 8, 8, generator=g),
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().flatten(),
        "masks_weight": w,
    }


def floats(terms):
    """The step's loss terms (0-d device tensors) as floats."""
    return {k: float(v) for k, v in terms.items()}


def make(cfg, seed=0):
    torch.manual_seed(seed)
    m = POA(cfg)
    with torch.no_grad():  # move LayerScales away from 1e-5 so every block carries signal
        for n, p in m.student.named_parameters():
            if "gamma" in n:
                p.fill_(0.5)
    m.teacher.load_state_dict(m.student.state_dict())
    return m


def grads(m):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in m.student.named_parameters()}


def test_step_runs_and_only_student_gets_gradients():
    cfg = tiny_cfg()
    m = make(cfg)
    out = m.forward_backward(batch(), Subnet(16, 2), teacher_temp=0.04, ibot=True)
    for k in ("loss", "intact/dino", "intact/ibot", "intact/koleo", "elastic/dino", "elastic/same_view", "elastic/ibot"):
        assert k in out and out[k] == out[k], k
    assert all(p.grad is None for p in m.teacher.parameters())
    missing = [n for n, p in m.student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert m.student.backbone.mask_token.grad.abs().sum() > 0  # iBOT reaches the mask token


def test_total_loss_composition():
    """loss = lam*(D_i + iBOT_i) + (1-lam)*(D_e + iBOT_e) + 0.2*SV + 0.1*(K_i + K_e)/2."""
    cfg = tiny_cfg()
    m = make(cfg)
    o = floats(m.forward_backward(batch(), Subnet(24, 3), 0.04, ibot=True))
    lam = cfg.loss.lam
    expect = (lam * (o["intact/dino"] + o["intact/ibot"]) + (1 - lam) * (o["elastic/dino"] + o["elastic/ibot"])
              + 0.2 * o["elastic/same_view"] + 0.1 * (o["intact/koleo"] + o["elastic/koleo"]) / 2)
    assert o["loss"] == pytest.approx(expect, rel=1e-5)


def _only_elastic_dino(sub):
    """lam=0, no same-view, no KoLeo, no iBOT: the only gradient is the elastic branch's DINO loss."""
    cfg = tiny_cfg("loss.lam=0.0", "loss.same_view_weight=0.0", "loss.koleo_weight=0.0")
    m = make(cfg)
    m.forward_backward(batch(masked=False), sub, 0.04, ibot=False)
    return grads(m)


def test_elastic_gradient_lands_only_in_the_subnetwork():
    sub = Subnet(16, 2)
    g = _only_elastic_dino(sub)
    used = set(block_ids(4, 2))
    for i in range(4):
        qkv = g[f"backbone.blocks.{i}.attn.qkv.weight"].view(3, 32, 32)
        fc1 = g[f"backbone.blocks.{i}.mlp.fc1.weight"]
        if i in used:
            assert qkv[:, :16, :16].abs().sum() > 0
            assert qkv[:, 16:].abs().sum() == 0 and qkv[:, :, 16:].abs().sum() == 0
            assert fc1[:64, :16].abs().sum() > 0 and fc1[64:].abs().sum() == 0 and fc1[:, 16:].abs().sum() == 0
        else:
            assert qkv.abs().sum() == 0 and fc1.abs().sum() == 0
    assert g["backbone.norm.weight"][16:].abs().sum() == 0 and g["backbone.norm.weight"][:16].abs().sum() > 0
    head_fc = g["heads.0.mlp.0.weight"]
    assert head_fc[:, 16:].abs().sum() == 0 and head_fc[:, :16].abs().sum() > 0


def test_same_view_target_is_detached():
    """The same-view loss must not push gradients through the intact branch.

    With lam=1 the elastic branch contributes only through the same-view term.  Blocks the
    elastic sub-network skips get gradients only from the intact DINO loss, so they must be
    identical with and without the same-view term.
    """
    sub = Subnet(16, 2)
    skipped = sorted(set(range(4)) - set(block_ids(4, 2)))
    runs = []
    for w in ("0.0", "5.0"):
        cfg = tiny_cfg("loss.lam=1.0", f"loss.same_view_weight={w}", "loss.koleo_weight=0.0")
        m = make(cfg)
        m.forward_backward(batch(masked=False), sub, 0.04, ibot=False)
        runs.append(grads(m))
    for i in skipped:
        k = f"backbone.blocks.{i}.mlp.fc1.weight"
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=0)
    used = block_ids(4, 2)[0]
    k = f"backbone.blocks.{used}.mlp.fc1.weight"
    assert not torch.allclose(runs[0][k], runs[1][k])  # but the same-view term does train the elastic path


def test_teacher_targets_are_not_differentiated():
    cfg = tiny_cfg()
    m = make(cfg)
    from poa_hpc.train.meta_arch import StepInputs

    t = m.teacher_targets(StepInputs.from_batch(batch(), torch.device("cpu")), 0.04, True)
    assert not t[0]["cls"].requires_grad and not t[0]["patch"]().requires_grad
    assert t[0]["cls"].shape == (8, 16) and t[1]["cls"].shape == (8, 24)
    assert t[0]["patch"]().shape == (7, 16)


def test_ema_update_by_hand():
    cfg = tiny_cfg()
    m = make(cfg)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    t_before = copy.deepcopy(m.teacher.state_dict())
    s = m.student.state_dict()
    m.update_teacher(0.9)
    for k, v in m.teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * t_before[k] + 0.1 * s[k])


def test_heads_are_averaged_not_summed():
    """Duplicating a head (same prototype count, same weights) leaves the loss unchanged."""
    one = make(tiny_cfg("head.prototypes=[16]"))
    two = make(tiny_cfg("head.prototypes=[16,16]"))
    with torch.no_grad():
        two.student.heads[1].load_state_dict(two.student.heads[0].state_dict())
        one.student.heads[0].load_state_dict(two.student.heads[0].state_dict())
        one.student.backbone.load_state_dict(two.student.backbone.state_dict())
        one.teacher.load_state_dict(one.student.state_dict())
        two.teacher.load_state_dict(two.student.state_dict())
    a = floats(one.forward_backward(batch(), Subnet(16, 2), 0.04, ibot=True))
    b = floats(two.forward_backward(batch(), Subnet(16, 2), 0.04, ibot=True))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
