"""Heads and losses chunk by chunk equal the unchunked computation: Sinkhorn-Knopp targets, the fused
prototype layer + cross-entropies, and a whole POA step (losses and every gradient) against the step as
it was written before chunking (full logits per head, float64)."""

import pytest
import torch
import torch.nn.functional as F

from poa_hpc.losses import dino_cross_view_loss, ibot_patch_loss, koleo_loss, same_view_loss, sinkhorn_knopp
from poa_hpc.losses.chunked import Group, Logits, SinkhornTargets, Term, head_loss
from poa_hpc.models.subnets import Subnet
from test_losses import sk_reference
from test_meta_arch import batch, floats, make, tiny_cfg

REL = 1e-6


def _zw(rows, k, d=6, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(rows, d, generator=g, dtype=dtype), dim=-1)
    w = torch.randn(k, d, generator=g, dtype=dtype) * scale
    return z, w


@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("chunk", [0, 1, 7, 40])  # one chunk, one row per chunk (K >= 5), a few rows, ...
@pytest.mark.parametrize("rows,k", [(9, 5), (4, 11), (1, 7), (0, 6)])
def test_sinkhorn_targets_equal_the_matrix_form(rows, k, chunk, iters):
    z, w = _zw(rows, k, scale=2.0)
    got = SinkhornTargets(Logits(z, w), 0.04, iters, chunk)()
    ref = sinkhorn_knopp(F.linear(z, w), 0.04, iters)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=REL, atol=1e-12)
    if rows and iters:  # and the authors' unshifted formula, by hand
        torch.testing.assert_close(got, sk_reference(F.linear(z, w).tolist(), 0.04, iters), rtol=REL, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_sinkhorn_targets_fp32_and_row_subsets(scale):
    """fp32 against the float64 formula: as close as the fp32 matrix form at realistic logits (|z| = |W rows| = 1:
    a 50-nat span at temperature 0.04), and closer at a 300-nat span where the matrix form's per-sample
    products underflow (the chunked form takes them in log space)."""
    z, w = _zw(13, 9, dtype=torch.float32, scale=scale)
    exact = sinkhorn_knopp(F.linear(z.double(), w.double()), 0.04, 3)
    sk = SinkhornTargets(Logits(z, w), 0.04, 3, 2 * 9)
    matrix = sinkhorn_knopp(F.linear(z, w), 0.04, 3)
    err, err_matrix = (sk().double() - exact).abs().max(), (matrix.double() - exact).abs().max()
    assert err <= max(2 * err_matrix, 2e-6)
    idx = torch.tensor([12, 0, 5])
    torch.testing.assert_close(sk(idx), sk()[idx], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sk(slice(3, 8)), sk()[3:8], rtol=1e-6, atol=1e-7)


def _head_reference(z, w, t_cls, t_patch, sv_z, B, n_local, masks_weight, n_images, tau, sv_tau, coefs):
    """The unchunked terms on full logits with the reference loss functions (autograd does the gradients)."""
    logits = F.linear(z, w)
    n_g, n_l = 2 * B, n_local * B
    g, l, p = logits[:n_g], logits[n_g:n_g + n_l], logits[n_g + n_l:]
    dino = dino_cross_view_loss(g, l if n_l else None, t_cls, tau)
    ibot = ibot_patch_loss(p, t_patch, masks_weight, n_images, tau)
    sv_logits = F.linear(sv_z, w).detach()
    sv = same_view_loss(sv_logits[:n_g], g, sv_tau)
    if n_l:
        sv = sv + same_view_loss(sv_logits[n_g:], l, sv_tau)
    loss = coefs[0] * dino + coefs[1] * ibot + coefs[2] * sv
    return loss, torch.stack([dino, ibot, sv])


@pytest.mark.parametrize("chunk", [0, 1, 30])
@pytest.mark.parametrize("n_local,n_patch", [(2, 5), (0, 3), (1, 0)])
def test_fused_head_loss_equals_autograd_on_full_logits(chunk, n_local, n_patch):
    B, K, tau, sv_tau = 3, 10, 0.1, 0.07
    coefs = (0.4, 0.3, 0.2)
    n_rows = 2 * B + n_local * B + n_patch
    z, w = _zw(n_rows, K, seed=1, scale=3.0)
    sv_z, _ = _zw(2 * B + n_local * B, K, seed=2)
    tz, tw = _zw(2 * B + n_patch, K, seed=3, scale=3.0)
    t_cls = sinkhorn_knopp(F.linear(tz[:2 * B], tw), 0.04, 3)
    sk_patch = SinkhornTargets(Logits(tz[2 * B:], tw), 0.04, 3, chunk)
    masks_weight = torch.rand(n_patch, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.1
    n_images = 2 * B

    zr, wr = z.clone().requires_grad_(), w.clone().requires_grad_()
    ref_loss, ref_values = _head_reference(zr, wr, t_cls, sk_patch(), sv_z, B, n_local, masks_weight, n_images,
                                           tau, sv_tau, coefs)
    ref_loss.backward()

    n_terms = 2 + 2 * n_local
    swapped = torch.cat([t_cls[B:], t_cls[:B]])
    both = t_cls[:B] + t_cls[B:]
    sv_src = Logits(sv_z, w)
    n_g, n_l = 2 * B, n_local * B
    glob = Group(0, n_g, [Term(0, lambda p: swapped[p], 1.0 / (n_terms * B), tau, coefs[0]),
                          Term(2, lambda p: F.softmax(sv_src(p) / sv_tau, -1), 1.0 / n_g, sv_tau, coefs[2])])
    groups = [glob]
    if n_l:
        groups.append(Group(n_g, n_l, [
            Term(0, lambda p: both[torch.arange(p.start, p.stop) % B], 1.0 / (n_terms * B), tau, coefs[0]),
            Term(2, lambda p: F.softmax(sv_src(slice(n_g + p.start, n_g + p.stop)) / sv_tau, -1), 1.0 / n_l, sv_tau,
                 coefs[2])]))
    groups.append(Group(n_g + n_l, n_patch, [Term(1, sk_patch, masks_weight / n_images, tau, coefs[1])]))
    zc, wc = z.clone().requires_grad_(), w.clone().requires_grad_()
    loss, values = head_loss(zc, wc, groups, 3, chunk)
    loss.backward()
    assert not values.requires_grad
    torch.testing.assert_close(values, ref_values, rtol=REL, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=REL, atol=1e-12)
    torch.testing.assert_close(zc.grad, zr.grad, rtol=REL, atol=1e-12)
    torch.testing.assert_close(wc.grad, wr.grad, rtol=REL, atol=1e-12)


def _reference_step(m, b, sub, temp, ibot):
    """The POA step as written before chunking: every head's full logits, Sinkhorn-Knopp on the matrix,
    the reference loss functions, autograd.  Returns the loss terms; gradients land in the student."""
    lc = m.cfg.loss
    lam, n_heads = lc.lam, len(m.cfg.head.prototypes)
    gc, loc = b["global_crops"], b["local_crops"]
    masks, mi, mw = b["masks"], b["mask_indices"], b["masks_weight"]

    def branch(br, width, depth, students):
        g = br.backbone(gc, width, depth, masks=masks if (ibot and students) else None, features=True)
        parts = {"global": g["x_norm_clstoken"]}
        if students:
            parts["local"] = br.backbone(loc, width, depth)
        if ibot:
            parts["patch"] = g["x_norm_patchtokens"].flatten(0, 1)[mi]
        return g["x_norm_clstoken"], [{k: h(v) for k, v in parts.items()} for h in br.heads]

    with torch.no_grad():
        _, tl = branch(m.teacher, None, None, False)
        targets = [{"cls": sinkhorn_knopp(h["global"], temp, lc.sinkhorn_iters),
                    "patch": sinkhorn_knopp(h["patch"], temp, lc.sinkhorn_iters) if ibot else None} for h in tl]

    def losses(cls, logits, intact=None):
        dino = ib = sv = 0.0
        for i, (lg, tg) in enumerate(zip(logits, targets)):
            dino = dino + dino_cross_view_loss(lg["global"], lg["local"], tg["cls"], lc.student_temp) / n_heads
            if ibot:
                ib = ib + ibot_patch_loss(lg["patch"], tg["patch"], mw, masks.shape[0], lc.student_temp) / n_heads
            if intact is not None:
                sv = sv + (same_view_loss(intact[i]["global"], lg["global"], lc.same_view_temp)
                           + same_view_loss(intact[i]["local"], lg["local"], lc.same_view_temp)) / n_heads
        koleo = sum(koleo_loss(c) for c in cls.chunk(2))
        return dino, ib, sv, koleo

    cls, il = branch(m.student, m.intact.width, m.intact.depth, True)
    d, i, _, k = losses(cls, il)
    loss_i = lam * (d + lc.ibot_weight * i) + lc.koleo_weight * k / 2
    loss_i.backward()
    out = {"intact/dino": d, "intact/koleo": k, **({"intact/ibot": i} if ibot else {})}
    il = [{k2: v.detach() for k2, v in h.items()} for h in il]
    cls, el = branch(m.student, sub.width, sub.depth, True)
    d, i, sv, k = losses(cls, el, il)
    loss_e = (1 - lam) * (d + lc.ibot_weight * i) + lc.same_view_weight * sv + lc.koleo_weight * k / 2
    loss_e.backward()
    out.update({"elastic/dino": d, "elastic/koleo": k, "elastic/same_view": sv, **({"elastic/ibot": i} if ibot else {})})
    out["loss"] = loss_i + loss_e
    return {key: float(v.detach() if isinstance(v, torch.Tensor) else v) for key, v in out.items()}


@pytest.mark.parametrize("chunk", [0, 1, 50])
@pytest.mark.parametrize("ibot", [True, False])
def test_step_equals_the_unchunked_step_losses_and_gradients(chunk, ibot):
    cfg = tiny_cfg("head.prototypes=[16,24]", f"loss.chunk_elements={chunk}")
    sub = Subnet(16, 3)
    ref_model, new_model = make(cfg).double(), make(cfg).double()
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in batch().items()}
    ref = _reference_step(ref_model, b, sub, 0.04, ibot)
    got = floats(new_model.forward_backward(b, sub, 0.04, ibot=ibot))
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=REL, abs=1e-12), key
    for (name, p), q in zip(ref_model.student.named_parameters(), new_model.student.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=REL, atol=1e-12, msg=name)


