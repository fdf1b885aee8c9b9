"""Parameter groups, schedule application and grad clipping on a tiny fake student."""

import pytest
import torch
from torch import nn

from poa_hpc.config import POAConfig
from poa_hpc.distributed.engines import clip_grad_norm_tensor
from poa_hpc.train.optim import ParamRules, apply_schedules, build_optimizer, param_groups

D = 8


class _Gamma(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(D))


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(D)
        self.attn = _Attn()
        self.ls1 = _Gamma()
        self.norm2 = nn.LayerNorm(D)
        self.mlp = _Mlp()
        self.ls2 = _Gamma()


class _PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, D, 2, 2)


class _Backbone(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.patch_embed = _PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, D))
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        self.blocks = nn.ModuleList([_Block() for _ in range(depth)])
        self.norm = nn.LayerNorm(D)


class _Head(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.last_layer = nn.Linear(D, k, bias=False)


class _Student(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.backbone = _Backbone(depth)
        self.heads = nn.ModuleList([_Head(6), _Head(7)])


def make_cfg():
    cfg = POAConfig()
    cfg.model.vit.depth = 2  # the fake student's blocks
    cfg.optim.layer_decay = 0.5
    cfg.optim.patch_embed_lr_mult = 0.2
    cfg.optim.beta1 = 0.8
    cfg.optim.beta2 = 0.95
    return cfg


def expected(name):
    """(lr_multiplier, wd_multiplier, is_last_layer) written out by hand for num_layers=2, decay 0.5."""
    pe = 0.5**3 * 0.2
    table = {
        "backbone.patch_embed.proj.weight": (pe, 1.0, False),
        "backbone.patch_embed.proj.bias": (pe, 0.0, False),
        "backbone.cls_token": (0.125, 1.0, False),
        "backbone.pos_embed": (0.125, 1.0, False),
        "backbone.mask_token": (0.125, 1.0, False),
        "backbone.norm.weight": (1.0, 0.0, False),
        "backbone.norm.bias": (1.0, 0.0, False),
    }
    if name in table:
        return table[name]
    if name.startswith("backbone.blocks."):
        i = int(name.split(".")[2])
        lr = {0: 0.25, 1: 0.5}[i]
        no_wd = name.endswith(".bias") or ".norm1." in name or ".norm2." in name or name.endswith(".gamma")
        return (lr, 0.0 if no_wd else 1.0, False)
    if name.startswith("heads."):
        if name.endswith("last_layer.weight"):
            return (1.0, 1.0, True)
        return (1.0, 0.0 if name.endswith(".bias") else 1.0, False)
    raise AssertionError(name)


def by_name(groups):
    out = {}
    for g in groups:
        for n, p in zip(g["names"], g["params"]):
            assert n not in out
            out[n] = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"], p)
    return out


def test_names_match_model_layout():
    names = {n for n, _ in _Student().named_parameters()}
    for n in (
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.1.attn.qkv.bias",
        "backbone.blocks.0.ls1.gamma",
        "backbone.blocks.0.mlp.fc2.weight",
        "backbone.norm.bias",
        "heads.1.mlp.2.weight",
        "heads.0.last_layer.weight",
    ):
        assert n in names


def test_multipliers_by_hand():
    m = _Student()
    groups = param_groups(m.named_parameters(), make_cfg())
    got = by_name(groups)
    all_names = [n for n, _ in m.named_parameters()]
    assert sorted(got) == sorted(all_names)
    for n in all_names:
        lr, wd, last = expected(n)
        assert got[n][0] == pytest.approx(lr, rel=1e-12), n
        assert got[n][1] == wd, n
        assert got[n][2] is last, n
    # spot checks spelled out
    assert got["backbone.patch_embed.proj.weight"][0] == pytest.approx(0.5**3 * 0.2)
    assert got["backbone.blocks.0.attn.qkv.weight"][0] == pytest.approx(0.5**2)
    assert got["backbone.blocks.1.mlp.fc1.weight"][0] == pytest.approx(0.5)
    assert got["heads.0.mlp.0.weight"][0] == 1.0
    assert got["backbone.cls_token"][1] == 1.0 and got["backbone.pos_embed"][1] == 1.0
    assert got["backbone.blocks.1.ls2.gamma"][1] == 0.0


def test_groups_fused():
    m = _Student()
    groups = param_groups(m.named_parameters(), make_cfg())
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    # patch w, patch b, tokens, blk0 w/no-wd, blk1 w/no-wd, norm+head biases, head weights, last layer
    assert len(groups) == 10
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    last = [g for g in groups if g["is_last_layer"]]
    assert len(last) == 1 and len(last[0]["params"]) == 2  # both heads' prototype layers fused


def test_frozen_param_excluded():
    m = _Student()
    m.backbone.mask_token.requires_grad_(False)
    groups = param_groups(m.named_parameters(), make_cfg())
    got = by_name(groups)
    assert "backbone.mask_token" not in got
    assert all(p is not m.backbone.mask_token for g in groups for p in g["params"])
    assert len(got) == len(list(m.parameters())) - 1


def test_block_index_out_of_range():
    rules = ParamRules(make_cfg())
    with pytest.raises(ValueError):
        rules.layer_id("backbone.blocks.2.attn.qkv.weight")
    assert rules.layer_id("heads.0.mlp.0.weight") == 3
    assert rules.layer_id("_orig_mod.backbone.blocks.1.norm1.weight") == 2


def test_build_optimizer_and_apply_schedules():
    m = _Student()
    cfg = make_cfg()
    opt = build_optimizer(m.named_parameters(), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.8, 0.95) for g in opt.param_groups)

    apply_schedules(opt, lr=0.1, wd=0.05, last_layer_lr=0.3)
    for g in opt.param_groups:
        base = 0.3 if g["is_last_layer"] else 0.1
        assert g["lr"] == pytest.approx(base * g["lr_multiplier"], rel=1e-12)
        assert g["weight_decay"] == pytest.approx(0.05 * g["wd_multiplier"], rel=1e-12)
    g_pe = next(g for g in opt.param_groups if any(p is m.backbone.patch_embed.proj.weight for p in g["params"]))
    assert g_pe["lr"] == pytest.approx(0.1 * 0.5**3 * 0.2) and g_pe["weight_decay"] == pytest.approx(0.05)
    g_last = next(g for g in opt.param_groups if g["is_last_layer"])
    assert g_last["lr"] == pytest.approx(0.3) and g_last["weight_decay"] == pytest.approx(0.05)
    g_norm = next(g for g in opt.param_groups if any(p is m.backbone.norm.weight for p in g["params"]))
    assert g_norm["lr"] == pytest.approx(0.1) and g_norm["weight_decay"] == 0.0

    # a step: frozen last layer (last_layer_lr = 0) is untouched, the rest moves
    apply_schedules(opt, lr=0.1, wd=0.05, last_layer_lr=0.0)
    before_last = m.heads[0].last_layer.weight.detach().clone()
    before_qkv = m.backbone.blocks[0].attn.qkv.weight.detach().clone()
    loss = sum((p**2).sum() for p in m.parameters())
    loss.backward()
    opt.step()
    assert torch.equal(m.heads[0].last_layer.weight, before_last)
    assert not torch.equal(m.backbone.blocks[0].attn.qkv.weight, before_qkv)


def clip_grad_norm(params, max_norm):
    return float(clip_grad_norm_tensor(params, max_norm))


def test_clip_grad_norm():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(3))
    c = nn.Parameter(torch.zeros(1))  # no grad: ignored
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([0.0, 4.0, 0.0])
    n = clip_grad_norm([a, b, c], 0.0)  # disabled: norm only
    assert isinstance(n, float) and n == pytest.approx(5.0)
    assert torch.equal(a.grad, torch.tensor([3.0, 0.0]))
    n = clip_grad_norm([a, b, c], 1.0)
    assert n == pytest.approx(5.0)  # norm before clipping
    total = torch.cat([a.grad, b.grad]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm([c], 1.0) == 0.0
