"""Sample-subset stochastic depth (``model.drop_path_mode``; DINOv2's ``drop_add_residual_stochastic_depth``).

References are written out here in float64: the residual branch run sample by sample on the kept samples and
added back by hand scaled by b / k; the exact expectation of a block over its four keep/drop outcomes.
"""

import itertools
import math

import pytest
import torch

from backbones import tiny
from poa_hpc.checkpoint.layout import load_checkpoint
from poa_hpc.cli import main
from poa_hpc.config import load_config
from poa_hpc.errors import ConfigError
from poa_hpc.models.elastic import DropPath, subset_size
from poa_hpc.models.resnet.model import Bottleneck
from poa_hpc.models.swin.model import SwinBlock
from poa_hpc.models.vit.model import Block, ViTArch, build_vit
from poa_hpc.train.meta_arch import POA
from poa_hpc.train.trainer import step_seed

D = torch.float64


def vit_block(p, mode, seed=0):
    torch.manual_seed(seed)
    blk = Block(16, 4, 2.0, True, 0.5, p, "torch", "sdpa").to(D).train()  # LayerScale 0.5: branches matter
    blk.drop_path.mode = mode
    return blk


def swin_block(p, mode):
    torch.manual_seed(1)
    blk = SwinBlock(8, 4, 2, True, 2.0, True, p, "torch", "sdpa").to(D).train()
    blk.drop_path.mode = mode
    return blk


def bottleneck(p, mode):
    torch.manual_seed(2)
    blk = Bottleneck(8, 4, 16, 2, 2, p, "torch").to(D).train()
    blk.drop_path.mode = mode
    return blk


def per_sample(fn, x):
    """``fn`` applied to each sample alone (batch of one): a reference that cannot mix samples."""
    return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])]) if x.shape[0] else fn(x)


def draws(b, p, n, seed):
    """The first ``n`` subsets the global generator yields after ``manual_seed(seed)`` (DINOv2's draw)."""
    torch.manual_seed(seed)
    k = subset_size(b, p)
    return [torch.randperm(b)[:k] for _ in range(n)]


def add_by_hand(base, residual_fn, keep, inp=None):
    inp = base if inp is None else inp
    b, k = inp.shape[0], len(keep)
    out = base.clone()
    r = per_sample(residual_fn, inp[keep])
    for j, i in enumerate(keep.tolist()):
        out[i] = base[i] + (b / k) * r[j]
    return out


# ---------------------------------------------------------------- (a) a fixed subset vs a hand-written reference
@pytest.mark.parametrize("width", [16, 8])  # intact, and the elastic student's width-sliced input
def test_vit_block_equals_branch_on_the_subset_index_added_by_hand(width):
    blk, b, p = vit_block(0.3, "subset"), 7, 0.3
    x = torch.randn(b, 5, width, dtype=D)
    torch.manual_seed(11)
    got = blk(x)
    k1, k2 = draws(b, p, 2, 11)
    assert len(k1) == subset_size(b, p) == 4  # max(int(7 * 0.7), 1): int(4.9)
    h = add_by_hand(x, lambda t: blk.ls1(blk.attn(blk.norm1(t))), k1)
    ref = add_by_hand(h, lambda t: blk.ls2(blk.mlp(blk.norm2(t))), k2)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    dropped = sorted(set(range(b)) - set(k1.tolist()) - set(k2.tolist()))
    for i in dropped:  # dropped by both branches: the block is the identity on that sample
        assert torch.equal(got[i], x[i])


def test_swin_block_on_a_sample_subset_equals_the_reference():
    blk, b, p = swin_block(0.5, "subset"), 5, 0.5
    x = torch.randn(b, 4, 4, 8, dtype=D)  # (B, H, W, C): 2 x 2 windows of 2, shifted
    torch.manual_seed(3)
    got = blk(x)
    k1, k2 = draws(b, p, 2, 3)
    h = add_by_hand(x, lambda t: blk._attn(blk.norm1(t)), k1)
    ref = add_by_hand(h, lambda t: blk.mlp(blk.norm2(t)), k2)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_resnet_bottleneck_on_a_sample_subset_equals_the_reference():
    blk, b, p = bottleneck(0.4, "subset"), 6, 0.4
    x = torch.randn(b, 8, 6, 6, dtype=D)
    torch.manual_seed(4)
    got = blk(x, 2)  # elastic mid width 2 of 4
    (keep,) = draws(b, p, 1, 4)
    shortcut = blk.downsample(x)
    ref = torch.relu(add_by_hand(shortcut, lambda t: blk._branch(t, 2), keep, inp=x))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- (b) the same expectation as mask-based drop path
