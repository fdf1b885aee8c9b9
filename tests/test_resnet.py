"""The elastic ResNet family against independent references: the authors' space and multiplicities,
their named sizes, a hand-written float64 forward, the sliced-convolution seam, timm, parameter and
MAC counts, the authors' layer-decay multipliers, and one-line config errors."""

import collections
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbones import MODEL, tiny
from poa_hpc.cli import main
from poa_hpc.config import load_config
from poa_hpc.errors import ConfigError
from poa_hpc.kernels.sliced_conv import sliced_conv2d
from poa_hpc.models.elastic import ElasticGroupNorm
from poa_hpc.models.ops import elastic_conv2d
from poa_hpc.models.registry import get_backbone
from poa_hpc.models.resnet import ResNetArch, build_resnet
from poa_hpc.models.subnets import Subnet, SubnetSampler
from poa_hpc.train.optim import ParamRules

SPEC = get_backbone("resnet")
POA_CFG = "configs/resnet_poa.yaml"


def perturbed(arch, seed=0, dtype=torch.float64):
    """An elastic ResNet with every GroupNorm (and the mask token) moved away from its init."""
    torch.manual_seed(seed)
    net = build_resnet(arch).to(dtype).eval()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.ndim <= 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if n.endswith("weight") else 0.3 * torch.randn_like(p))
        net.mask_token.normal_()
    return net


# ---------------------------------------------------------------- the space, as the authors build it
def authors_pool(min_depths, max_depths, stage1_min_mid=64, stage1_max_mid=128, groups=32, s=2.0):
    """The authors' DynamicResNet.create_dynamic_networks, written out: per-stage widths
    range(min_mid, max_mid + 1, groups * 2**stage) zipped over stages, depth tuples of the per-stage
    ranges sorted by total depth, each repeated round(linspace(s, 1, n)) times for every width; the
    last entry (the intact network) is never drawn (network_ids = range(len - 1))."""
    widths = list(zip(*[range(stage1_min_mid * 2 ** i, stage1_max_mid * 2 ** i + 1, groups * 2 ** i) for i in range(4)]))
    depths = sorted([(a, b, c, d) for a in range(min_depths[0], max_depths[0] + 1)
                     for b in range(min_depths[1], max_depths[1] + 1) for c in range(min_depths[2], max_depths[2] + 1)
                     for d in range(min_depths[3], max_depths[3] + 1)], key=sum)
    scales = np.linspace(s, 1, len(depths))
    pool = [(w, d) for w in widths for d, sc in zip(depths, scales) for _ in range(int(np.round(sc)))]
    return pool, pool[:-1]


def test_465_subnetworks_with_the_authors_multiplicities():
    cfg = load_config(POA_CFG)
    arch = cfg.model.resnet
    space = SPEC.space(arch)
    assert len(space) == 465 and len(space.depths) == 155 and space.widths == (64, 96, 128)
    pool, drawn = authors_pool([3, 4, 6, 3], [3, 8, 36, 3])
    assert len(pool) == 699 and len(drawn) == 698
    assert pool[-1] == ((128, 256, 512, 1024), (3, 8, 36, 3))
    # our sub-network (w, d) is their ((w, 2w, 4w, 8w), d)
    theirs = collections.Counter(drawn)
    ours = {((s.width, 2 * s.width, 4 * s.width, 8 * s.width), s.depth): n for s, n in space.weights().items()}
    assert ours == dict(theirs)
    assert space.intact == Subnet(128, (3, 8, 36, 3)) and space.intact not in space.weights()
    # one pass of the sampler draws each sub-network exactly its multiplicity, never the intact one
    sampler = SubnetSampler(space, seed=3)
    assert collections.Counter(sampler.sample(t) for t in range(698)) == collections.Counter(space.weights())


