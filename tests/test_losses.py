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


def sk_reference(logits, temp, iters):
    """Sinkhorn-Knopp exactly as the authors / DINOv2 write it (no shift), float64 nested Python arithmetic."""
    B, K = len(logits), len(logits[0])
    Q = [[math.exp(logits[b][k] / temp) for b in range(B)] for k in range(K)]  # K x B
    tot = sum(map(sum, Q))
    Q = [[q / tot for q in row] for row in Q]
    for _ in range(iters):
        Q = [[q / sum(row) / K for q in row] for row in Q]
        cols = [sum(Q[k][b] for k in range(K)) for b in range(B)]
        Q = [[Q[k][b] / cols[b] / B for b in range(B)] for k in range(K)]
    return torch.tensor([[Q[k][b] * B for k in range(K)] for b in range(B)], dtype=torch.float64)


def _lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def sk_reference_log(logits, temp, iters):
    """The same unshifted formula in log space (float64, hand-written logsumexp): finite where exp overflows."""
    B, K = len(logits), len(logits[0])
    L = [[logits[b][k] / temp for k in range(K)] for b in range(B)]  # B x K, log Q
    tot = _lse([x for row in L for x in row])
    L = [[x - tot for x in row] for row in L]
    for _ in range(iters):
        proto = [_lse([L[b][k] for b in range(B)]) for k in range(K)]
        L = [[L[b][k] - proto[k] - math.log(K) for k in range(K)] for b in range(B)]
        L = [[x - _lse(row) - math.log(B) for x in row] for row in L]
    return torch.tensor([[math.exp(x) * B for x in row] for row in L], dtype=torch.float64)


# (B, K): fewer samples than prototypes, more, equal, a single sample.
SHAPES = [(5, 7), (3, 16), (16, 5), (6, 6), (1, 9)]


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("B,K", SHAPES)
@pytest.mark.parametrize("temp", [0.5, 0.04])
def test_sinkhorn_equals_the_unshifted_formula_at_finite_iterations(B, K, temp, iters):
    """1 and 3 rounds equal the authors' unshifted formula, not only its many-round limit.

    Logits in +-1 at temperature 0.04 (the paper's teacher temperature) span 50 nats per
    prototype: a shift that the first per-prototype normalisation does not cancel (e.g.
    each sample's max) leaves differences of order 0.1 here.
    """
    torch.manual_seed(B * 100 + K)
    logits = torch.rand(B, K, dtype=torch.float64) * 2 - 1
    ref = sk_reference(logits.tolist(), temp, iters)
    got = sinkhorn_knopp(logits, temp, iters)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.sum(1), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-12)
    # the two references agree with each other (the log-space one is used where exp overflows)
    torch.testing.assert_close(sk_reference_log(logits.tolist(), temp, iters), ref, rtol=1e-12, atol=1e-12)


def test_sinkhorn_fp32_input_is_computed_in_fp32():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64)
    got = sinkhorn_knopp(logits.float(), 0.5, 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), sk_reference(logits.tolist(), 0.5, 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("B,K", [(4, 6), (12, 5)])
def test_sinkhorn_overflowing_logits_match_the_log_space_formula(B, K, iters):
    """fp32 logits around 30 at temperature 0.04: exp(750) overflows the unshifted formula."""
    torch.manual_seed(7 + B)
    logits = (30.0 + torch.rand(B, K) * 2 - 1).float()
    logits[0, 0] = -30.0  # one entry far below its prototype's max: exp underflows to 0 there
    assert not torch.isfinite(torch.exp(logits / 0.04)).all()  # the authors' form would give inf / NaN
    got = sinkhorn_knopp(logits, 0.04, iters)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(1), torch.ones(B), rtol=0, atol=1e-5)
    ref = sk_reference_log(logits.double().tolist(), 0.04, iters)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_sinkhorn_overflowing_mixed_signs():
    logits = torch.tensor([[30.0, -30.0, 0.0], [29.0, 1.0, -5.0]])
    q = sinkhorn_knopp(logits, 0.04, 3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(2))
    torch.testing.assert_close(q.double(), sk_reference_log(logits.double().tolist(), 0.04, 3), rtol=1e-4, atol=1e-6)


def test_sinkhorn_zero_iterations_and_no_rows():
    torch.manual_seed(1)
    logits = torch.rand(4, 5, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.04, 0), sk_reference(logits.tolist(), 0.04, 0),
                               rtol=1e-12, atol=1e-12)
    assert sinkhorn_knopp(torch.empty(0, 5), 0.04, 3).shape == (0, 5)


def _sk_ranks(rank, world, store, cases, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        got = []
        for logits, temp, iters in cases:
            rows = logits[rank]
            got.append(sinkhorn_knopp(rows, temp, iters))
        torch.save(got, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_two_ranks_equal_one_rank_on_the_concatenated_rows(tmp_path):
    """Real 2-process gloo group: the shift is the max over ALL ranks' rows, so the split does not matter.

    A per-rank max would scale each rank's columns of a prototype differently, which no
    normalisation cancels.  Includes a rank with no rows (as a rank without masked patches).
    """
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)

    def rand(b, k, dtype=torch.float64, offset=0.0):
        return (torch.rand(b, k, generator=g, dtype=dtype) * 2 - 1 + offset).to(dtype)

    cases = [
        ([rand(3, 7), rand(5, 7)], 0.04, 3),  # unequal split, B > K
        ([rand(2, 9), rand(2, 9)], 0.04, 1),  # B < K
        ([rand(0, 6), rand(5, 6)], 0.04, 3),  # rank 0 holds no row
        ([rand(4, 6), rand(0, 6)], 0.1, 1),  # rank 1 holds no row
        ([rand(0, 6), rand(0, 6)], 0.04, 3),  # no row anywhere
        ([rand(3, 5, torch.float32, 30.0), rand(4, 5, torch.float32, 30.0)], 0.04, 3),  # overflowing fp32
    ]
    out = tmp_path / "q"
    mp.spawn(_sk_ranks, args=(2, str(tmp_path / "store"), cases, str(out)), nprocs=2, join=True)
    per_rank = [torch.load(f"{out}.{r}") for r in range(2)]
    for i, (logits, temp, iters) in enumerate(cases):
        got = torch.cat([per_rank[0][i], per_rank[1][i]])
        one = sinkhorn_knopp(torch.cat(logits), temp, iters)
        assert got.shape == one.shape and got.dtype == one.dtype, i
        tol = 1e-12 if one.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(got, one, rtol=tol, atol=tol, msg=f"case {i}")
        if one.shape[0] and one.dtype == torch.float64:
            torch.testing.assert_close(got, sk_reference(torch.cat(logits).tolist(), temp, iters),
                                       rtol=1e-12, atol=1e-12, msg=f"case {i}")


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
