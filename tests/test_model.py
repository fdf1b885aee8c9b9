"""Elastic ViT against an independent float64 reference written from the spec."""

import math

import pytest
import torch
import torch.nn.functional as F

from poa_hpc.models.elastic import ElasticLinear, block_ids
from poa_hpc.models.heads import DINOHead
from poa_hpc.models.vit import ElasticViT, ViTArch, build_vit

ARCH = ViTArch(img_size=16, patch_size=4, in_chans=3, embed_dim=48, depth=5, num_heads=6, mlp_ratio=4.0)


def randomised(arch=ARCH, seed=0) -> ElasticViT:
    """A model whose LayerScales and biases are far from their init so every block matters."""
    torch.manual_seed(seed)
    m = build_vit(arch).double().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(0.3 * torch.randn_like(p)) if ("gamma" in name or "bias" in name or "norm" in name) else None
    return m


def reference_forward(m: ElasticViT, x: torch.Tensor, w: int, d: int) -> torch.Tensor:
    """Spec §1/§0 written out by hand: leading blocks, per-group qkv rows, alpha = max_in / in."""
    sd = {k: v.double() for k, v in m.state_dict().items()}
    D, L, hd = m.arch.embed_dim, m.arch.depth, m.arch.head_dim
    H = 4 * D
    h = 4 * w
    nh = w // hd
    a = D / w
    t = F.conv2d(x, sd["patch_embed.proj.weight"][:w], sd["patch_embed.proj.bias"][:w], stride=m.arch.patch_size)
    t = t.flatten(2).transpose(1, 2)
    B = t.shape[0]
    t = torch.cat([sd["cls_token"][:, :, :w].expand(B, 1, w), t], 1) + sd["pos_embed"][:, :, :w]
    ids = [math.floor(i * (L - 1) / (d - 1)) for i in range(d)] if d > 1 else [0]
    for i in ids:
        p = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}.__getitem__
        y = F.layer_norm(t, (w,), p("norm1.weight")[:w], p("norm1.bias")[:w], 1e-6)
        Wqkv, bqkv = p("attn.qkv.weight"), p("attn.qkv.bias")
        q = (a * y) @ Wqkv[0:w, :w].T + bqkv[0:w]
        k = (a * y) @ Wqkv[D:D + w, :w].T + bqkv[D:D + w]
        v = (a * y) @ Wqkv[2 * D:2 * D + w, :w].T + bqkv[2 * D:2 * D + w]
        split = lambda z: z.reshape(B, -1, nh, hd).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd), -1) @ split(v)
        o = att.transpose(1, 2).reshape(B, -1, w)
        o = (a * o) @ p("attn.proj.weight")[:w, :w].T + p("attn.proj.bias")[:w]
        t = t + p("ls1.gamma")[:w] * o
        y = F.layer_norm(t, (w,), p("norm2.weight")[:w], p("norm2.bias")[:w], 1e-6)
        y = F.gelu((a * y) @ p("mlp.fc1.weight")[:h, :w].T + p("mlp.fc1.bias")[:h])
        y = (H / h * y) @ p("mlp.fc2.weight")[:w, :h].T + p("mlp.fc2.bias")[:w]
        t = t + p("ls2.gamma")[:w] * y
    t = F.layer_norm(t, (w,), sd["norm.weight"][:w], sd["norm.bias"][:w], 1e-6)
    return t[:, 0]


