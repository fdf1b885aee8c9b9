"""Weighted k-NN: hand-built cases, a brute-force reference, chunking, chance level."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from poa_hpc.eval.knn import extract_features, weighted_knn


def _unit(angle_deg):
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def reference_knn(train, train_y, test, test_y, k, T, C):
    """Loops and math.exp: votes[c] = sum over the k most similar train points of exp(sim/T)."""
    k = min(k, len(train))
    correct = 0
    for q, y in zip(test.tolist(), test_y.tolist()):
        sims = [sum(a * b for a, b in zip(q, t)) for t in train.tolist()]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * C
        for i in order:
            votes[int(train_y[i])] += math.exp(sims[i] / T)
        correct += int(max(range(C), key=lambda c: votes[c]) == y)
    return 100.0 * correct / len(test)


def test_weighted_beats_majority():
    # query at 0 deg; one class-0 neighbour at 0 deg (sim 1), two class-1 at +-60 deg (sim 0.5)
    train = torch.tensor([_unit(0), _unit(60), _unit(-60), _unit(180)])
    train_y = torch.tensor([0, 1, 1, 1])
    test = torch.tensor([_unit(0)])
    # k=3: majority says class 1; exp(1/0.07) >> 2 exp(0.5/0.07) says class 0
    assert weighted_knn(train, train_y, test, torch.tensor([0]), k=3, T=0.07, num_classes=2) == 100.0
    # a very hot temperature makes weights ~equal: majority (class 1) wins
    assert weighted_knn(train, train_y, test, torch.tensor([1]), k=3, T=100.0, num_classes=2) == 100.0
    # k=1 is nearest neighbour
    assert weighted_knn(train, train_y, test, torch.tensor([0]), k=1, T=0.07, num_classes=2) == 100.0


def test_topk_restricts_neighbours():
    # 3 far class-1 points would outvote nothing at k=1 but matter at k=4 with hot T
    train = torch.tensor([_unit(0), _unit(100), _unit(110), _unit(120)])
    train_y = torch.tensor([0, 1, 1, 1])
    test = torch.tensor([_unit(0)])
    assert weighted_knn(train, train_y, test, torch.tensor([0]), k=1, T=100.0, num_classes=2) == 100.0
    assert weighted_knn(train, train_y, test, torch.tensor([1]), k=4, T=100.0, num_classes=2) == 100.0


def test_k_larger_than_train_set():
    train = torch.tensor([_unit(0), _unit(90), _unit(180)])
    train_y = torch.tensor([0, 1, 2])
    test = torch.tensor([_unit(5), _unit(95), _unit(175)])
    acc = weighted_knn(train, train_y, test, torch.tensor([0, 1, 2]), k=20, T=0.07, num_classes=3)
    assert acc == 100.0


def _clustered(n, centers, noise, gen):
    C, D = centers.shape
    y = torch.randint(0, C, (n,), generator=gen)
    x = F.normalize(centers[y] + noise * torch.randn(n, D, generator=gen), dim=1)
    return x, y


def test_matches_bruteforce_reference_and_chunking():
    gen = torch.Generator().manual_seed(0)
    C, D = 5, 16
    centers = F.normalize(torch.randn(C, D, generator=gen), dim=1)
    xtr, ytr = _clustered(300, centers, 0.35, gen)
    xte, yte = _clustered(70, centers, 0.35, gen)
    ref = reference_knn(xtr.double(), ytr, xte.double(), yte, 20, 0.07, C)
    full = weighted_knn(xtr, ytr, xte, yte, k=20, T=0.07, num_classes=C, chunk=1024)
    assert full == pytest.approx(ref)
    assert 40.0 < full < 100.0  # a non-trivial case
    for chunk in (1, 7, 64):
        assert weighted_knn(xtr, ytr, xte, yte, k=20, T=0.07, num_classes=C, chunk=chunk) == full


def test_random_features_near_chance():
    gen = torch.Generator().manual_seed(1)
    C, D = 10, 32
    xtr = F.normalize(torch.randn(2000, D, generator=gen), dim=1)
    ytr = torch.randint(0, C, (2000,), generator=gen)
    xte = F.normalize(torch.randn(1000, D, generator=gen), dim=1)
    yte = torch.randint(0, C, (1000,), generator=gen)
    acc = weighted_knn(xtr, ytr, xte, yte, k=20, T=0.07, num_classes=C, chunk=256)
    assert 5.0 < acc < 15.0


def test_extract_features_normalised_and_ordered():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Dropout(0.5))
    model.train()
    xs = [torch.randn(4, 3, 2, 2), torch.randn(3, 3, 2, 2)]
    ys = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6])]
    loader = list(zip(xs, ys))
    feats, labels = extract_features(model, loader, "cpu")
    assert feats.shape == (7, 6) and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=1), torch.ones(7), atol=1e-6)
    assert labels.tolist() == list(range(7)) and labels.dtype == torch.long
    model.eval()
    with torch.no_grad():
        want = F.normalize(model(torch.cat(xs)), dim=1)
    assert torch.allclose(feats, want, atol=1e-6)  # dropout was off during extraction
    model.train()
    extract_features(model, loader, "cpu")
    assert model.training  # mode restored
    # plain callables work too
    f2, _ = extract_features(lambda x: x.flatten(1) * 3.0, loader, "cpu")
    assert torch.allclose(f2, F.normalize(torch.cat(xs).flatten(1), dim=1), atol=1e-6)


def test_bad_labels_rejected():
    with pytest.raises(ValueError):
        weighted_knn(torch.eye(2), torch.tensor([0, 2]), torch.eye(2), torch.tensor([0, 1]), 1, 0.07, 2)
