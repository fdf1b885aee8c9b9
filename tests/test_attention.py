"""The attention seam: every backend agrees with the math reference, at full and elastic widths."""

import logging

import pytest
import torch

from poa_hpc.models import ops
from poa_hpc.models.vit import ViTArch, build_vit


def reference(q, k, v):
    """float64 softmax(q k^T / sqrt(d)) v, written out."""
    q, k, v = (t.double() for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return w @ v


@pytest.mark.parametrize("heads,n", [(6, 197), (16, 37), (1, 5)])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cpu_backends_match_reference(backend, heads, n):
    g = torch.Generator().manual_seed(heads * n)
    q, k, v = (torch.randn(2, heads, n, 64, generator=g) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v, backend).double(), reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_xformers_on_cpu_falls_back_with_one_log_line(caplog):
    ops._fallback_said.clear()
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="poa_hpc.ops"):
        out1 = ops.attention(q, k, v, "xformers")
        out2 = ops.attention(q, k, v, "xformers")
    lines = [r for r in caplog.records if "xformers" in r.getMessage()]
    assert len(lines) == 1 and "SDPA" in lines[0].getMessage()
    torch.testing.assert_close(out1, reference(q, k, v).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1, out2)


def test_unknown_backend_is_a_clear_error():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="model.attention"):
        ops.attention(q, q, q, "flash9")


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_elastic_model_same_for_every_backend(backend):
    """The elastic ViT (fewer heads at smaller widths) gives the same features with each backend."""
    arch = ViTArch(img_size=16, patch_size=4, embed_dim=48, depth=3, num_heads=6)
    torch.manual_seed(0)
    ref = build_vit(arch, attn_backend="math").eval()
    other = build_vit(arch, attn_backend=backend).eval()
    other.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for w, d in [(48, 3), (24, 2), (8, 1)]:
            torch.testing.assert_close(other(x, w, d), ref(x, w, d), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
@pytest.mark.parametrize("heads", [6, 12, 16])
def test_gpu_backends_bf16(backend, heads):
    if backend == "xformers":
        pytest.importorskip("xformers")
    q, k, v = (torch.randn(8, heads, 197, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = ops.attention(q, k, v, backend)
    torch.testing.assert_close(out.double(), reference(q, k, v), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["sdpa", "math", "xformers"])
def test_additive_bias_matches_reference_with_its_gradient(backend):
    """Swin's relative position bias plus shift mask: an additive score bias that is learned (its gradient
    flows back through every backend; xformers on the CPU or with a bias runs SDPA)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, 4, 49, 16, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn(1, 4, 49, 49, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(6, 1, 49, 49, dtype=torch.float64)
    mask[::2, :, :20, 20:] = -100.0
    bias = table + mask
    got = ops.attention(q, k, v, backend, bias=bias)
    w = torch.softmax(q @ k.transpose(-1, -2) / 4.0 + bias, dim=-1)
    torch.testing.assert_close(got, w @ v, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(got)
    (g_got,) = torch.autograd.grad(got, table, dy)
    (g_ref,) = torch.autograd.grad(w @ v, table, dy)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["sdpa", "math", "xformers"])
def test_empty_batch_gives_the_bias_a_zero_gradient(backend):
    """A skipped block runs on an empty batch (sharded engines' collective alignment); its learned bias
    must still get a gradient (zeros), as every other parameter does, on every backend."""
    q = torch.randn(0, 2, 9, 8, requires_grad=True)
    table = torch.randn(1, 2, 9, 9, requires_grad=True)
    out = ops.attention(q, q, q, backend, bias=table)
    assert out.shape == (0, 2, 9, 8)
    (0.0 * out.sum()).backward()
    assert table.grad is not None and (table.grad == 0).all()