def exact_expectation(blk, x, keep_prob, scale):
    """E[block(x)] per sample over the four (attention kept?, MLP kept?) outcomes, each branch kept with
    ``keep_prob`` and then scaled by ``scale``; and the per-element variance of one draw."""
    attn = lambda t: blk.ls1(blk.attn(blk.norm1(t)))  # noqa: E731
    mlp = lambda t: blk.ls2(blk.mlp(blk.norm2(t)))  # noqa: E731
    outs, probs = [], []
    for a, m in itertools.product((0, 1), repeat=2):
        h = x + a * scale * attn(x)
        outs.append(h + m * scale * mlp(h))
        probs.append((keep_prob if a else 1 - keep_prob) * (keep_prob if m else 1 - keep_prob))
    mean = sum(pr * o for pr, o in zip(probs, outs))
    var = sum(pr * (o - mean) ** 2 for pr, o in zip(probs, outs))
    return mean, var


@torch.no_grad()
def test_subset_and_mask_have_the_same_expectation_per_sample():
    # b = 10 at rate 0.2 keeps k = 8 = b (1 - rate): each sample's branch is kept with probability 0.8 and
    # scaled by 1.25 in both modes, and samples never interact in a block, so every sample's output has the
    # same distribution in both modes; its mean is the exact four-outcome expectation.  N draws: the mean's
    # error per element is ~ N(0, var / N); 6 sigma over 10 x 3 x 16 elements fails by chance < 1e-6.
    b, p, n = 10, 0.2, 1500
    x = torch.randn(b, 3, 16, dtype=D)
    for mode in ("subset", "mask"):
        blk = vit_block(p, mode)
        mean, var = exact_expectation(blk, x, 0.8, 1.25)
        torch.manual_seed(5)
        acc = torch.zeros_like(x)
        for _ in range(n):
            acc += blk(x)
        tol = 6 * (var / n).sqrt() + 1e-12
        assert ((acc / n - mean).abs() <= tol).all(), mode
    # And the no-drop output is not that expectation (a nonlinear second branch): the test can tell them apart.
    assert not torch.allclose(blk.eval()(x), mean, atol=1e-3)


@torch.no_grad()
def test_one_residual_add_is_unbiased_when_k_over_b_is_not_the_keep_rate():
    # b = 6 at rate 0.2: k = int(4.8) = 4, kept with probability 2/3 and scaled by 1.5; still E = x + f(x).
    # Per sample, one draw is x + f(x) * (1.5 Bernoulli(2/3)), variance f^2 (b/k - 1); 6 sigma as above.
    b, p, n = 6, 0.2, 2000
    x = torch.randn(b, 3, 4, dtype=D)
    f = lambda t: torch.sin(3 * t) + t ** 2  # noqa: E731
    dp = DropPath(p, "subset").train()
    torch.manual_seed(6)
    mean = sum(dp.add(x, f) for _ in range(n)) / n
    tol = 6 * f(x).abs() * math.sqrt((b / subset_size(b, p) - 1) / n) + 1e-12
    assert ((mean - (x + f(x))).abs() <= tol).all()


# ---------------------------------------------------------------- (c) gradients reach only the kept samples' branch
def test_gradients_flow_only_through_kept_samples_branch_inputs():
    b, p = 8, 0.5
    x = torch.randn(b, 3, 4, dtype=D, requires_grad=True)
    w = torch.randn(4, dtype=D)
    seen = []

    def f(t):
        seen.append(t.shape[0])
        return t ** 2 * w

    torch.manual_seed(7)
    DropPath(p, "subset").train().add(x, f).sum().backward()
    (keep,) = draws(b, p, 1, 7)
    assert seen == [4]  # the branch ran on the subset only
    ref = torch.ones_like(x)
    ref[keep] += (b / 4) * 2 * x[keep].detach() * w
    torch.testing.assert_close(x.grad, ref, rtol=1e-12, atol=1e-12)

    # Through a ViT block: a sample dropped by both branches has output x_i and gradient exactly 1.
    blk = vit_block(p, "subset")
    xb = torch.randn(b, 5, 16, dtype=D, requires_grad=True)
    torch.manual_seed(8)
    blk(xb).pow(2).sum().backward()
    k1, k2 = draws(b, p, 2, 8)
    for i in set(range(b)) - set(k1.tolist()) - set(k2.tolist()):
        torch.testing.assert_close(xb.grad[i], 2 * xb[i].detach(), rtol=0, atol=0)
    assert blk.attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- (d) a function of (seed, rank, step, block, branch)
