"""The raw-pixel k-NN reference against scikit-learn's independent k-NN on the same pixels."""

import numpy as np
import pytest

from poa_hpc.config import load_config
from poa_hpc.data.loader import build_eval_datasets
from poa_hpc.eval.baseline import pixels, raw_pixel_knn


def sklearn_weighted_knn(tr_x, tr_y, va_x, va_y, k, T, center):
    """Cosine k-NN with exp(similarity / T) votes by scikit-learn (brute force, its own sort and vote)."""
    from sklearn.neighbors import KNeighborsClassifier

    tr_x, va_x = tr_x.astype(np.float64), va_x.astype(np.float64)
    if center:
        mean = tr_x.mean(axis=0, keepdims=True)
        tr_x, va_x = tr_x - mean, va_x - mean
    # sklearn's cosine distance is d = 1 - similarity; exp(-d / T) = exp(sim / T) * exp(-1 / T): the same
    # votes up to one positive factor, without overflow
    clf = KNeighborsClassifier(k, metric="cosine", algorithm="brute", weights=lambda d: np.exp(-d / T))
    clf.fit(tr_x, tr_y)
    return 100.0 * float((clf.predict(va_x) == va_y).mean())


def test_raw_pixel_knn_equals_sklearn_on_digits():
    cfg = load_config("configs/demo_cpu.yaml")
    train, val, _ = build_eval_datasets(cfg)
    tr_x, tr_y = pixels(train)
    va_x, va_y = pixels(val)
    side = cfg.eval.image_size  # the demo's 16 px
    assert tr_x.shape == (1438, 3 * side * side) and va_x.shape == (359, 3 * side * side)
    # the images as the networks see them: the evaluation transform's output, flattened
    np.testing.assert_array_equal(va_x[7].numpy(), val[7][0].reshape(-1).numpy())
    args = (tr_x.numpy(), tr_y.numpy(), va_x.numpy(), va_y.numpy(), cfg.eval.knn_k, cfg.eval.knn_temperature)
    expected = sklearn_weighted_knn(*args, center=True)
    got = raw_pixel_knn(cfg)
    assert got == pytest.approx(expected, abs=1e-9)
    # centring matters on this split: an implementation that forgot it would fail above
    assert sklearn_weighted_knn(*args, center=False) != pytest.approx(expected, abs=1e-9)
    assert 95.0 < got <= 100.0


def test_raw_pixel_knn_uses_the_eval_settings():
    """k and T come from eval.*; k = 1 is the nearest centred neighbour, computed here by hand."""
    cfg = load_config("configs/demo_cpu.yaml", ["eval.knn_k=1"])
    train, val, _ = build_eval_datasets(cfg)
    tr_x, tr_y = pixels(train)
    va_x, va_y = pixels(val)
    tr = tr_x.double() - tr_x.double().mean(0)
    va = va_x.double() - tr_x.double().mean(0)
    sims = (va / va.norm(dim=1, keepdim=True)) @ (tr / tr.norm(dim=1, keepdim=True)).t()
    expected = 100.0 * float((tr_y[sims.argmax(1)] == va_y).double().mean())
    assert raw_pixel_knn(cfg) == pytest.approx(expected, abs=1e-9)
