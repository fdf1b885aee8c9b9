"""The linear probe and the Pareto front of the evaluation of every size."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from poa_hpc.eval.linear import cosine_lr, linear_probe, probe_features
from poa_hpc.eval.pareto import pareto_front


# ------------------------------------------------------------------ linear probe
def _clusters(n, centers, noise, gen):
    """Balanced classes: n // C points per class around its centre."""
    C, D = centers.shape
    y = torch.arange(C).repeat_interleave(n // C)
    return centers[y] + noise * torch.randn(len(y), D, generator=gen), y


def test_linear_probe_separates_a_linearly_separable_set():
    gen = torch.Generator().manual_seed(0)
    C, D = 8, 24
    centers = 3.0 * F.normalize(torch.randn(C, D, generator=gen), dim=1)
    xtr, ytr = _clusters(800, centers, 0.25, gen)
    xva, yva = _clusters(400, centers, 0.25, gen)
    # separable indeed: the nearest centre classifies every point (a linear rule, as centres have equal norms)
    for x, y in ((xtr, ytr), (xva, yva)):
        assert torch.equal(torch.cdist(x, centers).argmin(1), y)
    res = linear_probe(xtr, ytr, xva, yva, C, epochs=30)
    assert res.top1 == 100.0
    assert res.lr in res.per_lr and res.per_lr[res.lr] == res.top1
    assert res.weight.shape == (D, C) and res.bias.shape == (C,)


def test_linear_probe_is_at_chance_on_shuffled_labels():
    gen = torch.Generator().manual_seed(1)
    C, D = 5, 24
    centers = 3.0 * F.normalize(torch.randn(C, D, generator=gen), dim=1)
    xtr, ytr = _clusters(2000, centers, 0.25, gen)
    xva, yva = _clusters(1000, centers, 0.25, gen)
    assert linear_probe(xtr, ytr, xva, yva, C, epochs=20).top1 == 100.0  # the same set with its labels...
    ytr_s = ytr[torch.randperm(len(ytr), generator=gen)]
    yva_s = yva[torch.randperm(len(yva), generator=gen)]
    res = linear_probe(xtr, ytr_s, xva, yva_s, C, epochs=20)  # ...and with shuffled ones: nothing to learn
    assert 100 / C - 6 < res.top1 < 100 / C + 6, res.per_lr  # chance is 20 %; best of 5 lrs on 1,000 images


def test_linear_probe_is_momentum_sgd_with_cosine_decay():
    """One learning rate without standardisation equals nn.Linear + torch.optim.SGD(momentum=0.9) on the
    same mini-batches (same seed: initial weight drawn first, then one permutation per epoch)."""
    gen = torch.Generator().manual_seed(2)
    n, D, C, bs, epochs, lr = 150, 7, 4, 32, 3, 0.3
    x, y = torch.randn(n, D, generator=gen), torch.randint(0, C, (n,), generator=gen)
    res = linear_probe(x, y, x[:10], y[:10], C, lrs=[lr], epochs=epochs, batch_size=bs, seed=5, standardized=False)

    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(D, C)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(D, C, generator=g) * 0.01).t())
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9)
    steps, t = epochs * math.ceil(n / bs), 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, bs):
            i = perm[s : s + bs]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
            opt.zero_grad()
            F.cross_entropy(lin(x[i]), y[i]).backward()
            opt.step()
            t += 1
    torch.testing.assert_close(res.weight, lin.weight.detach().t(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.bias, lin.bias.detach(), rtol=1e-4, atol=1e-6)
    assert cosine_lr(2.0, 0, 10) == 2.0 and cosine_lr(2.0, 5, 10) == pytest.approx(1.0)


def test_linear_probe_deterministic_in_its_seed():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 10, generator=gen), torch.randint(0, 3, (300,), generator=gen)
    a = linear_probe(x, y, x, y, 3, epochs=3, seed=0)
    b = linear_probe(x, y, x, y, 3, epochs=3, seed=0)
    c = linear_probe(x, y, x, y, 3, epochs=3, seed=1)
    assert torch.equal(a.weight, b.weight) and a.per_lr == b.per_lr
    assert not torch.equal(a.weight, c.weight)


def test_probe_features_concatenate_cls_and_mean_patch_tokens():
    cls, patches = torch.randn(2, 3), torch.randn(2, 5, 3)
    f = probe_features({"x_norm_clstoken": cls, "x_norm_patchtokens": patches})
    assert torch.equal(f[:, :3], cls) and torch.allclose(f[:, 3:], patches.sum(1) / 5)


# ------------------------------------------------------------------ Pareto front
def test_pareto_front_hand_made_points():
    #        0    1    2    3    4    5    6    7
    cost = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 0.5, 4.0]
    acc = [50., 60., 55., 58., 70., 70., 40., 70.]
    # 0.5/40 and 1/50 are the two cheapest and best so far; 2/55 loses to 2/60; 3/58 to 2/60;
    # 4/70 (twice: a duplicate) beats everything below it; 5/70 costs more for the same accuracy.
    assert pareto_front(cost, acc) == [6, 0, 1, 4, 7]
    assert pareto_front([], []) == []
    assert pareto_front([1.0, float("nan"), 2.0], [1.0, 9.0, float("nan")]) == [0]


def test_pareto_front_equals_the_definition_on_random_points():
    rnd = random.Random(0)
    for _ in range(50):
        n = rnd.randint(1, 25)
        cost = [float(rnd.randint(1, 8)) for _ in range(n)]  # small ranges: many ties
        acc = [float(rnd.randint(1, 8)) for _ in range(n)]

        def dominated(i):
            return any(cost[j] <= cost[i] and acc[j] >= acc[i] and (cost[j], acc[j]) != (cost[i], acc[i])
                       for j in range(n))

        assert sorted(pareto_front(cost, acc)) == [i for i in range(n) if not dominated(i)]