def test_cli_subnets_prints_465(capsys):
    assert main(["subnets", "--config", POA_CFG]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln[:1].isdigit()]
    assert out.startswith("resnet: 465 sub-networks") and "pool of 698" in out and len(rows) == 465
    assert rows[0].split()[:2] == ["64x3-4-6-3", "R50"] and rows[-1].split()[0] == "128x3-8-36-3"
    assert rows[-1].split()[-1] == "intact"


def test_named_sizes_are_the_authors_get_by_type():
    """get_by_type: width [64, 128, 256, 512] (stage mids) with depths R50 [3,4,6,3], R101 [3,4,23,3],
    R152 [3,8,36,3]."""
    arch = load_config(POA_CFG).model.resnet
    named = SPEC.named_sizes(arch)
    by_type = {"R50": [3, 4, 6, 3], "R101": [3, 4, 23, 3], "R152": [3, 8, 36, 3]}
    assert set(named) == set(by_type)
    for name, depth in by_type.items():
        sub = named[name]
        assert [sub.width * 2 ** s for s in range(4)] == [64, 128, 256, 512] and list(sub.depth) == depth
    # bottleneck = output / 4 at the narrowest width, / 2 for the intact network
    assert [arch.out_channels(s) for s in range(4)] == [256, 512, 1024, 2048]
    assert [arch.max_width * 2 ** s for s in range(4)] == [128, 256, 512, 1024]