@pytest.mark.parametrize("iters", [3, 30, 100, pytest.param(1000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_targets_hold_at_any_number_of_rounds(dtype, iters):
    """Chunked (SinkhornTargets, one chunk and 5-row chunks) and dense fp32 targets against the dense float64
    `sinkhorn_knopp` of the same logits, up to 1,000 rounds.

    The per-prototype log-scales used to grow by ~log(K / rows) a round (unbounded): right at 30 rounds,
    off by 0.15 at 100 in fp32.  Tolerance, by hand: every argument of the targets' softmax
    (s - shift + log r, |s| <= 1 / 0.04 = 25 for unit z and W rows, the shift as large, the centred log r a few
    nats, the per-sample log-sum-exp about as large) carries an fp32 rounding error of at most about
    (25 + 25 + 5 + 10) * 2 ulp ~ 8e-6 nats; a softmax turns an argument error d into a relative error <= 2 d,
    so 1.6e-5 relative per target, rounded up to 2e-5.  bf16 logits change nothing: both sides get the same
    bf16 values and the computation is in fp32.  Sinkhorn's rounds contract towards their fixed point, so
    earlier rounds' rounding is damped, not accumulated: the bound does not grow with the rounds."""
    g = torch.Generator().manual_seed(1)
    K = 300
    z = F.normalize(torch.randn(64, 16, generator=g), dim=-1).to(dtype)
    w = F.normalize(torch.randn(K, 16, generator=g), dim=-1).to(dtype)
    logits = Logits(z, w)
    ref = sinkhorn_knopp(logits().double(), 0.04, iters)
    for got in (SinkhornTargets(logits, 0.04, iters, 0)(), SinkhornTargets(logits, 0.04, iters, 5 * K)()):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-30)
    # The dense fp32 matrix form divides every entry in place 4 times a round; those roundings (<= 2^-24
    # relative each) are the entry's own, which no row or column normalisation corrects, so they add up:
    # at most 4 * iters * 2^-24 on top (measured: 6.6e-5 at 1,000 rounds; the chunked form recomputes the
    # targets from the scores and carries only the K + B factors, so it does not accumulate).
    dense = sinkhorn_knopp(logits(), 0.04, iters)
    torch.testing.assert_close(dense.double(), ref, rtol=2e-5 + 4 * iters * 2.0 ** -24, atol=1e-30)
    sk = SinkhornTargets(logits, 0.04, iters, 5 * K)
    assert sk.log_r.amax() == 0 and sk.log_r.amin() > -2 / 0.04  # bounded by the scores' span