@pytest.mark.parametrize("w,d", [(48, 5), (40, 5), (24, 3), (8, 1), (32, 2), (16, 4)])
def test_elastic_forward_matches_float64_reference(w, d):
    m = randomised()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    got = m(x, width=w, depth=d)
    ref = reference_forward(m, x, w, d)
    assert got.shape == (3, w)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_block_ids_equal_intervals():
    assert block_ids(24, 12) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23]
    assert block_ids(24, 24) == list(range(24))
    assert block_ids(24, 13) == [0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    assert block_ids(6, 3) == [0, 2, 5]
    assert block_ids(5, 1) == [0]
    with pytest.raises(ValueError):
        block_ids(6, 7)


def test_elastic_forward_calls_modules_so_hooks_fire():
    """Sharding wrappers rely on module pre-forward hooks: the elastic branch must trigger them."""
    m = build_vit(ARCH)
    fired = []
    for name, mod in m.named_modules():
        if name:
            mod.register_forward_pre_hook(lambda mod, args, name=name: fired.append(name))
    m(torch.randn(2, 3, 16, 16), width=24, depth=3)
    ids = block_ids(ARCH.depth, 3)
    for i in ids:
        for sub in ("norm1", "attn.qkv", "attn.proj", "ls1", "norm2", "mlp.fc1", "mlp.fc2", "ls2"):
            assert f"blocks.{i}.{sub}" in fired
    assert "patch_embed" in fired and "norm" in fired
    skipped = set(range(ARCH.depth)) - set(ids)
    assert not any(n.startswith(f"blocks.{i}.") for i in skipped for n in fired)


def test_masked_tokens_use_mask_token_slice():
    m = randomised()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 3] = True
    out_masked = m.forward_features(x, masks=masks, width=24, depth=3)["x_norm_patchtokens"]
    out_plain = m.forward_features(x, width=24, depth=3)["x_norm_patchtokens"]
    assert not torch.allclose(out_masked[0], out_plain[0])
    torch.testing.assert_close(out_masked[1], out_plain[1])  # the other image is untouched
    # Replacing the patch's pixels changes nothing once it is masked.
    x2 = x.clone()
    x2[0, :, 0:4, 12:16] = 7.0  # patch index 3 in a 4x4 grid
    torch.testing.assert_close(m.forward_features(x2, masks=masks, width=24, depth=3)["x_norm_patchtokens"], out_masked)


def test_local_crops_interpolate_position_embedding():
    m = randomised()
    out = m.forward_features(torch.randn(2, 3, 8, 8, dtype=torch.float64), width=24, depth=2)
    assert out["x_norm_patchtokens"].shape == (2, 4, 24)


def test_elastic_linear_gradient_lands_in_subblock_only():
    lin = ElasticLinear(6, 4, groups=3)
    x = torch.randn(5, 4, requires_grad=True)
    lin(x, out_features=2).sum().backward()
    g = lin.weight.grad.view(3, 4, 6)
    assert (g[:, :2, :4] != 0).all()
    assert (g[:, 2:, :] == 0).all() and (g[:, :, 4:] == 0).all()
    gb = lin.bias.grad.view(3, 4)
    assert (gb[:, :2] != 0).all() and (gb[:, 2:] == 0).all()
    # alpha = 6 / 4 scales the input: compare with the hand-written projection.
    with torch.no_grad():
        W = lin.weight.view(3, 4, 6)[:, :2, :4].reshape(6, 4)
        b = lin.bias.view(3, 4)[:, :2].reshape(6)
        torch.testing.assert_close(lin(x, 2), (1.5 * x) @ W.T + b)


def test_head_first_layer_is_elastic_and_scaled():
    torch.manual_seed(0)
    head = DINOHead(48, 32, hidden_dim=20, bottleneck_dim=8, nlayers=3).double()
    x = torch.randn(4, 24, dtype=torch.float64)
    fc = head.mlp[0]
    h1 = (2.0 * x) @ fc.weight[:, :24].T + fc.bias
    ref = head.mlp[1:](h1)
    ref = F.normalize(ref, dim=-1)
    v = head.last_layer.weight_v
    ref = ref @ (head.last_layer.weight_g * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), ref)


def test_intact_forward_equals_plain_vit_math():
    """At full width and depth nothing is sliced or scaled."""
    m = randomised()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_forward(m, x, 48, 5))


def test_module_call_returns_features_dict():
    m = randomised()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    feats = m(x, 24, 3, features=True)
    torch.testing.assert_close(feats["x_norm_clstoken"], m(x, 24, 3))
    assert feats["x_norm_patchtokens"].shape == (2, 16, 24)