# ---------------------------------------------------------------- a hand-written float64 forward
def reference_forward(sd, arch, width, depth, x, masks=None):
    """The elastic ResNet written from the definition, independent of the model code: sliced
    weights, the input of conv2/conv3 scaled by max_mid / mid, GroupNorm of gn_groups groups over
    the active channels, masks and patch tokens upsampled with F.interpolate (as the authors)."""
    G, W, f = arch.gn_groups, arch.widths[-1], arch.ibot_scale_factor
    y = F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)
    y = F.max_pool2d(F.relu(F.group_norm(y, G, sd["bn1.weight"], sd["bn1.bias"])), 3, 2, 1)
    if masks is not None:
        n = math.isqrt(masks.shape[1])
        m = F.interpolate(masks.reshape(-1, 1, n, n).double(), scale_factor=8 // f, mode="nearest").bool()
        y = torch.where(m, sd["mask_token"], y)
    for s in range(4):
        mid, alpha = width * 2 ** s, W / width
        for i in np.linspace(0, arch.depths[s] - 1, depth[s]).astype(np.int64):
            p = {k.split(f"layer{s + 1}.{i}.", 1)[1]: v for k, v in sd.items() if k.startswith(f"layer{s + 1}.{i}.")}
            stride = 2 if s > 0 and i == 0 else 1
            h = F.conv2d(y, p["conv1.weight"][:mid])
            h = F.relu(F.group_norm(h, G, p["bn1.weight"][:mid], p["bn1.bias"][:mid]))
            h = F.conv2d(h * alpha, p["conv2.weight"][:mid, :mid], stride=stride, padding=1)
            h = F.relu(F.group_norm(h, G, p["bn2.weight"][:mid], p["bn2.bias"][:mid]))
            h = F.group_norm(F.conv2d(h * alpha, p["conv3.weight"][:, :mid]), G, p["bn3.weight"], p["bn3.bias"])
            sc = y
            if "downsample.0.weight" in p:
                sc = F.group_norm(F.conv2d(y, p["downsample.0.weight"], stride=stride), G, p["downsample.1.weight"],
                                  p["downsample.1.bias"])
            y = F.relu(h + sc)
    region = F.interpolate(y, scale_factor=f, mode="nearest") if f > 1 else y
    return y.mean((2, 3)), region.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("factor,size", [(2, 64), (1, 64), (4, 32)])
def test_forward_equals_a_hand_written_reference(factor, size):
    arch = ResNetArch(img_size=size, stem_channels=16, base_channels=16, depths=[2, 3, 4, 2], min_depths=[1, 2, 2, 1],
                      widths=[8, 12, 16], gn_groups=4, ibot_scale_factor=factor)
    net = perturbed(arch)
    sd = dict(net.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, size, size, dtype=torch.float64, generator=g)
    grid = SPEC.mask_grid(arch, size)
    assert grid == size // 32 * factor
    masks = torch.rand(3, grid * grid, generator=g) < 0.4
    for sub in (Subnet(16, (2, 3, 4, 2)), Subnet(8, (1, 2, 2, 1)), Subnet(12, (2, 2, 3, 1)), Subnet(8, (1, 3, 4, 2))):
        for m in (None, masks):
            with torch.no_grad():
                out = net(x, sub.width, sub.depth, masks=m, features=True)
                cls, patch = reference_forward(sd, arch, sub.width, sub.depth, x, m)
            assert out["x_norm_patchtokens"].shape == (3, grid * grid, 512)
            torch.testing.assert_close(out["x_norm_clstoken"], cls, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(out["x_norm_patchtokens"], patch, rtol=1e-10, atol=1e-10)
        assert not torch.equal(net(x, sub.width, sub.depth, masks=masks), net(x, sub.width, sub.depth))


def test_masks_that_do_not_fit_and_bad_widths_are_errors():
    arch = ResNetArch(img_size=32, stem_channels=16, base_channels=16, depths=[1, 2, 2, 1], min_depths=[1, 1, 1, 1],
                      widths=[8, 16], gn_groups=4)
    net = build_resnet(arch)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="masks of shape"):
        net(x, masks=torch.zeros(2, 16, dtype=torch.bool))  # factor 2 at 32 px: grid 2, 4 patches
    with pytest.raises(ValueError, match="multiple of 4"):
        net(x, 10, (1, 2, 2, 1))
    with pytest.raises(ValueError, match="one block count per stage"):
        net(x, 8, 2)


def test_skipped_blocks_on_an_empty_batch_change_nothing_and_stay_in_the_graph():
    """What FSDP / ZeRO-3 rely on: with sync_skipped_blocks, the skipped blocks run on a batch of 0
    (convolutions and GroupNorm accept it), outputs are unchanged and every block gets a gradient."""
    arch = ResNetArch(img_size=32, stem_channels=16, base_channels=16, depths=[1, 3, 4, 1], min_depths=[1, 2, 2, 1],
                      widths=[8, 16], gn_groups=4, ibot_scale_factor=4)
    net = perturbed(arch)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = net(x, 8, (1, 2, 2, 1))
    net.sync_skipped_blocks = True
    got = net(x, 8, (1, 2, 2, 1))
    assert torch.equal(got, want)
    got.sum().backward()
    skipped = net.layer3[1]  # ids of 2 of 4 blocks: [0, 3]
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in skipped.parameters())
    assert net.layer3[3].conv2.weight.grad.abs().max() > 0


# ---------------------------------------------------------------- the sliced-convolution seam
def conv_by_unfold(x, w, stride, padding):
    """Convolution as patches @ filters (no F.conv2d)."""
    B, C, H, W = x.shape
    O, _, k, _ = w.shape
    cols = F.unfold(x, k, padding=padding, stride=stride)  # (B, C*k*k, L)
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    return (w.reshape(O, -1) @ cols).reshape(B, O, Ho, Wo)


