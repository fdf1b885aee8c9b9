"""The elastic Swin family: its space and sampling weights (the authors' pool), its forward against a
float64 reference written out by hand, extraction into timm's ``SwinTransformer`` at the Swin-T/S/B
shapes, sizes and costs against timm and the literature, the CLI and its config errors.
(The contract every family inherits — elastic == extracted, gradient placement, optimizer rules,
FSDP/ZeRO == one process — runs for Swin in ``test_backbones*.py``.)"""

import math

import pytest
import torch

from backbones import tiny
from poa_hpc.cli import main
from poa_hpc.config import load_config
from poa_hpc.errors import ConfigError
from poa_hpc.models.registry import get_backbone
from poa_hpc.models.subnets import Subnet, SubnetSampler
from poa_hpc.models.swin import SwinArch
from runs import RUN, SAME_AS_ONE_PROCESS, assert_same_run, assert_same_weights, train

SPEC = get_backbone("swin")


# ---------------------------------------------------------------- space and sampling
def test_space_has_39_subnets_with_the_authors_multiplicities():
    cfg = load_config("configs/swin_poa.yaml")
    space = SPEC.space(cfg.model.section)
    assert len(space) == 39 and space.widths == (96, 112, 128) and space.depths == tuple(range(6, 19))
    # The authors' create_dynamic_networks with s = 2, worked out by hand: width scales 2, 1.5, 1; depth
    # scales 2 - k/12; each pair round(product) times.
    expect = {
        96: [4, 4, 4, 4, 3, 3, 3, 3, 3, 2, 2, 2, 2],
        112: [3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2],
        128: [2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1],
    }
    weights = space.weights()
    assert Subnet(128, 18) not in weights  # the intact pair is trained by the intact branch
    for w, row in expect.items():
        for d, n in zip(range(6, 19), row):
            if (w, d) != (128, 18):
                assert weights[Subnet(w, d)] == n, (w, d)
    assert sum(weights.values()) == 88 and sum(weights.values()) + 1 == 89  # the authors' pool has 89
    sampler = SubnetSampler(space, seed=0)
    drawn = [sampler.sample(t) for t in range(88)]  # one pass of the pool: exactly the multiplicities
    assert {s: drawn.count(s) for s in set(drawn)} == weights
    assert SPEC.named_sizes(cfg.model.section) == {"Swin-T": Subnet(96, 6), "Swin-S": Subnet(96, 18),
                                                   "Swin-B": Subnet(128, 18)}


