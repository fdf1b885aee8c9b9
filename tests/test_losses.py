"""Each loss against an independent float64 computation on tiny tensors."""

import math

import pytest
import torch

from poa_hpc.losses import (
    cross_entropy,
    dino_cross_view_loss,
    ibot_patch_loss,
    koleo_loss,
    same_view_loss,
    sinkhorn_knopp,
)


def sk_reference(logits, temp, iters, shift=True):
    """Sinkhorn-Knopp as DINOv2, float64 nested Python arithmetic; ``shift`` subtracts each sample's max."""
    B, K = len(logits), len(logits[0])
    m = [max(row) / temp if shift else 0.0 for row in logits]
    Q = [[math.exp(logits[b][k] / temp - m[b]) for b in range(B)] for k in range(K)]  # K x B
    tot = sum(map(sum, Q))
    Q = [[q / tot for q in row] for row in Q]
    for _ in range(iters):
        Q = [[q / sum(row) / K for q in row] for row in Q]
        cols = [sum(Q[k][b] for k in range(K)) for b in range(B)]
        Q = [[Q[k][b] / cols[b] / B for b in range(B)] for k in range(K)]
    return torch.tensor([[Q[k][b] * B for k in range(K)] for b in range(B)], dtype=torch.float64)


def test_sinkhorn_matches_reference_formula():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64)
    got = sinkhorn_knopp(logits, 0.5, 3)
    torch.testing.assert_close(got, sk_reference(logits.tolist(), 0.5, 3), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.sum(1), torch.ones(5, dtype=torch.float64))
    # fp32 input is computed in fp32
    torch.testing.assert_close(sinkhorn_knopp(logits.float(), 0.5, 3).double(), got, rtol=1e-5, atol=1e-6)


def test_sinkhorn_shift_keeps_the_fixed_point():
    """The per-sample shift is absorbed by the normalisation: same limit as the unshifted formula."""
    torch.manual_seed(5)
    logits = torch.randn(4, 6, dtype=torch.float64)
    limit = sk_reference(logits.tolist(), 0.5, 300, shift=False)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.5, 300), limit, rtol=1e-9, atol=1e-12)
    # marginals of the limit: every sample sums to 1, every prototype to B/K
    torch.testing.assert_close(limit.sum(0), torch.full((6,), 4 / 6, dtype=torch.float64))


def test_sinkhorn_large_logits_do_not_overflow():
    logits = torch.tensor([[30.0, -30.0, 0.0], [29.0, 1.0, -5.0]])
    q = sinkhorn_knopp(logits, 0.04, 3)  # exp(750) overflows without the shift
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(2))


def ce(p, s, tau):
    return -sum(pk * math.log(math.exp(sk / tau) / sum(math.exp(x / tau) for x in s)) for pk, sk in zip(p, s))


def test_dino_cross_view_loss_pairs_and_normalisation():
    torch.manual_seed(1)
    B, K, n_local, tau = 3, 4, 2, 0.1
    t = torch.softmax(torch.randn(2 * B, K, dtype=torch.float64), -1)
    sg = torch.randn(2 * B, K, dtype=torch.float64)
    sl = torch.randn(n_local * B, K, dtype=torch.float64)
    got = dino_cross_view_loss(sg, sl, t, tau)
    T, S, L = t.tolist(), sg.tolist(), sl.tolist()
    terms = []
    for a in range(2):  # teacher view a -> student global view b != a
        b = 1 - a
        terms.append(sum(ce(T[a * B + i], S[b * B + i], tau) for i in range(B)) / B)
    for a in range(2):
        for v in range(n_local):
            terms.append(sum(ce(T[a * B + i], L[v * B + i], tau) for i in range(B)) / B)
    assert len(terms) == 2 + 2 * n_local
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)


def test_dino_cross_view_is_not_same_view():
    """Swapping the direction (teacher view a -> student view a) gives a different number."""
    torch.manual_seed(2)
    t = torch.softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    s = torch.randn(4, 5, dtype=torch.float64)
    same = cross_entropy(t, s, 0.1).mean()
    assert dino_cross_view_loss(s, None, t, 0.1).item() != pytest.approx(same.item())


def test_same_view_loss_value_and_stop_gradient():
    torch.manual_seed(3)
    intact = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    elastic = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    loss = same_view_loss(intact, elastic, 0.1)
    I, E = intact.tolist(), elastic.tolist()
    ref = sum(ce([math.exp(x / 0.1) / sum(math.exp(y / 0.1) for y in I[i]) for x in I[i]], E[i], 0.1) for i in range(4)) / 4
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    loss.backward()
    assert intact.grad is None  # the intact output is a target only
    assert elastic.grad is not None and elastic.grad.abs().sum() > 0


def test_ibot_patch_loss_per_image_average():
    torch.manual_seed(4)
    K, tau = 3, 0.1
    # 3 images: image 0 has 2 masked patches, image 1 has 1, image 2 none.
    s = torch.randn(3, K, dtype=torch.float64)
    t = torch.softmax(torch.randn(3, K, dtype=torch.float64), -1)
    w = torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)
    got = ibot_patch_loss(s, t, w, n_images=3, student_temp=tau)
    S, T = s.tolist(), t.tolist()
    img0 = (ce(T[0], S[0], tau) + ce(T[1], S[1], tau)) / 2
    img1 = ce(T[2], S[2], tau)
    assert got.item() == pytest.approx((img0 + img1 + 0.0) / 3, rel=1e-10)


def test_koleo_hand_computed():
    # Unit vectors at angles 0, 90 and 100 degrees; nearest neighbours 0->1, 1->2, 2->1.
    ang = [0.0, math.pi / 2, math.radians(100)]
    x = torch.tensor([[math.cos(a), math.sin(a)] for a in ang], dtype=torch.float64) * 3.0  # scale: normalised away
    d01 = 2 * math.sin(math.pi / 4)
    d12 = 2 * math.sin(math.radians(10) / 2)
    ref = -(math.log(d01 + 1e-8) + 2 * math.log(d12 + 1e-8)) / 3
    assert koleo_loss(x).item() == pytest.approx(ref, rel=1e-6)


def test_koleo_gradient_spreads_points():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]], requires_grad=True)
    koleo_loss(x).backward()
    # Moving the two close points apart lowers the loss: their gradients point towards each other.
    d = x[0] - x[1]
    assert (x.grad[0] @ d).item() < 0 or (x.grad[1] @ -d).item() < 0