@pytest.mark.parametrize("k,stride,padding", [(3, 2, 1), (3, 1, 1), (1, 1, 0), (1, 2, 0)])
@pytest.mark.parametrize("out_c,in_c", [(6, 4), (10, 12), (3, 12)])
def test_sliced_conv_seam_equals_an_independent_reference(k, stride, padding, out_c, in_c):
    g = torch.Generator().manual_seed(k * 100 + out_c + in_c)
    weight = torch.randn(10, 12, k, k, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(2, in_c, 7, 7, dtype=torch.float64, generator=g, requires_grad=True)
    alpha = 12 / in_c
    y = elastic_conv2d(x, weight, None, out_c, stride, padding)
    ref_w = weight.detach().clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = conv_by_unfold(ref_x * alpha, ref_w[:out_c, :in_c], stride, padding)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    (ref * gy).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, ref_w.grad, rtol=1e-12, atol=1e-12)
    outside = torch.ones_like(weight, dtype=torch.bool)
    outside[:out_c, :in_c] = False
    assert weight.grad[outside].abs().max().item() == 0 if outside.any() else True
    # the kernel directly, with a bias (sliced, not scaled)
    b = torch.randn(10, dtype=torch.float64, generator=g)
    got = sliced_conv2d(x.detach(), weight.detach(), b, out_c, in_c, alpha=alpha, stride=stride, padding=padding)
    torch.testing.assert_close(got, ref.detach() + b[:out_c, None, None], rtol=1e-12, atol=1e-12)


def test_sliced_conv_refuses_impossible_slices_in_one_line():
    w = torch.randn(8, 6, 3, 3)
    for x, out_c, in_c, msg in ((torch.randn(1, 7, 5, 5), 4, 7, "cannot take"), (torch.randn(1, 4, 5, 5), 9, 4, "cannot take"),
                                (torch.randn(1, 5, 5, 5), 4, 4, "input has 5 channels")):
        with pytest.raises(ValueError, match=msg) as e:
            sliced_conv2d(x, w, None, out_c, in_c)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown backend"):
        elastic_conv2d(torch.randn(1, 4, 5, 5), w, None, 4, backend="triton")


def test_elastic_groupnorm_keeps_its_groups_at_every_width():
    """By hand: mean / variance over each of the G groups of the active channels (c / G channels per group)."""
    gn = ElasticGroupNorm(4, 16).double()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    for c in (8, 12, 16):
        x = torch.randn(2, c, 3, 5, dtype=torch.float64)
        xg = x.reshape(2, 4, c // 4 * 15)
        ref = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + gn.eps))
        ref = ref.reshape_as(x) * gn.weight[:c, None, None] + gn.bias[:c, None, None]
        torch.testing.assert_close(gn(x), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="do not split into 4 groups"):
        gn(torch.randn(1, 6, 2, 2))


# ---------------------------------------------------------------- timm, parameters, MACs
def _timm_model(arch, state, via_json=True):
    """timm's model from what the export JSON carries (kwargs and attributes through json), state loaded strictly."""
    timm = pytest.importorskip("timm")
    from poa_hpc.models.registry import apply_timm_attributes

    e = SPEC.timm_export(arch, state)
    kwargs, attributes = (json.loads(json.dumps(e.kwargs)), json.loads(json.dumps(e.attributes))) if via_json else (
        e.kwargs, e.attributes)
    ref = timm.create_model(e.model, pretrained=False, num_classes=0, **kwargs).eval()
    apply_timm_attributes(ref, attributes)
    ref.load_state_dict(e.state, strict=True)
    return e.model, ref


def test_extracted_resnet_50_101_152_shapes_equal_timm_at_tiny_widths():
    """The intact ResNet-152 depths with a 64-channel stem (timm's), block outputs 64..512 and stage-1
    mids 8/16: the R50, R101 and R152 depth tuples at both widths load into timm's ResNet (GroupNorm of
    8 groups) with strict=True and give the same features in fp32."""
    arch = ResNetArch(img_size=64, stem_channels=64, base_channels=16, depths=[3, 8, 36, 3], min_depths=[3, 4, 6, 3],
                      widths=[8, 16], gn_groups=8)
    net = perturbed(arch, dtype=torch.float32)
    x = torch.randn(2, 3, 64, 64)
    worst = 0.0
    for sub in (Subnet(8, (3, 4, 6, 3)), Subnet(8, (3, 4, 23, 3)), Subnet(8, (3, 8, 36, 3)), Subnet(16, (3, 4, 6, 3)),
                Subnet(16, (3, 8, 36, 3))):
        dense, state = SPEC.extract_tensors(net.state_dict(), arch, sub)
        _, ref = _timm_model(dense, state)
        assert sum(p.numel() for p in ref.parameters()) == SPEC.params(arch, sub)
        with torch.no_grad():
            diff = (ref(x) - net(x, sub.width, sub.depth)).abs().max().item()
        worst = max(worst, diff)
        assert diff < 1e-5, (sub, diff)
    print(f"max |timm - elastic| over R50/R101/R152 depth shapes: {worst:.2e}")


