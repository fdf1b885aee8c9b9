"""Triton sliced-projection kernels against the torch reference, in float64 (interpreter on CPU)."""

import os

import pytest
import torch

from poa_hpc.kernels.sliced_linear import sliced_linear

triton_mod = pytest.importorskip("poa_hpc.kernels.sliced_linear_triton")
sliced_linear_triton = triton_mod.sliced_linear_triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)


def check(M, in_f, max_in, out_f, max_out, groups, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, in_f, dtype=torch.float64, generator=g).to(DEV).requires_grad_()
    W = torch.randn(groups * max_out, max_in, dtype=torch.float64, generator=g).to(DEV).requires_grad_()
    b = torch.randn(groups * max_out, dtype=torch.float64, generator=g).to(DEV).requires_grad_() if bias else None
    alpha = max_in / in_f
    dy = torch.randn(M, groups * out_f, dtype=torch.float64, generator=g).to(DEV)
    args = [x, W] + ([b] if bias else [])
    y = sliced_linear_triton(x, W, b, out_f, in_f, alpha, groups)
    got = torch.autograd.grad(y, args, dy)
    ref_y = sliced_linear(x, W, b, out_f, in_f, alpha, groups)
    ref = torch.autograd.grad(ref_y, args, dy)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
    return got


@pytest.mark.parametrize("M,in_f,max_in,out_f,max_out,groups", [
    (37, 50, 72, 33, 48, 1),  # nothing a multiple of a block size
    (37, 50, 72, 33, 48, 3),  # qkv: three row blocks
    (3, 72, 72, 48, 48, 3),  # full width through the kernel
    (129, 17, 100, 5, 7, 1),
])
def test_matches_reference_odd_shapes(M, in_f, max_in, out_f, max_out, groups):
    check(M, in_f, max_in, out_f, max_out, groups)
    check(M, in_f, max_in, out_f, max_out, groups, bias=False, seed=1)


def test_gradient_only_in_the_subblock_and_accumulates():
    gx, gW, gb = check(9, 40, 64, 24, 32, groups=3)
    gW = gW.view(3, 32, 64)
    assert (gW[:, 24:] == 0).all() and (gW[:, :, 40:] == 0).all() and (gW[:, :24, :40] != 0).all()
    gb = gb.view(3, 32)
    assert (gb[:, 24:] == 0).all() and (gb[:, :24] != 0).all()
    # Two uses of one weight (intact + elastic branch) add their gradients in weight.grad.
    W = torch.randn(64, 64, dtype=torch.float64, device=DEV, requires_grad=True)
    x1 = torch.randn(5, 64, dtype=torch.float64, device=DEV)
    x2 = torch.randn(5, 32, dtype=torch.float64, device=DEV)
    (sliced_linear_triton(x1, W, None, 64, 64).sum() + sliced_linear_triton(x2, W, None, 16, 32, 2.0).sum()).backward()
    W2 = W.detach().clone().requires_grad_()
    (torch.nn.functional.linear(x1, W2).sum() + sliced_linear(x2, W2, None, 16, 32, 2.0).sum()).backward()
    torch.testing.assert_close(W.grad, W2.grad)


@pytest.mark.parametrize("width", list(range(384, 1025, 64)))
def test_vit_ladder_qkv(width):
    """Every elastic width of the ViT-S..L ladder, on the fused qkv weight of ViT-L (few tokens)."""
    check(4, width, 1024, width, 1024, groups=3, seed=width)


@pytest.mark.parametrize("width", [384, 1024])
def test_vit_ladder_fc2(width):
    check(3, 4 * width, 4096, width, 1024, groups=1, seed=width)


def test_elastic_model_with_triton_backend_equals_torch():
    from poa_hpc.models.vit import ViTArch, build_vit

    arch = ViTArch(img_size=16, patch_size=4, embed_dim=48, depth=3, num_heads=6)
    torch.manual_seed(0)
    ref = build_vit(arch).double().to(DEV)
    tri = build_vit(arch, linear_backend="triton").double().to(DEV)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, device=DEV)
    torch.testing.assert_close(tri(x, 24, 2), ref(x, 24, 2), rtol=1e-9, atol=1e-9)
    tri(x, 24, 2).sum().backward()
    ref(x, 24, 2).sum().backward()
    for (n, a), (_, b) in zip(tri.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9, msg=n)


def test_bad_shapes_are_clear_errors():
    W = torch.randn(12, 8, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="expected 8"):
        sliced_linear_triton(torch.randn(2, 6, dtype=torch.float64, device=DEV), W, None, 4, 8)
    with pytest.raises(ValueError, match="cannot take"):
        sliced_linear_triton(torch.randn(2, 8, dtype=torch.float64, device=DEV), W, None, 5, 8, groups=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width,groups,max_out", [(384, 3, 1024), (704, 1, 4096), (1024, 3, 1024)])
def test_autotuned_half_precision_on_gpu(dtype, width, groups, max_out):
    """bf16/fp16 kernels (autotuned tiles, fp32 accumulation) against the fp32 torch reference."""
    g = torch.Generator(device="cuda").manual_seed(width)
    x = torch.randn(50 * 197, width, device="cuda", generator=g).to(dtype).requires_grad_()
    W = (torch.randn(groups * max_out, 1024, device="cuda", generator=g) * 0.02).to(dtype).requires_grad_()
    b = torch.randn(groups * max_out, device="cuda", generator=g).to(dtype).requires_grad_()
    alpha = 1024 / width
    y = sliced_linear_triton(x, W, b, width, width, alpha, groups)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, W, b), dy)
    ref_args = [t.detach().float().requires_grad_() for t in (x, W, b)]
    ref_y = sliced_linear(*ref_args, width, width, alpha, groups)
    ref = torch.autograd.grad(ref_y, ref_args, dy.float())
    torch.testing.assert_close(y.float(), ref_y, rtol=2e-2, atol=2e-2)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.float(), r, rtol=2e-2, atol=5e-2 * r.abs().max().item())
