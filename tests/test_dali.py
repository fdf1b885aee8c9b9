"""DALI multi-crop loader on DALI's CPU backend (GPU decode tests are marked ``gpu``).

Every test reads real image files written here: JPEGs of several sizes and
aspect ratios, a grayscale and a CMYK JPEG, an RGBA PNG, a truncated JPEG and a
text file named ``.jpg``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

pytest.importorskip("nvidia.dali")

from images import denormalize  # noqa: E402
from poa_hpc.config import load_config  # noqa: E402
from poa_hpc.data import build_train_loader  # noqa: E402
from poa_hpc.data import dali as D  # noqa: E402
from poa_hpc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ViewSpec, multicrop_view_specs  # noqa: E402
from poa_hpc.errors import ConfigError

GLOBAL, LOCAL, N_LOCAL, B = 64, 32, 4, 4


def _smooth_rgb(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A photo-like image: a coloured low-frequency field plus mild noise."""
    small = (rng.random((5, 7, 3)) * 255).astype(np.uint8)
    a = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
    return np.clip(a + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)


def _write_set(root: Path, n_per_class: int = 10, seed: int = 0) -> Dict[str, Path]:
    rng = np.random.default_rng(seed)
    special: Dict[str, Path] = {}
    sizes = [(500, 375), (375, 500), (160, 120), (97, 211), (300, 300), (1024, 96)]
    for c in range(2):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(n_per_class):
            w, h = sizes[(i + c) % len(sizes)]
            Image.fromarray(_smooth_rgb(rng, w, h)).save(d / f"img{i}.jpg", quality=90)
    gray = Image.fromarray(_smooth_rgb(rng, 180, 140)[..., 0], "L")
    gray.save(root / "class0" / "gray.jpg", quality=90)
    Image.fromarray(_smooth_rgb(rng, 150, 170)).convert("CMYK").save(root / "class0" / "cmyk.jpg", quality=90)
    rgba = np.concatenate([_smooth_rgb(rng, 130, 110), np.full((110, 130, 1), 200, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(root / "class1" / "alpha.png")
    good = (root / "class1" / "img0.jpg").read_bytes()
    (root / "class1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "class1" / "notes.jpg").write_text("this is not an image\n" * 20)
    special.update(
        gray=root / "class0" / "gray.jpg",
        cmyk=root / "class0" / "cmyk.jpg",
        png=root / "class1" / "alpha.png",
        truncated=root / "class1" / "truncated.jpg",
        text=root / "class1" / "notes.jpg",
    )
    return special


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    special = _write_set(root)
    return root, special


def _cfg(root: Path, loader: str = "dali_cpu", *extra: str):
    return load_config(overrides=[
        "data.dataset=imagefolder", f"data.root={root}", f"data.loader={loader}",
        f"optim.batch_size={B}", f"data.global_size={GLOBAL}", f"data.local_size={LOCAL}",
        f"data.n_local={N_LOCAL}", "model.vit.patch_size=16", "data.num_workers=2", *extra,
    ])


def _take(loader, n: int) -> List[dict]:
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


# ----------------------------------------------------------------------------- host-side parameters


def test_crop_box_matches_torchvision_fallback():
    """Where no random box fits (a strip), both fall back to the same centred box."""
    rng = np.random.default_rng(0)
    draw = D.ViewParamSampler(multicrop_view_specs(224, 96, 2))  # global (0.32, 1) and local (0.05, 0.32) scales
    for size in ((1000, 10), (10, 1000)):
        img = Image.new("RGB", size)
        P = draw(*size, rng)
        for spec, p in zip(draw.specs, P):
            i, j, h, w = RandomResizedCrop.get_params(img, list(spec.scale), list(spec.ratio))
            assert tuple(p[:4]) == (i, j, i + h, j + w)


def test_crop_box_distribution_matches_torchvision():
    """Area fraction and aspect ratio of the boxes: same quartiles as torchvision's get_params."""
    torch.manual_seed(0)
    img = Image.new("RGB", (500, 375))
    spec = multicrop_view_specs(224, 96, 8)[2]  # local: scale (0.05, 0.32)
    theirs = np.array([RandomResizedCrop.get_params(img, list(spec.scale), list(spec.ratio)) for _ in range(3000)])
    P = D.ViewParamSampler([spec] * 3000)(500, 375, np.random.default_rng(0))
    ours_h, ours_w = P[:, D.P_Y1] - P[:, D.P_Y0], P[:, D.P_X1] - P[:, D.P_X0]
    for a, b in ((ours_h * ours_w, theirs[:, 2] * theirs[:, 3]), (ours_w / ours_h, theirs[:, 3] / theirs[:, 2])):
        qa, qb = np.quantile(a, [0.25, 0.5, 0.75]), np.quantile(b, [0.25, 0.5, 0.75])
        assert np.allclose(qa, qb, rtol=0.05), (qa, qb)
    centre_y = (P[:, D.P_Y0] + P[:, D.P_Y1]) / 2
    assert abs(centre_y.mean() - (theirs[:, 0] + theirs[:, 2] / 2).mean()) < 5  # positions uniform alike


def test_view_params_follow_configured_distributions():
    """Probabilities and ranges of every decision, over 4000 draws (5 sigma bounds)."""
    spec = multicrop_view_specs(224, 96, 8)[1]  # global view 2: blur 0.1, solarize 0.2
    rng = np.random.default_rng(0)
    n = 4000
    P = np.concatenate([D.ViewParamSampler([spec] * 100)(500, 375, rng) for _ in range(n // 100)])

    def check_rate(mask: np.ndarray, p: float) -> None:
        tol = 5 * math.sqrt(p * (1 - p) / n)
        assert abs(mask.mean() - p) < tol, (mask.mean(), p)

    jitter = P[:, D.P_BRIGHTNESS] != 1.0
    check_rate(P[:, D.P_FLIP] == 1, spec.p_flip)
    check_rate(jitter, spec.p_jitter)
    check_rate(P[:, D.P_SATURATION] == 0, spec.p_gray)
    check_rate(P[:, D.P_BLUR] == 1, spec.p_blur)
    check_rate(P[:, D.P_SOLARIZE] == 1, spec.p_solarize)
    j = P[jitter]
    assert j[:, D.P_BRIGHTNESS].min() >= 0.6 and j[:, D.P_BRIGHTNESS].max() <= 1.4
    assert j[:, D.P_CONTRAST].min() >= 0.6 and j[:, D.P_CONTRAST].max() <= 1.4
    assert np.abs(j[:, D.P_HUE_DEG]).max() <= 36.0 + 1e-4
    assert abs(np.abs(j[:, D.P_HUE_DEG]).mean() - 18.0) < 1.0  # uniform on [-36, 36]
    sig = P[P[:, D.P_BLUR] == 1, D.P_SIGMA]
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    # crop boxes: inside the image, area fraction within the scale range, aspect within ratio
    h = P[:, D.P_Y1] - P[:, D.P_Y0]
    w = P[:, D.P_X1] - P[:, D.P_X0]
    assert (P[:, D.P_Y0] >= 0).all() and (P[:, D.P_Y1] <= 375).all() and (P[:, D.P_X1] <= 500).all()
    area = h * w / (500 * 375)
    assert area.min() >= 0.32 - 0.01 and area.max() <= 1.0
    assert (w / h).min() >= 3 / 4 - 0.02 and (w / h).max() <= 4 / 3 + 0.02
    # global view 1 never solarizes and always blurs
    spec1 = multicrop_view_specs(224, 96, 8)[0]
    P1 = D.ViewParamSampler([spec1] * 500)(500, 375, rng)
    assert (P1[:, D.P_SOLARIZE] == 0).all() and (P1[:, D.P_BLUR] == 1).all()


def test_probe_image_reads_sizes_like_pillow(image_set, tmp_path):
    """Header-only sizes (a fast JPEG marker walk, Pillow otherwise) equal Pillow's for every readable file."""
    root, special = image_set
    rgb = _smooth_rgb(np.random.default_rng(3), 123, 77)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated (the size stays the stored one, as DALI decodes it here)
    Image.fromarray(rgb).save(tmp_path / "progressive.jpg", progressive=True, quality=80)
    Image.fromarray(rgb).save(tmp_path / "exif.jpg", exif=exif.tobytes())
    files = [p for p in [*root.rglob("*.*"), tmp_path / "progressive.jpg", tmp_path / "exif.jpg"]
             if p not in (special["truncated"], special["text"])]
    assert len(files) >= 25
    for f in files:
        with Image.open(f) as im:
            assert D.probe_image(f.read_bytes()) == im.size, f


def test_probe_image_rejects_bad_files(image_set):
    _, special = image_set
    assert D.probe_image(special["gray"].read_bytes()) == (180, 140)
    assert D.probe_image(special["cmyk"].read_bytes()) == (150, 170)
    assert D.probe_image(special["png"].read_bytes()) == (130, 110)
    with pytest.raises(ValueError, match="truncated JPEG"):
        D.probe_image(special["truncated"].read_bytes())
    with pytest.raises(ValueError, match="not a recognised image format"):
        D.probe_image(special["text"].read_bytes())
    with pytest.raises(ValueError, match="empty"):
        D.probe_image(b"")
    png = special["png"].read_bytes()
    with pytest.raises(ValueError, match="truncated PNG"):
        D.probe_image(png[: len(png) - 40])


# ----------------------------------------------------------------------------- the pipeline vs a reference


def _reference_view(img: Image.Image, p: np.ndarray, spec: ViewSpec) -> torch.Tensor:
    """torchvision functional ops applying the parameters ``p``, normalised CHW."""
    y0, x0, y1, x1 = (int(v) for v in p[:4])
    crop = img.crop((x0, y0, x1, y1)).resize((spec.size, spec.size), Image.Resampling.BICUBIC)
    t = TF.pil_to_tensor(crop).float() / 255.0
    t = TF.adjust_brightness(t, float(p[D.P_BRIGHTNESS]))
    t = TF.adjust_contrast(t, float(p[D.P_CONTRAST]))
    t = TF.adjust_saturation(t, float(p[D.P_SATURATION])) if p[D.P_SATURATION] > 0 else TF.rgb_to_grayscale(t, 3)
    t = TF.adjust_hue(t, float(p[D.P_HUE_DEG]) / 360.0)
    if p[D.P_BLUR]:
        t = TF.gaussian_blur(t, [spec.blur_kernel] * 2, [float(p[D.P_SIGMA])] * 2)
    if p[D.P_SOLARIZE]:
        t = TF.solarize((t * 255).round().to(torch.uint8), spec.solarize_threshold).float() / 255.0
    if p[D.P_FLIP]:
        t = TF.hflip(t)
    return TF.normalize(t, IMAGENET_MEAN, IMAGENET_STD)


CASES = {
    "crop": dict(),
    "flip": dict(flip=1),
    "jitter": dict(b=1.3, c=0.7, s=1.15),
    "gray": dict(b=0.8, c=1.2, s=0.0),
    "hue": dict(h=25.0),
    "blur": dict(blur=1, sigma=1.5),
    "solarize": dict(solarize=1),
    "all": dict(flip=1, b=1.2, c=0.8, s=0.0, blur=1, sigma=0.7, solarize=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_applies_drawn_parameters(tmp_path, monkeypatch, case):
    """Each operation of the DALI graph equals torchvision's functional op with the same parameters."""
    rng = np.random.default_rng(1)
    w, h = 240, 180
    Image.fromarray(_smooth_rgb(rng, w, h)).save(tmp_path / "a.jpg", quality=95)
    img = Image.open(tmp_path / "a.jpg").convert("RGB")
    c = CASES[case]
    box = (30, 50, 30 + 120, 50 + 150)  # y0, x0, y1, x1: a non-square box, so swapped axes would show

    def fixed_view(spec):
        p = np.zeros(D.N_PARAMS, np.float32)
        p[:4] = box
        p[D.P_FLIP] = c.get("flip", 0)
        p[D.P_BRIGHTNESS], p[D.P_CONTRAST], p[D.P_SATURATION] = c.get("b", 1), c.get("c", 1), c.get("s", 1)
        p[D.P_HUE_DEG] = c.get("h", 0)
        p[D.P_BLUR], p[D.P_SIGMA] = c.get("blur", 0), c.get("sigma", 0)
        p[D.P_SOLARIZE] = c.get("solarize", 0) if spec.p_solarize > 0 else 0
        return p

    monkeypatch.setattr(D.ViewParamSampler, "batch",
                        lambda self, sizes, rngs: np.stack([[fixed_view(sp) for sp in self.specs] for _ in sizes]))
    specs = multicrop_view_specs(GLOBAL, LOCAL, 1)
    from poa_hpc.data.collate import MultiCropCollator
    from poa_hpc.data.loader import StepBatchSampler

    sampler = StepBatchSampler(1, 2, seed=0, iters_per_epoch=1)
    loader = D.DaliMultiCropLoader([str(tmp_path / "a.jpg")], [0], sampler, specs,
                                   MultiCropCollator(0, GLOBAL // 16), seed=0, num_threads=1)
    batch = _take(loader, 1)[0]
    view2 = batch["global_crops"][2]  # sample 0 of global view 2 (the view that may solarize)
    ref = _reference_view(img, fixed_view(specs[1]), specs[1])
    err = (denormalize(view2) - denormalize(ref)).abs()
    if case == "hue":
        # DALI's hue is a rotation about the gray axis in RGB, torchvision's a shift in HSV: the
        # same turn, not the same pixels.  It must be closer to torchvision's +25 degrees than
        # to no rotation, and much closer than to -25 degrees.
        def err_to(hue_deg: float) -> float:
            q = fixed_view(specs[1])
            q[D.P_HUE_DEG] = hue_deg
            return float((denormalize(view2) - denormalize(_reference_view(img, q, specs[1]))).abs().mean())

        e_same, e_none, e_opposite = err_to(25.0), err_to(0.0), err_to(-25.0)
        assert e_same < e_none and e_same < 0.6 * e_opposite, (e_same, e_none, e_opposite)
    else:
        assert err.mean() < 0.02, f"{case}: mean abs error {err.mean():.4f}"
    # a wrong geometry (axes swapped, no flip) is far from the reference
    if case == "flip":
        assert (denormalize(TF.hflip(view2)) - denormalize(ref)).abs().mean() > 0.05
    if case == "gray":
        assert denormalize(view2).std(0).max() < 2 / 255  # R == G == B


# ----------------------------------------------------------------------------- the loader


def test_batches_shapes_ranges_and_skips(image_set):
    root, special = image_set
    cfg = _cfg(root)
    loader, iters = build_train_loader(cfg)
    n_files = 2 * 10 + 5
    assert iters == n_files // B
    batches = _take(loader, 2 * iters)
    bad = {str(special["truncated"]), str(special["text"])}
    paths = loader.paths
    assert {paths[i] for i in loader.bad} == bad
    for k, b in enumerate(batches):
        assert b["step"] == k
        assert b["global_crops"].shape == (2 * B, 3, GLOBAL, GLOBAL) and b["global_crops"].dtype == torch.float32
        assert b["local_crops"].shape == (N_LOCAL * B, 3, LOCAL, LOCAL)
        assert b["masks"].shape == (2 * B, (GLOBAL // 16) ** 2) and b["masks"].dtype == torch.bool
        assert b["labels"].shape == (B,) and set(b["labels"].tolist()) <= {0, 1}
        for crops in (b["global_crops"], b["local_crops"]):
            x = denormalize(crops)
            assert torch.isfinite(crops).all() and x.min() >= -1e-5 and x.max() <= 1 + 1e-5
            assert x.std() > 0.05  # real content, not a blank frame
        assert not ({paths[i] for i in b["indices"].tolist()} & bad)
    # a request for a bad file counts every bad file passed on the way to the next good one
    bad_idx = loader.bad
    expected = 0
    for step in range(2 * iters):
        for i in loader.sampler.indices_for_step(step):
            while i in bad_idx:
                expected, i = expected + 1, (i + 1) % len(paths)
    assert expected >= 2 and sum(b["n_skipped"] for b in batches) == expected


def test_grayscale_cmyk_png_decode_like_pillow(image_set):
    root, special = image_set
    for name in ("gray", "cmyk", "png"):
        data = special[name].read_bytes()
        ours = D._decode_one(data, None).astype(np.float32)
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).mean() < 2.0, name  # IDCT rounding differs; content is the same


def test_deterministic_and_resumable(image_set):
    root, _ = image_set
    a = _take(build_train_loader(_cfg(root))[0], 4)
    b = _take(build_train_loader(_cfg(root))[0], 4)
    resumed = _take(build_train_loader(_cfg(root), start_step=2)[0], 2)
    other = _take(build_train_loader(_cfg(root, "dali_cpu", "train.seed=1"))[0], 1)
    for x, y in zip(a, b):
        for key in ("global_crops", "local_crops", "masks", "indices"):
            assert torch.equal(x[key], y[key])
    for x, y in zip(a[2:], resumed):
        assert x["step"] == y["step"]
        assert torch.equal(x["global_crops"], y["global_crops"]) and torch.equal(x["local_crops"], y["local_crops"])
    assert not torch.equal(a[0]["global_crops"], other[0]["global_crops"])


def test_ranks_split_the_global_batch(image_set):
    """Two ranks with batch B see exactly the crops and masks of one process with batch 2B."""
    root, _ = image_set
    whole = _take(build_train_loader(_cfg(root, "dali_cpu", f"optim.batch_size={2 * B}"))[0], 2)
    ranks = [_take(build_train_loader(_cfg(root), rank=r, world_size=2)[0], 2) for r in range(2)]
    for step in range(2):
        w = whole[step]
        r0, r1 = ranks[0][step], ranks[1][step]
        assert torch.equal(torch.cat([r0["indices"], r1["indices"]]), w["indices"])
        for v in range(2):
            got = torch.cat([r0["global_crops"][v * B:(v + 1) * B], r1["global_crops"][v * B:(v + 1) * B]])
            assert torch.equal(got, w["global_crops"][v * 2 * B:(v + 1) * 2 * B])
            got_m = torch.cat([r0["masks"][v * B:(v + 1) * B], r1["masks"][v * B:(v + 1) * B]])
            assert torch.equal(got_m, w["masks"][v * 2 * B:(v + 1) * 2 * B])


def test_masks_equal_the_torch_loader(image_set):
    root, _ = image_set
    dali = _take(build_train_loader(_cfg(root))[0], 2)
    tv = _take(build_train_loader(_cfg(root, "torch", "data.num_workers=0"))[0], 2)
    for x, y in zip(dali, tv):
        assert torch.equal(x["indices"], y["indices"])
        for key in ("masks", "mask_indices", "masks_weight"):
            assert torch.equal(x[key], y[key])
        assert x["n_skipped"] == y["n_skipped"]


def test_augmentation_rates_in_the_output(image_set):
    """Grayscale views (R == G == B) occur at the configured 0.2, measured on the pixels."""
    root, _ = image_set
    batches = _take(build_train_loader(_cfg(root, "dali_cpu", "optim.batch_size=8"))[0], 25)
    views = torch.cat([b["local_crops"] for b in batches])  # 25 * 8 * 4 = 800 local views
    x = denormalize(views)
    gray = (x - x.mean(1, keepdim=True)).abs().amax((1, 2, 3)) < 2.5 / 255
    n = len(gray)
    assert abs(gray.float().mean().item() - 0.2) < 5 * math.sqrt(0.16 / n)


def test_dali_cpu_statistics_match_torchvision(image_set):
    """Per-channel mean and std of the views agree with the torchvision loader's."""
    root, _ = image_set

    def stats(loader: str, extra: str):
        batches = _take(build_train_loader(_cfg(root, loader, "optim.batch_size=8", extra))[0], 40)
        out = {}
        for key in ("global_crops", "local_crops"):
            x = torch.cat([b[key] for b in batches])
            out[key] = (x.mean((0, 2, 3)), x.std((0, 2, 3)))
        return out

    dali, tv = stats("dali_cpu", "data.num_workers=2"), stats("torch", "data.num_workers=0")
    for key in dali:
        (m1, s1), (m2, s2) = dali[key], tv[key]
        assert (m1 - m2).abs().max() < 0.1, (key, m1, m2)
        assert ((s1 - s2).abs() / s2).max() < 0.08, (key, s1, s2)


def test_dali_decode_failure_is_skipped(image_set, monkeypatch):
    """A file that passes the header check but that DALI cannot decode is found, skipped and counted."""
    root, special = image_set

    def lenient(data: bytes):
        with Image.open(io.BytesIO(data)) as im:  # header only: lets the truncated JPEG through
            return im.size

    monkeypatch.setattr(D, "probe_image", lenient)
    loader, iters = build_train_loader(_cfg(root))
    batches = _take(loader, iters)
    paths = loader.paths
    assert str(special["truncated"]) in {paths[i] for i in loader.bad}
    assert all(str(special["truncated"]) not in {paths[i] for i in b["indices"].tolist()} for b in batches)


def test_config_errors(image_set):
    root, _ = image_set
    with pytest.raises(ConfigError, match="data.loader=torch"):
        build_train_loader(load_config(overrides=["data.dataset=digits", "data.loader=dali_cpu"]))
    with pytest.raises(ConfigError, match="data.loader"):
        load_config(overrides=["data.loader=nvjpeg"])
    if not torch.cuda.is_available():
        with pytest.raises(D.DaliUnavailable, match="dali_cpu"):
            build_train_loader(_cfg(root, "dali"))


@pytest.mark.gpu
def test_gpu_decode_matches_cpu_backend(image_set):
    """nvJPEG + GPU ops give the CPU backend's crops up to decoder/resampling rounding."""
    root, _ = image_set
    gpu = _take(build_train_loader(_cfg(root, "dali"))[0], 3)
    cpu = _take(build_train_loader(_cfg(root, "dali_cpu"))[0], 3)
    for g, c in zip(gpu, cpu):
        assert g["global_crops"].is_cuda
        assert torch.equal(g["indices"], c["indices"])
        for key in ("global_crops", "local_crops"):
            err = (denormalize(g[key].cpu()) - denormalize(c[key])).abs().mean()
            assert err < 0.02, (key, err)