def test_real_resnet50_loads_into_timm_resnet50_gn():
    """The real ResNet-50 shape (the R50 sub-network of configs/resnet_poa.yaml): timm's resnet50_gn from
    JSON-serialised kwargs, 23,508,032 parameters without the classifier, same features in fp32 (64 px to
    keep it short)."""
    arch = load_config(POA_CFG).model.resnet
    dense = arch.sub(64, (3, 4, 6, 3))
    net = perturbed(dense, dtype=torch.float32)
    name, ref = _timm_model(dense, dict(net.state_dict()))
    assert name == "resnet50_gn"
    assert SPEC.params(arch, Subnet(64, (3, 4, 6, 3))) == sum(p.numel() for p in ref.parameters()) == 23_508_032
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        diff = (ref(x) - net(x)).abs().max().item()
    assert diff < 1e-5, diff
    print(f"max |timm resnet50_gn - ours| at the real ResNet-50 shape: {diff:.2e}")


def test_timm_export_refuses_what_timm_cannot_build():
    with pytest.raises(ValueError, match="64 channels"):
        SPEC.timm_export(ResNetArch(stem_channels=32), {})


def test_params_and_macs():
    """MACs: ResNet-50 ~4.1 G at 224 (timm/fvcore); exactly the convolutions torch's FLOP counter sees
    (2 FLOPs per MAC) for sub-networks of a small ResNet at two input sizes."""
    from torch.utils.flop_counter import FlopCounterMode

    arch = load_config(POA_CFG).model.resnet
    assert SPEC.gflops(arch, Subnet(64, (3, 4, 6, 3))) == pytest.approx(4.09, abs=0.01)
    small = ResNetArch(stem_channels=16, base_channels=16, depths=[2, 3, 4, 2], min_depths=[1, 2, 2, 1],
                       widths=[8, 12, 16], gn_groups=4)
    net = build_resnet(small)
    for sub in (Subnet(12, (1, 2, 3, 2)), Subnet(16, (2, 3, 4, 2))):
        assert SPEC.params(small, sub) == sum(p.numel() for n, p in build_resnet(small.sub(sub.width, sub.depth))
                                              .named_parameters() if n != "mask_token")
        for size in (64, 40):
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                net(torch.randn(1, 3, size, size), sub.width, sub.depth)
            assert SPEC.gflops(small, sub, img_size=size) * 1e9 == fc.get_total_flops() / 2