def tiny_vit(p=0.5, mode="subset"):
    torch.manual_seed(0)
    arch = ViTArch(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=4, min_width=16, width_step=8,
                   min_depth=2)
    m = build_vit(arch, p).to(D).train()
    m.set_drop_path_mode(mode)
    return m


def test_subset_is_a_function_of_seed_rank_step_and_sharded_skipped_blocks_draw_nothing():
    m = tiny_vit()
    img = torch.randn(6, 3, 16, 16, dtype=D)

    def out(seed, rank, step, sync=False, **kw):
        m.sync_skipped_blocks = sync
        torch.manual_seed(step_seed(seed, rank, step))  # what the trainer does at the top of every step
        return m(img, **kw)

    a = out(0, 0, 5)
    assert torch.equal(a, out(0, 0, 5))
    assert not torch.allclose(a, out(0, 0, 6))  # another step draws other subsets
    assert not torch.allclose(a, out(0, 1, 5))  # another rank too
    assert not torch.allclose(a, out(1, 0, 5))
    # The elastic student (width 16, depth 3): a block it skips runs on x[:0] under FSDP/ZeRO-3
    # (sync_skipped_blocks) and must not shift the draws of the blocks after it.
    assert torch.equal(out(0, 0, 5, width=16, depth=3), out(0, 0, 5, sync=True, width=16, depth=3))
    # Block 0's attention subset is the step's first draw, its MLP subset the second, and so on.
    k1, k2 = draws(6, 0.5, 2, step_seed(0, 0, 5))
    assert not torch.equal(k1, k2)