def test_cli_subnets_prints_the_39(capsys):
    assert main(["subnets", "--config", "configs/swin_poa.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("swin: 39 sub-networks: widths [96, 112, 128], 13 depths 6")
    rows = [ln.split() for ln in out.splitlines()[2:]]
    assert len(rows) == 39
    named = {r[1]: r[0] for r in rows if r[1].startswith("Swin")}
    assert named == {"Swin-T": "96x6", "Swin-S": "96x18", "Swin-B": "128x18"}
    assert rows[-1][-1] == "intact" and abs(sum(float(r[-1]) for r in rows[:-1]) - 1.0) < 1e-3


@pytest.mark.parametrize("override,key", [
    ("model.swin.min_width=100", "model.swin.min_width"),
    ("model.swin.width_step=20", "model.swin.min_width"),
    ("model.swin.depths=[2,2,18]", "model.swin.depths"),
    ("model.swin.depths=[2,0,18,2]", "model.swin.depths"),
    ("model.swin.min_depth=19", "model.swin.min_depth"),
    ("model.swin.min_depth=0", "model.swin.min_depth"),
    ("model.swin.window_size=0", "model.swin.window_size"),
    ("model.swin.head_dim=24", "model.swin.min_width"),
    ("model.swin.ibot_scale_factor=3", "model.swin.ibot_scale_factor"),
    ("model.swin.drop_path_rate=1.5", "model.swin.drop_path_rate"),
    ("model.swin.sampling_s=0.5", "model.swin.sampling_s"),
    ("model.swin.stage3_shift=[true,false]", "model.swin.stage3_shift"),
    ("model.swin.depths=deep", "model.swin.depths"),
    ("model.swin.window_size=seven", "model.swin.window_size"),
    ("model.swin.windows=7", "model.swin.windows"),
    ("data.global_size=208", "data.global_size"),
    ("data.local_size=98", "data.local_size"),
])
def test_bad_config_values_are_one_line_errors_naming_the_key(override, key, capsys):
    with pytest.raises(ConfigError) as exc:
        load_config("configs/swin_poa.yaml", [override])
    msg = str(exc.value)
    assert f"'{key}" in msg and "\n" not in msg, msg
    assert main(["subnets", "--config", "configs/swin_poa.yaml", override]) == 2
    out = capsys.readouterr()
    assert key in out.out + out.err and "Traceback" not in out.out + out.err


# ---------------------------------------------------------------- a float64 reference written out by hand
def ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def rows(t, maxdim, n, groups):
    """Entries [g * maxdim, g * maxdim + n) of each group g along dim 0."""
    return torch.cat([t[g * maxdim: g * maxdim + n] for g in range(groups)])


def ref_window_attention(x, sd, pre, C, ws, shift, hd):
    """Shifted-window attention of one block on x (B, H, W, c), token by token: pad the map with zeros to
    whole windows, cyclically shift it by ``shift``, attend inside each window with the relative position
    bias and the region mask, shift back, crop."""
    B, H, W, c = x.shape
    heads = c // hd
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    P = torch.zeros(B, Hp, Wp, c, dtype=x.dtype)
    P[:, :H, :W] = x
    Wqkv = rows(sd[pre + "attn.qkv.weight"], C, c, 3)[:, :c] * (C / c)
    bqkv = rows(sd[pre + "attn.qkv.bias"], C, c, 3)
    Wo, bo = sd[pre + "attn.proj.weight"][:c, :c] * (C / c), sd[pre + "attn.proj.bias"][:c]
    table = sd[pre + "attn.relative_position_bias_table"]
    out = torch.zeros_like(P)

    def region(r, n):  # region of a shifted row/column: 0 | 1 (last window, before the wrap) | 2 (wrapped)
        if not shift:
            return 0
        return 0 if r < n - ws else (1 if r < n - shift else 2)

    for wi in range(Hp // ws):
        for wj in range(Wp // ws):
            pos = [(wi * ws + a, wj * ws + b) for a in range(ws) for b in range(ws)]  # shifted positions
            src = [((R + shift) % Hp, (Q + shift) % Wp) for R, Q in pos]  # where their tokens come from
            T = torch.stack([P[:, r, q] for r, q in src], 1)  # (B, N, c)
            qkv = T @ Wqkv.T + bqkv
            q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
            N = len(pos)
            bias = torch.zeros(heads, N, N, dtype=x.dtype)
            mask = torch.zeros(N, N, dtype=x.dtype)
            for i, (Ri, Qi) in enumerate(pos):
                for j, (Rj, Qj) in enumerate(pos):
                    dr, dc = Ri - Rj, Qi - Qj
                    bias[:, i, j] = table[(dr + ws - 1) * (2 * ws - 1) + (dc + ws - 1), :heads]
                    if (region(Ri, Hp), region(Qi, Wp)) != (region(Rj, Hp), region(Qj, Wp)):
                        mask[i, j] = -100.0
            o = []
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                att = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd) + bias[h] + mask
                o.append(att.softmax(-1) @ v[..., sl])
            o = torch.cat(o, -1) @ Wo.T + bo
            for n, (r, q_) in enumerate(src):
                out[:, r, q_] = o[:, n]
    return out[:, :H, :W]


def ref_forward(sd, a, sub, img, masks=None, stage3_ids=None):
    """Elastic Swin forward of ``sub`` from the intact state, by hand (float64)."""
    w, d = sub.width, sub.depth
    C = [a.embed_dim * 2 ** s for s in range(4)]
    c = [w * 2 ** s for s in range(4)]
    p, ws, hd = a.patch_size, a.window_size, a.head_dim
    B, _, Hi, Wi = img.shape
    H, W = Hi // p, Wi // p
    x = torch.zeros(B, H, W, w, dtype=img.dtype)
    Wc, bc = sd["patch_embed.proj.weight"][:w], sd["patch_embed.proj.bias"][:w]
    for i in range(H):
        for j in range(W):
            x[:, i, j] = torch.einsum("bcuv,ocuv->bo", img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p], Wc) + bc
    x = ln(x, sd["patch_embed.norm.weight"][:w], sd["patch_embed.norm.bias"][:w])  # over the w channels kept
    if masks is not None:
        G = int(masks.shape[1] ** 0.5)
        up = H // G
        for b in range(B):
            for i in range(H):
                for j in range(W):
                    if masks[b, (i // up) * G + j // up]:
                        x[b, i, j] = sd["mask_token"][0, :w]
    for s in range(4):
        pre = f"layers.{s}."
        if s > 0:  # patch merge: neighbours (0,0), (1,0), (0,1), (1,1) of each 2x2 cell, zero-padded if odd
            Hn, Wn = -(-H // 2), -(-W // 2)
            P = torch.zeros(B, 2 * Hn, 2 * Wn, c[s - 1], dtype=x.dtype)
            P[:, :H, :W] = x
            cols = torch.tensor([g * C[s - 1] + k for g in range(4) for k in range(c[s - 1])])
            y = torch.zeros(B, Hn, Wn, 4 * c[s - 1], dtype=x.dtype)
            for i in range(Hn):
                for j in range(Wn):
                    y[:, i, j] = torch.cat([P[:, 2 * i, 2 * j], P[:, 2 * i + 1, 2 * j], P[:, 2 * i, 2 * j + 1],
                                            P[:, 2 * i + 1, 2 * j + 1]], -1)
            y = ln(y, sd[pre + "downsample.norm.weight"][cols], sd[pre + "downsample.norm.bias"][cols])
            x = y @ (sd[pre + "downsample.reduction.weight"][:c[s], cols] * (C[s - 1] / c[s - 1])).T
            H, W = Hn, Wn
        ids = stage3_ids[d] if s == 2 else range(a.depths[s])
        for j in ids:
            b = f"{pre}blocks.{j}."
            shift = ws // 2 if j % 2 else 0  # the block's own flag in the intact stage
            x = x + ref_window_attention(ln(x, sd[b + "norm1.weight"][:c[s]], sd[b + "norm1.bias"][:c[s]]), sd, b,
                                         C[s], ws, shift, hd)
            h = ln(x, sd[b + "norm2.weight"][:c[s]], sd[b + "norm2.bias"][:c[s]])
            h = gelu(h @ (sd[b + "mlp.fc1.weight"][:4 * c[s], :c[s]] * (C[s] / c[s])).T + sd[b + "mlp.fc1.bias"][:4 * c[s]])
            x = x + h @ (sd[b + "mlp.fc2.weight"][:c[s], :4 * c[s]] * (C[s] / c[s])).T + sd[b + "mlp.fc2.bias"][:c[s]]
    x = ln(x, sd["norm.weight"][:c[3]], sd["norm.bias"][:c[3]])
    f = a.ibot_scale_factor
    patches = torch.stack([x[:, u // f, v // f] for u in range(H * f) for v in range(W * f)], 1)
    return x.mean(dim=(1, 2)), patches


def tiny_swin(dtype=torch.float64, seed=0):
    # windows of 4 (the contract tests' tiny Swin uses 2): stage 4's 2 x 2 map and the 16 px crops are padded
    cfg = load_config("configs/demo_cpu.yaml", tiny("swin") + ["model.swin.window_size=4"])
    a = cfg.model.section
    torch.manual_seed(seed)
    bb = SPEC.build(a, drop_path_rate=0.0).to(dtype).eval()
    with torch.no_grad():  # trained-like norms and biases, a mask token
        for n, p in bb.named_parameters():
            if p.ndim <= 1 or n == "mask_token":
                p.add_(0.3 * torch.randn_like(p))
    return cfg, a, bb


def test_elastic_forward_equals_a_float64_reference_written_by_hand():
    cfg, a, bb = tiny_swin()
    assert (a.depths, a.window_size, a.patch_size) == ([2, 2, 4, 2], 4, 2)
    # floor(linspace(0, 3, d)), by hand: depth 3 keeps blocks 0, 1, 3 (blocks 1 and 3 both shift)
    stage3_ids = {2: [0, 3], 3: [0, 1, 3], 4: [0, 1, 2, 3]}
    sd = {k: v.detach() for k, v in bb.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    small = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)  # pads stages 3 and 4
    odd = torch.randn(1, 3, 24, 24, generator=g, dtype=torch.float64)  # odd map (3 x 3) before the last merge
    grid = SPEC.mask_grid(a, 32)
    assert grid == 4
    masks = torch.rand(2, grid * grid, generator=g) < 0.4
    for sub in (Subnet(8, 3), Subnet(12, 2), Subnet(16, 4)):
        with torch.no_grad():
            got = bb(img, sub.width, sub.depth, masks=masks, features=True)
            cls, patches = ref_forward(sd, a, sub, img, masks, stage3_ids)
            torch.testing.assert_close(got["x_norm_clstoken"], cls, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(got["x_norm_patchtokens"], patches, rtol=1e-10, atol=1e-10)
            assert patches.shape == (2, grid * grid, 8 * sub.width)
            for x in (small, odd):
                torch.testing.assert_close(bb(x, sub.width, sub.depth), ref_forward(sd, a, sub, x, None, stage3_ids)[0],
                                           rtol=1e-10, atol=1e-10)


def test_skipped_blocks_run_on_an_empty_batch():
    """Sharded engines run the blocks a sub-network skips on x[:0]: same output, and window attention,
    shift masks and merges take an empty batch."""
    cfg, a, bb = tiny_swin()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = bb(x, 8, 2)
    bb.sync_skipped_blocks = True
    got = bb(x, 8, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    skipped = bb.layers[2].blocks[1]  # depth 2 keeps blocks 0 and 3
    assert skipped.attn.qkv.weight.grad is not None and skipped.attn.qkv.weight.grad.abs().max() == 0
    assert bb(x[:0], 8, 2).shape == (0, 64)


# ---------------------------------------------------------------- timm
@pytest.fixture(scope="module")
def swin_b_teacher():
    """An intact POA Swin (Swin-B width, 2-2-18-2) in fp32 with trained-like norms and biases."""
    torch.manual_seed(0)
    a = load_config("configs/swin_poa.yaml").model.section
    bb = SPEC.build(a, drop_path_rate=0.0).eval()
    with torch.no_grad():
        for _, p in bb.named_parameters():
            if p.ndim <= 1:
                p.add_(0.3 * torch.randn_like(p))
    return a, bb


def test_extracted_swin_t_s_b_load_strictly_into_timm_and_give_the_same_features(swin_b_teacher):
    pytest.importorskip("timm")
    a, bb = swin_b_teacher
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    state = bb.state_dict()
    subs = dict(SPEC.named_sizes(a), other=Subnet(112, 11))  # 112x11: kwargs-only shape, shifts F T T T F F ...
    names = {}
    for label, sub in subs.items():
        dense, tensors = SPEC.extract_tensors(state, a, sub)
        e = SPEC.timm_export(dense, tensors)
        names[label] = (e.model, e.kwargs["num_heads"])
        ref = SPEC.timm_model(dense, tensors)  # load_state_dict(strict=True) inside
        assert sum(p.numel() for p in ref.parameters()) == SPEC.params(a, sub)
        with torch.no_grad():
            want = bb(x, sub.width, sub.depth)
            got = ref(x)
        assert (got - want).abs().max().item() < 1e-5, (label, (got - want).abs().max().item())
        if label == "Swin-T":
            # timm re-alternates the shifts of a 6-block stage; the sub-network keeps blocks 0, 3, 6, 10, 13,
            # 17 of the intact stage with their own flags (F T F F T T): without setting them timm differs.
            assert dense.stage3_shift == [False, True, False, False, True, True]
            for blk, shift in zip(ref.layers[2].blocks, [0, 3, 0, 3, 0, 3]):
                blk.shift_size = (shift, shift)
            with torch.no_grad():
                assert (ref(x) - want).abs().max().item() > 1e-3  # 100x the tolerance above
    assert names == {
        "Swin-T": ("swin_tiny_patch4_window7_224", (6, 12, 24, 48)),
        "Swin-S": ("swin_small_patch4_window7_224", (6, 12, 24, 48)),
        "Swin-B": ("swin_base_patch4_window7_224", (8, 16, 32, 64)),
        "other": ("swin_tiny_patch4_window7_224", (7, 14, 28, 56)),
    }


def test_timm_differs_only_where_windows_are_padded(swin_b_teacher):
    """At 96 px (stage maps 24, 12, 6, 3: none a multiple of 7) this model pads before the cyclic shift
    (the authors, mmcv) and timm after it, so the export is exact at 224 px but not on padded maps."""
    pytest.importorskip("timm")
    a, bb = swin_b_teacher
    dense, tensors = SPEC.extract_tensors(bb.state_dict(), a, Subnet(96, 18))
    ref = SPEC.timm_model(dense, tensors)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ref(x) - bb(x, 96, 18)).abs().max().item() > 1e-2


def test_sizes_and_costs_match_timm_and_the_literature():
    """Parameters equal timm's models (built with the same head counts); GFLOPs (MACs) equal timm's counted
    matmuls and the literature's Swin-T 4.5, Swin-S 8.7, Swin-B 15.4 (head_dim 16 changes only the bias
    tables)."""
    timm = pytest.importorskip("timm")
    from torch.utils.flop_counter import FlopCounterMode

    a = SwinArch()
    dense = a.sub(96, 6)
    e = SPEC.timm_export(dense, {})
    ref = timm.create_model(e.model, pretrained=False, num_classes=0, **e.kwargs).eval()
    assert SPEC.params(a, Subnet(96, 6)) == sum(p.numel() for p in ref.parameters())
    # The standard Swin-T (3, 6, 12, 24 heads) has 28,288,354 parameters with its 769,000-parameter
    # classifier; 16-dim heads double the 169-row bias tables: + 169 * (3*2 + 6*2 + 12*6 + 24*2).
    assert SPEC.params(a, Subnet(96, 6)) == 28_288_354 - 769_000 + 169 * 138
    for blk in ref.modules():  # count attention as matmuls
        if hasattr(blk, "fused_attn"):
            blk.fused_attn = False
    for size in (224, 96):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            ref(torch.randn(1, 3, size, size))
        assert SPEC.gflops(a, Subnet(96, 6), img_size=size) == pytest.approx(counter.get_total_flops() / 2e9, rel=1e-9)
    assert SPEC.gflops(a, Subnet(96, 6)) == pytest.approx(4.5, abs=0.05)
    assert SPEC.gflops(a, Subnet(96, 18)) == pytest.approx(8.7, abs=0.05)
    assert SPEC.gflops(a, Subnet(128, 18)) == pytest.approx(15.4, abs=0.05)
    assert SPEC.feature_dim(a, 96) == 768 and SPEC.feature_dim(a, 128) == 1024



# ---------------------------------------------------------------- the sliced projection with input groups
@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_patch_merge_projection_takes_the_leading_columns_of_each_group(backend):
    """The merge's reduction keeps, of each of its 4 input groups of C columns, the first c (and its first
    2c rows), scaling the input by C / c; the gradient lands in those entries only.  The Triton kernels read
    leading columns only: every backend runs the torch path for grouped inputs."""
    from poa_hpc.models.ops import elastic_linear

    C, c = 12, 8
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2 * C, 4 * C, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 4 * c, generator=g, dtype=torch.float64)
    y = elastic_linear(x, W, None, 2 * c, backend=backend, in_groups=4)
    cols = [grp * C + k for grp in range(4) for k in range(c)]
    torch.testing.assert_close(y, (x * (C / c)) @ W[:2 * c, cols].T, rtol=1e-12, atol=1e-12)
    (gW,) = torch.autograd.grad(y.sum(), W)
    used = torch.zeros_like(W, dtype=torch.bool)
    used[:2 * c, cols] = True
    assert (gW[~used] == 0).all() and (gW[used] != 0).all()
    with pytest.raises(ValueError, match="4x"):
        elastic_linear(torch.randn(5, 30, dtype=torch.float64), W, None, 2 * c, in_groups=4)  # 30 % 4 != 0


# ---------------------------------------------------------------- ranks training different sub-networks
def test_fsdp_per_rank_subnetworks_match_replicated(tmp_path):
    """The paper's per-rank sampling on 2 ranks: FSDP2 (per-block collectives; a rank's skipped stage-3
    blocks run on an empty batch) equals the replicated engine step by step and in the final weights."""
    over = tiny("swin") + RUN + SAME_AS_ONE_PROCESS + ["model.swin.drop_path_rate=0.0", "model.rank_sampling=per_rank"]
    space = SPEC.space(load_config("configs/demo_cpu.yaml", over).model.section)
    ranks = [SubnetSampler(space, seed=0, rank=r) for r in (0, 1)]
    assert any(ranks[0].sample(t).depth != ranks[1].sample(t).depth for t in range(8))  # depths differ
    a = train(tmp_path / "ddp", 2, "ddp", *over)
    b = train(tmp_path / "fsdp", 2, "fsdp", *over)
    assert_same_run(a, b)
    assert_same_weights(tmp_path / "ddp", tmp_path / "fsdp")


def test_swin_demo_config_runs_end_to_end_short(tmp_path, capsys):
    """`poa demo --config configs/swin_demo_cpu.yaml`: trains the tiny Swin, extracts 3 sub-networks from
    the teacher and prints their k-NN at init and after training (a few steps here)."""
    over = ["optim.epochs=1", "optim.iters_per_epoch=3", "optim.batch_size=16", "data.n_local=2",
            "data.num_workers=0", "train.progress=false"]
    assert main(["demo", "--config", "configs/swin_demo_cpu.yaml", "--output-dir", str(tmp_path / "demo"), *over]) == 0
    out = capsys.readouterr().out
    assert out.startswith("POA demo: 15 sub-networks")
    lines = [ln for ln in out.splitlines() if "at init ->" in ln]
    assert [ln.split(":")[0] for ln in lines] == ["swin_16x2", "swin_24x4", "swin_32x6"]