# ---------------------------------------------------------------- optimizer: the authors' multipliers
def test_layer_decay_multipliers_are_the_authors():
    """get_resnet_lr_decay_rate with depths [3, 8, 36, 3]: num_layers 50, stem and mask token
    0.95**50, block j of stage s 0.95**(50 - (sum(depths[:s]) + j + 1)), heads (a module of 0 blocks)
    0.95**0; no weight decay on any GroupNorm, the shortcut's included."""
    cfg = load_config(POA_CFG)
    rules = ParamRules(cfg)
    by_hand = {
        "backbone.conv1.weight": (0.95 ** 50, 1.0), "backbone.bn1.weight": (0.95 ** 50, 0.0),
        "backbone.mask_token": (0.95 ** 50, 1.0),
        "backbone.layer1.0.conv1.weight": (0.95 ** 49, 1.0), "backbone.layer1.0.downsample.0.weight": (0.95 ** 49, 1.0),
        "backbone.layer1.0.downsample.1.weight": (0.95 ** 49, 0.0),
        "backbone.layer1.2.bn3.bias": (0.95 ** 47, 0.0),
        "backbone.layer2.0.conv2.weight": (0.95 ** 46, 1.0),  # 3 + 0 + 1 = 4
        "backbone.layer2.7.bn2.weight": (0.95 ** 39, 0.0),  # 3 + 7 + 1 = 11
        "backbone.layer3.0.downsample.1.bias": (0.95 ** 38, 0.0),  # 12
        "backbone.layer3.35.conv3.weight": (0.95 ** 3, 1.0),  # 47
        "backbone.layer4.0.conv1.weight": (0.95 ** 2, 1.0),  # 48
        "backbone.layer4.2.conv3.weight": (1.0, 1.0),  # 50
        "heads.0.mlp.0.weight": (1.0, 1.0), "heads.0.last_layer.weight_v": (1.0, 1.0),
    }
    for name, (lr, wd) in by_hand.items():
        got = rules(name)
        assert got[0] == pytest.approx(lr, rel=1e-12) and got[1] == wd, (name, got)
    with pytest.raises(ValueError, match="not a parameter"):
        rules("backbone.layer3.36.conv1.weight")


# ---------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("override,key", [
    ("model.resnet.depths=[3,8,36]", "model.resnet.depths"),
    ("model.resnet.min_depths=[3,9,6,3]", "model.resnet.min_depths"),
    ("model.resnet.widths=[96,64]", "model.resnet.widths"),
    ("model.resnet.widths=[64,80,128]", "model.resnet.widths"),
    ("model.resnet.gn_groups=48", "model.resnet.widths"),
    ("model.resnet.gn_groups=0", "model.resnet.gn_groups"),
    ("model.resnet.stem_channels=48", "model.resnet.gn_groups"),
    ("model.resnet.ibot_scale_factor=3", "model.resnet.ibot_scale_factor"),
    ("model.resnet.drop_path_rate=1.0", "model.resnet.drop_path_rate"),
    ("model.resnet.sampling_s=0.5", "model.resnet.sampling_s"),
    ("model.resnet.widths=sixty", "model.resnet.widths"),
    ("data.global_size=200", "data.global_size"),
])
def test_bad_resnet_config_values_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(POA_CFG, [override])
    msg = str(e.value)
    assert f"'{key}" in msg and "\n" not in msg, msg


def test_tiny_config_is_the_one_the_contract_tests_use():
    cfg = load_config("configs/demo_cpu.yaml", tiny("resnet"))
    assert cfg.model.arch == "resnet" and len(SPEC.space(cfg.model.resnet)) == 3 * 2 * 3
    assert "model.arch=resnet" in MODEL["resnet"]


def test_initialisation_is_timms():
    """Kaiming-normal (fan-out, ReLU) convolutions, GroupNorm 1 / 0 but each block's last GroupNorm scale 0
    (zero_init_last), so every sub-network starts as the same chain of shortcuts; without
    zero_init_last the residual branches are active from the start."""
    arch = ResNetArch(img_size=32, stem_channels=16, base_channels=16, depths=[1, 3, 4, 1], min_depths=[1, 2, 2, 1],
                      widths=[8, 16], gn_groups=4)
    torch.manual_seed(0)
    net = build_resnet(arch)
    w = net.layer3[1].conv2.weight  # fan_out = 64 * 9
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)
    assert all(b.bn3.weight.abs().max() == 0 and torch.equal(b.bn2.weight, torch.ones_like(b.bn2.weight))
               for s in net.stages for b in getattr(net, s))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x, 8, (1, 2, 2, 1)), net(x), rtol=0, atol=0)
    live = build_resnet(ResNetArch(**{**arch.__dict__, "zero_init_last": False}))
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in live.modules()
               if isinstance(m, torch.nn.GroupNorm))
    assert not torch.equal(live(x, 8, (1, 2, 2, 1)), live(x))