def test_elastic_vit_with_ibot_masks_equals_blocks_added_by_hand():
    # The elastic student (width 16 of 32, depth 3 of 4: blocks 0, 1, 3) with iBOT masks: masked patches are
    # replaced before the blocks, so a sample's tokens (masked or not) are kept or dropped together.
    m, b, p, s = tiny_vit(p=0.6), 5, 0.6, 12
    img = torch.randn(b, 3, 16, 16, dtype=D)
    masks = torch.zeros(b, 16, dtype=torch.bool)
    masks[1, :6] = True
    masks[3, 4:9] = True
    seen = []
    hook = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(s)
    got = m(img, masks=masks, width=16, depth=3, features=True)
    hook.remove()
    keeps = iter(draws(b, p, 6, s))
    x = seen[0]
    assert x.shape == (b, 17, 16)
    for i in (0, 1, 3):
        blk = m.blocks[i]
        x = add_by_hand(x, lambda t: blk.ls1(blk.attn(blk.norm1(t))), next(keeps))
        x = add_by_hand(x, lambda t: blk.ls2(blk.mlp(blk.norm2(t))), next(keeps))
    x = m.norm(x)
    torch.testing.assert_close(got["x_norm_clstoken"], x[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["x_norm_patchtokens"], x[:, 1:], rtol=1e-12, atol=1e-12)


def test_subset_resume_is_bit_identical(tmp_path):
    common = ["train", "--config", "configs/demo_cpu.yaml", *tiny("vit"), "data.n_local=2", "data.num_workers=0",
              "optim.batch_size=8", "optim.iters_per_epoch=3", "optim.epochs=2", "optim.warmup_epochs=1",
              "train.progress=false", "train.log_every=1", "model.vit.drop_path_rate=0.3",
              "model.drop_path_mode=subset", "train.checkpoint_every=2"]
    assert main([*common, f"train.output_dir={tmp_path / 'ref'}"]) == 0
    assert main([*common, f"train.output_dir={tmp_path / 'cut'}", "train.max_steps=2"]) == 0
    assert main([*common, f"train.output_dir={tmp_path / 'cut'}", "--resume"]) == 0
    ref, got = load_checkpoint(tmp_path / "ref" / "checkpoints"), load_checkpoint(tmp_path / "cut" / "checkpoints")
    assert ref["step"] == got["step"]
    for k, v in ref["model"].items():
        assert torch.equal(got["model"][k], v), k


# ---------------------------------------------------------------- (e) auto falls back exactly
def test_auto_at_or_below_0_1_is_mask_and_eval_is_identity():
    x = torch.randn(8, 3, 4, dtype=D)
    f = lambda t: torch.tanh(t) * 2  # noqa: E731
    for p in (0.05, 0.1):
        auto, mask = DropPath(p, "auto").train(), DropPath(p, "mask").train()
        assert not auto.uses_subset
        torch.manual_seed(10)
        a = auto.add(x, f)
        torch.manual_seed(10)
        assert torch.equal(a, x + mask(f(x)))
    assert DropPath(0.11, "auto").uses_subset and DropPath(0.05, "subset").uses_subset
    for mode in ("auto", "subset", "mask"):
        assert torch.equal(DropPath(0.5, mode).eval().add(x, f), x + f(x))
        assert torch.equal(DropPath(0.0, mode).train().add(x, f), x + f(x))
    blk = vit_block(0.5, "auto")
    xb = torch.randn(4, 5, 16, dtype=D)
    blk.eval()
    ref = xb + blk.ls1(blk.attn(blk.norm1(xb)))
    torch.testing.assert_close(blk(xb), ref + blk.ls2(blk.mlp(blk.norm2(ref))), rtol=0, atol=0)


def test_config_key_reaches_the_students_and_is_validated():
    cfg = load_config(overrides=[*tiny("vit"), "model.drop_path_mode=subset"])
    model = POA(cfg)
    modes = {m.mode for m in model.student.modules() if isinstance(m, DropPath)}
    assert modes == {"subset"}
    assert load_config(overrides=tiny("vit")).model.drop_path_mode == "mask"  # today's behaviour by default
    assert load_config("vit_l_poa").model.drop_path_mode == "auto"
    with pytest.raises(ConfigError, match="model.drop_path_mode"):
        load_config(overrides=["model.drop_path_mode=sometimes"])


# ---------------------------------------------------------------- FLOPs estimators count the subsets' saving
@pytest.mark.parametrize("family,mode", [("vit", "subset"), ("swin", "auto"), ("resnet", "subset")])
def test_analytic_flops_saving_equals_the_counted_one(family, mode):
    # Forward FLOPs counted on meta tensors through the real student backbone (which draws its subsets there
    # too) against the analytic model the trainer logs (student_gflops, from spec.residual_gflops): the saving
    # of subset over mask, for the intact network and the smallest sub-network.  Swin in auto: rates
    # linspace(0, 0.5) over its 10 blocks, so its first blocks (<= 0.1) stay on masks.
    from torch.utils.flop_counter import FlopCounterMode

    from poa_hpc.models.registry import get_backbone
    from poa_hpc.models.subnets import Subnet
    from poa_hpc.perf.flops import student_gflops

    cfg = load_config(overrides=[*tiny(family), f"model.{family}.drop_path_rate=0.5"])
    spec, arch, size, b = get_backbone(family), cfg.model.section, cfg.data.global_size, 7  # int(7 x 0.5) = 3
    space = spec.space(arch)
    with torch.device("meta"):
        bb = spec.build(arch, drop_path_rate=0.5).train()
    x = torch.empty(b, 3, size, size, device="meta")
    for sub in (space.intact, Subnet(space.widths[0], space.depths[0])):
        flops = {}
        for m in ("mask", mode):
            bb.set_drop_path_mode(m)
            with FlopCounterMode(display=False) as fc:
                bb(x, sub.width, sub.depth)
            flops[m] = fc.get_total_flops()
        saving = flops["mask"] - flops[mode]
        assert saving > 0.1 * flops["mask"], sub  # a real saving (stems and shortcuts run whole)
        analytic = 2e9 * b * (spec.gflops(arch, sub, size) - student_gflops(spec, arch, sub, size, b, mode))
        assert analytic == pytest.approx(saving, rel=1e-9), sub
        assert student_gflops(spec, arch, sub, size, b, "mask") == spec.gflops(arch, sub, size)


def test_activation_checkpointing_recompute_draws_the_same_subset():
    # FSDP's dist.activation_checkpointing wraps each student block with checkpoint_wrapper: the recompute in
    # backward must run the branch on the subset the forward drew (it restores the generator state).
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blk = vit_block(0.5, "subset")
    x = torch.randn(8, 5, 16, dtype=D, requires_grad=True)
    torch.manual_seed(13)
    ref = blk(x)
    ref.pow(2).sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in blk.parameters()]
    x.grad = None
    blk.zero_grad(set_to_none=True)
    torch.manual_seed(13)
    got = checkpoint_wrapper(blk)(x)
    got.pow(2).sum().backward()
    assert torch.equal(got, ref)
    for a, b in zip(ref_grads, [x.grad] + [p.grad for p in blk.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
