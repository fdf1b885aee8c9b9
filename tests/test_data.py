"""Tests for poa_hpc.data: transforms, datasets, robust loading, masking, collate, loader."""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from images import denormalize
from poa_hpc.config import POAConfig
from poa_hpc.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DigitsDataset,
    EvalTransform,
    FileListDataset,
    ImageFolderDataset,
    MaskingGenerator,
    MultiCropAugmentation,
    MultiCropCollator,
    RobustDataset,
    build_eval_datasets,
    build_train_loader,
    collate_multicrop,
    load_image,
    seeded_rng,
)
from poa_hpc.data.transforms import blur_kernel_size
from poa_hpc.errors import ConfigError

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
BAD_NAMES = {"corrupt.jpg", "truncated.jpg", "text.jpg"}


# --------------------------------------------------------------------------- fixtures


def _noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_split(d: Path, seed: int, bad: bool) -> None:
    cat, dog = d / "cat", d / "dog"
    cat.mkdir(parents=True)
    dog.mkdir(parents=True)
    _noise(40, 30, seed).save(cat / "a1.jpg", quality=90)
    _noise(64, 64, seed + 1).save(cat / "A2.JPG")  # upper-case extension
    _noise(20, 36, seed + 2).convert("L").save(cat / "gray.jpeg")
    _noise(50, 50, seed + 3).convert("CMYK").save(cat / "cmyk.jpg")
    _noise(33, 47, seed + 4).convert("RGBA").save(dog / "rgba.png")
    _noise(24, 24, seed + 5).convert("P").save(dog / "pal.png")
    _noise(70, 35, seed + 6).save(dog / "wide.webp")
    (dog / "notes.txt").write_text("not an image and not listed")
    if bad:
        (dog / "corrupt.jpg").write_bytes(np.random.default_rng(seed).integers(0, 256, 2000, dtype=np.uint8).tobytes())
        whole = _jpeg_bytes(_noise(64, 64, seed + 7))
        (dog / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
        (dog / "text.jpg").write_text("hello, I am a text file with a .jpg name\n" * 10)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/train (7 good + 3 bad images) and root/val (7 good), two classes."""
    root = tmp_path_factory.mktemp("imagenet")
    _write_split(root / "train", seed=0, bad=True)
    _write_split(root / "val", seed=100, bad=False)
    return root


def _cfg(**data) -> POAConfig:
    cfg = POAConfig()
    cfg.data.dataset = "digits"
    cfg.data.global_size = 32
    cfg.data.local_size = 16
    cfg.data.n_local = 2
    cfg.data.digits_size = 32
    cfg.data.num_workers = 0
    cfg.model.vit.patch_size = 4
    cfg.optim.batch_size = 4
    cfg.train.seed = 7
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _assert_batches_equal(a: Dict, b: Dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# --------------------------------------------------------------------------- transforms


def test_multicrop_shapes_dtype_and_normalised_range() -> None:
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=3)
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    for mode in ("RGB", "L", "CMYK", "RGBA", "P"):
        out = aug(_noise(45, 37, 1).convert(mode))
        assert set(out) == {"global_crops", "local_crops"}
        assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
        for t, s in [(g, 32) for g in out["global_crops"]] + [(l, 16) for l in out["local_crops"]]:
            assert t.shape == (3, s, s) and t.dtype == torch.float32
            assert torch.all(t >= lo - 1e-5) and torch.all(t <= hi + 1e-5)
            assert 0.0 <= float(denormalize(t).min()) and float(denormalize(t).max()) <= 1.0 + 1e-5
    assert MultiCropAugmentation(32, 16, n_local=0)(_noise(8, 8, 0))["local_crops"] == []


def test_blur_kernel_scales_with_crop_size() -> None:
    assert blur_kernel_size(224) == 9
    for size in (8, 16, 32, 96, 160, 224, 518):
        k = blur_kernel_size(size)
        assert k >= 3 and k % 2 == 1
    assert blur_kernel_size(16) == 3 and blur_kernel_size(96) < 9


def test_seeded_augmentation_is_deterministic_and_restores_rng() -> None:
    aug = MultiCropAugmentation(32, 16, n_local=2)
    img = _noise(48, 40, 3)
    torch.manual_seed(123)
    random.seed(456)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    with seeded_rng(11):
        a = aug(img)
    with seeded_rng(11):
        b = aug(img)
    with seeded_rng(12):
        c = aug(img)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert torch.equal(x, y)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def _rates(fn, n: int = 400) -> float:
    return sum(bool(fn(i)) for i in range(n)) / n


def test_grayscale_flip_and_solarize_rates() -> None:
    aug = MultiCropAugmentation(32, 16, n_local=0, global_scale=(1.0, 1.0))
    colourful = _noise(32, 32, 5)
    ramp = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))  # dark left, bright right
    ramp_img = Image.fromarray(ramp).convert("RGB")
    bright = Image.new("RGB", (32, 32), (250, 250, 250))

    def crops(img: Image.Image, i: int) -> List[torch.Tensor]:
        with seeded_rng(10_000 + i):
            return [denormalize(t) for t in aug(img)["global_crops"]]

    def is_gray(i: int) -> bool:
        g = crops(colourful, i)[0]
        return torch.allclose(g[0], g[1], atol=1e-6) and torch.allclose(g[1], g[2], atol=1e-6)

    def is_flipped(i: int) -> bool:
        g = crops(ramp_img, i)[0]
        return g[:, :, :16].mean() > g[:, :, 16:].mean()

    gray_rate = _rates(is_gray)
    flip_rate = _rates(is_flipped)
    solar = [crops(bright, i) for i in range(400)]
    solar_rate_2 = sum(float(v[1].mean()) < 0.5 for v in solar) / 400  # >= 150/255 unless solarised
    solar_rate_1 = sum(float(v[0].mean()) < 0.5 for v in solar) / 400
    assert 0.12 <= gray_rate <= 0.28, gray_rate  # p = 0.2
    assert 0.40 <= flip_rate <= 0.60, flip_rate  # p = 0.5
    assert 0.12 <= solar_rate_2 <= 0.28, solar_rate_2  # p = 0.2, global view 2 only
    assert solar_rate_1 == 0.0


def test_eval_transform() -> None:
    tf = EvalTransform(32)
    for img in (_noise(300, 200, 0), _noise(8, 8, 1), _noise(20, 40, 2).convert("L")):
        out = tf(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert torch.equal(out, tf(img))
    # an image already at the eval size is used whole (no 224/256 crop)
    img = _noise(32, 32, 3)
    expected = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - MEAN) / STD
    assert torch.allclose(tf(img), expected, atol=1e-6)


# --------------------------------------------------------------------------- datasets


def test_image_folder_dataset(image_root: Path) -> None:
    ds = ImageFolderDataset(image_root / "train")
    assert ds.classes == ["cat", "dog"]
    names = sorted(Path(p).name for p, _ in ds.samples)
    assert "notes.txt" not in names and "A2.JPG" in names and "wide.webp" in names
    assert len(ds) == 10  # 7 good + 3 bad, all with image extensions
    good = [i for i, (p, _) in enumerate(ds.samples) if Path(p).name not in BAD_NAMES]
    for i in good:
        img, label = ds[i]
        assert img.mode == "RGB" and label == ds.targets[i]
    for i, (p, _) in enumerate(ds.samples):
        if Path(p).name in BAD_NAMES:  # corrupt, text and *truncated* files all raise on load
            with pytest.raises(OSError):  # PIL's UnidentifiedImageError is an OSError too
                ds[i]
    gray = np.asarray(load_image(image_root / "train" / "cat" / "gray.jpeg"))
    assert gray.shape[-1] == 3 and np.array_equal(gray[..., 0], gray[..., 2])


def test_image_folder_errors_name_the_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="noimg"):
        ImageFolderDataset(tmp_path / "noimg")


def test_file_list_dataset(image_root: Path, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _noise(16, 16, 9).save(tmp_path / "sub" / "rel image.png")
    absolute = image_root / "val" / "cat" / "a1.jpg"
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\nsub/rel image.png 3\n\n{absolute}\nmissing.jpg 1\n")
    ds = FileListDataset(lst)
    assert len(ds) == 3 and ds.targets == [3, -1, 1]
    assert ds[0][0].size == (16, 16) and ds[0][1] == 3
    assert ds[1][0].mode == "RGB"
    robust = RobustDataset(ds)
    item = robust[2]  # missing file -> skipped, wraps to index 0
    assert item.index == 0 and item.n_skipped == 1
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        FileListDataset(tmp_path / "nope.txt")


def test_digits_dataset_split_and_content() -> None:
    from sklearn.datasets import load_digits

    train, val = DigitsDataset("train", 32), DigitsDataset("val", 32)
    assert len(train) + len(val) == 1797
    assert 1420 <= len(train) <= 1450
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    assert set(train.targets) == set(val.targets) == set(range(10))
    assert np.array_equal(DigitsDataset("train", 32).indices, train.indices)  # deterministic
    img, label = train[0]
    assert img.mode == "RGB" and img.size == (32, 32) and 0 <= label <= 9

    raw = load_digits()  # the native-size images are the sklearn digits, 0..16 -> 0..255
    native = DigitsDataset("all", 8)
    i = 123
    arr = np.asarray(native[i][0])[..., 0].astype(float)
    assert np.abs(arr - raw.images[i] * 255 / 16).max() <= 0.5 and native[i][1] == raw.target[i]

    # the images carry the class: nearest class-mean on val is far above chance
    def stack(ds: DigitsDataset) -> np.ndarray:
        return np.stack([np.asarray(ds[j][0], dtype=np.float32)[..., 0].ravel() for j in range(len(ds))])

    xt, yt = stack(train), np.array(train.targets)
    xv, yv = stack(val), np.array(val.targets)
    means = np.stack([xt[yt == c].mean(0) for c in range(10)])
    assert np.linalg.norm(means[0] - means[1]) > 100
    pred = ((xv[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yv).mean() > 0.8


def test_robust_dataset_skips_counts_and_warns(image_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = ImageFolderDataset(image_root / "train")
    robust = RobustDataset(base)
    bad = [i for i, (p, _) in enumerate(base.samples) if Path(p).name in BAD_NAMES]
    assert len(bad) == 3
    with caplog.at_level(logging.WARNING, logger="poa_hpc.data"):
        for i in bad:
            item = robust[i]
            assert Path(base.samples[item.index][0]).name not in BAD_NAMES
            run = 0
            while (i + run) % len(base) in bad:
                run += 1
            assert item.n_skipped == run and item.index == (i + run) % len(base)
            assert item.image.mode == "RGB" and item.label == base.targets[item.index]
    for name in BAD_NAMES:
        assert name in caplog.text


def test_robust_dataset_gives_up_with_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "allbad" / "c"
    d.mkdir(parents=True)
    for k in range(3):
        (d / f"x{k}.jpg").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="allbad"):
        RobustDataset(ImageFolderDataset(tmp_path / "allbad"))[0]


# --------------------------------------------------------------------------- masking


def test_masking_generator_counts_and_reproducibility() -> None:
    gen = MaskingGenerator((8, 8))
    assert gen.max_num_patches == 32
    rng = random.Random(0)
    exact = total = 0
    for k in range(4, 33):
        for _ in range(20):
            m = gen(k, rng=rng)
            assert m.shape == (8, 8) and m.dtype == bool
            assert m.sum() <= k
            exact += int(m.sum() == k)
            total += 1
    assert exact / total > 0.85
    assert not gen(0, rng=rng).any()
    a = [gen(20, rng=random.Random(5)) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    assert not np.array_equal(gen(20, rng=random.Random(5)), gen(20, rng=random.Random(6)))
    state = random.getstate()  # never touches the global RNG
    gen(20, rng=random.Random(1))
    assert random.getstate() == state


def _fake_samples(b: int, n_local: int, g: int = 32, l: int = 16) -> List[Dict]:
    return [
        {
            "global_crops": [torch.full((3, g, g), 10.0 * i + v) for v in range(2)],
            "local_crops": [torch.full((3, l, l), 10.0 * i + v) for v in range(n_local)],
            "label": i % 3,
            "index": 100 + i,
            "n_skipped": i % 2,
            "step": 5,
        }
        for i in range(b)
    ]


@pytest.mark.parametrize("b,p", [(8, 0.5), (5, 0.3), (4, 1.0), (3, 0.0)])
def test_collate_layout_and_masks(b: int, p: float) -> None:
    gen = MaskingGenerator((8, 8))
    n = 64
    batch = collate_multicrop(
        _fake_samples(b, 3), mask_generator=gen, rng=random.Random(1), mask_ratio=(0.1, 0.5), mask_probability=p
    )
    gc, lc, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    assert gc.shape == (2 * b, 3, 32, 32) and lc.shape == (3 * b, 3, 16, 16)
    for v in range(2):  # view-major: [all samples' view 0; all samples' view 1]
        for i in range(b):
            assert gc[v * b + i, 0, 0, 0] == 10.0 * i + v
    for v in range(3):
        for i in range(b):
            assert lc[v * b + i, 0, 0, 0] == 10.0 * i + v
    assert masks.shape == (2 * b, n) and masks.dtype == torch.bool
    counts = masks.sum(-1)
    n_masked_samples = int(2 * b * p)
    assert int((counts > 0).sum()) == n_masked_samples
    assert int(counts.max()) <= int(n * 0.5)
    if n_masked_samples:
        assert int(counts[counts > 0].min()) >= int(n * 0.1) - 2  # block fitting may fall short by a few
    assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
    assert batch["n_masked"] == int(masks.sum()) == batch["mask_indices"].numel()
    assert batch["n_masked"] <= batch["upperbound"]
    w = batch["masks_weight"]
    assert w.dtype == torch.float32 and w.shape == (batch["n_masked"],)
    expected_w = (1.0 / counts.clamp(min=1).float()).unsqueeze(1).expand_as(masks)[masks]
    assert torch.allclose(w, expected_w)
    assert abs(float(w.sum()) - n_masked_samples) < 1e-4  # each masked crop's weights sum to 1
    assert batch["n_skipped"] == sum(i % 2 for i in range(b))
    assert batch["labels"].tolist() == [i % 3 for i in range(b)]
    assert batch["indices"].tolist() == [100 + i for i in range(b)]


def test_collator_masks_depend_on_seed_step_and_slot_only() -> None:
    def masks(seed: int, step: int, first: int = 0, global_batch: int = 12) -> torch.Tensor:
        samples = _fake_samples(6, 0)
        for i, s in enumerate(samples):
            s["step"], s["gpos"] = step, first + i
        return MultiCropCollator(seed, grid_size=8, global_batch=global_batch)(samples)["masks"]

    assert torch.equal(masks(0, 3), masks(0, 3))
    assert not torch.equal(masks(0, 3), masks(0, 4))
    assert not torch.equal(masks(0, 3), masks(1, 3))
    assert not torch.equal(masks(0, 3), masks(0, 3, first=6))  # the other half of the global batch
    # Two halves of a global batch of 12 == one batch of 12 (view-major rows).
    whole = masks(0, 3, global_batch=12)
    samples = _fake_samples(12, 0)
    for i, s in enumerate(samples):
        s["step"], s["gpos"] = 3, i
    full = MultiCropCollator(0, grid_size=8, global_batch=12)(samples)["masks"]
    a, b = masks(0, 3, 0), masks(0, 3, 6)
    assert torch.equal(torch.cat([a[:6], b[:6], a[6:], b[6:]]), full)
    assert torch.equal(whole, a)
    mixed = _fake_samples(2, 0)
    mixed[1]["step"] = 6
    with pytest.raises(ValueError, match="one step"):
        MultiCropCollator(0, grid_size=8)(mixed)


# --------------------------------------------------------------------------- loader


def test_loader_batch_shapes_and_resume_determinism() -> None:
    cfg = _cfg()
    loader, ipe = build_train_loader(cfg)
    assert ipe == len(DigitsDataset("train", 32)) // 4
    batches = [next(loader) for _ in range(4)]
    b = batches[0]
    assert b["global_crops"].shape == (8, 3, 32, 32) and b["local_crops"].shape == (8, 3, 16, 16)
    assert b["masks"].shape == (8, 64) and b["labels"].shape == (4,) and b["n_skipped"] == 0
    assert [x["step"] for x in batches] == [0, 1, 2, 3]
    assert not torch.equal(batches[2]["global_crops"], batches[3]["global_crops"])

    fresh, _ = build_train_loader(cfg, start_step=3)  # exact resume after a kill at step 3
    _assert_batches_equal(next(fresh), batches[3])
    again, _ = build_train_loader(cfg)
    _assert_batches_equal(next(again), batches[0])


def test_loader_independent_of_num_workers() -> None:
    l0, _ = build_train_loader(_cfg(num_workers=0), start_step=10)
    l2, _ = build_train_loader(_cfg(num_workers=2), start_step=10)
    try:
        for _ in range(3):
            _assert_batches_equal(next(l0), next(l2))
    finally:
        l2.close()


def test_loader_leaves_global_rng_untouched() -> None:
    torch.manual_seed(1)
    random.seed(2)
    t_state, p_state = torch.get_rng_state(), random.getstate()
    loader, _ = build_train_loader(_cfg())
    next(loader)
    next(loader)
    assert torch.equal(torch.get_rng_state(), t_state) and random.getstate() == p_state


def test_rank_sharding_and_epoch_permutation() -> None:
    cfg = _cfg()
    ranks = [build_train_loader(cfg, rank=r, world_size=2)[0] for r in range(2)]
    b0, b1 = next(ranks[0]), next(ranks[1])
    i0, i1 = set(b0["indices"].tolist()), set(b1["indices"].tolist())
    assert len(i0) == len(i1) == 4 and i0.isdisjoint(i1)
    assert not torch.equal(b0["global_crops"], b1["global_crops"])
    cfg8 = _cfg()
    cfg8.optim.batch_size = 8  # one rank with the same global batch sees the same images
    single, _ = build_train_loader(cfg8)
    assert set(next(single)["indices"].tolist()) == i0 | i1

    # World-size invariance: the two ranks' batches, put side by side, are the single-process batch.
    single, _ = build_train_loader(cfg8)
    full = next(single)
    for key in ("global_crops", "masks"):
        views = [t.view(2, 4, *t.shape[1:]) for t in (b0[key], b1[key])]
        assert torch.equal(torch.cat(views, 1).flatten(0, 1), full[key]), key
    lv = [t.view(cfg.data.n_local, 4, *t.shape[1:]) for t in (b0["local_crops"], b1["local_crops"])]
    assert torch.equal(torch.cat(lv, 1).flatten(0, 1), full["local_crops"])

    ds = ranks[0].dataset  # the augmentation seed depends on (step, global position) only
    from poa_hpc.data import SampleKey

    same = ds[SampleKey(0, 0, 0, 5)]["global_crops"][0]
    assert torch.equal(same, ds[SampleKey(0, 0, 0, 5)]["global_crops"][0])
    assert torch.equal(same, ds[SampleKey(0, 1, 0, 5)]["global_crops"][0])
    assert not torch.equal(same, ds[SampleKey(1, 0, 0, 5)]["global_crops"][0])
    assert not torch.equal(same, ds[SampleKey(0, 0, 1, 5)]["global_crops"][0])

    sampler = ranks[0].sampler
    ipe, n = sampler.iters_per_epoch, 1438
    epoch0 = [i for s in range(ipe) for r in range(2) for i in sampler.__class__(
        n, 4, cfg.train.seed, ipe, rank=r, world_size=2).indices_for_step(s)]
    assert len(epoch0) == len(set(epoch0)) == ipe * 8  # a permutation, tail dropped
    assert sampler.indices_for_step(0) != sampler.indices_for_step(ipe)  # next epoch reshuffles


def test_iters_per_epoch_override_wraps_permutation() -> None:
    from poa_hpc.data import StepBatchSampler

    s = StepBatchSampler(10, 4, seed=0, iters_per_epoch=5)  # 20 samples per epoch from 10 images
    epoch = [i for step in range(5) for i in s.indices_for_step(step)]
    assert sorted(epoch) == sorted(list(range(10)) * 2)
    assert epoch != [i for step in range(5, 10) for i in s.indices_for_step(step)]


def test_loader_skips_and_counts_bad_files(image_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(dataset="imagefolder", root=str(image_root))
    cfg.optim.batch_size = 10  # one step reads every training image once
    with caplog.at_level(logging.WARNING, logger="poa_hpc.data"):
        loader, ipe = build_train_loader(cfg)
        assert ipe == 1
        base = loader.dataset.source.dataset
        bad = {i for i, (p, _) in enumerate(base.samples) if Path(p).name in BAD_NAMES}
        for _ in range(2):
            batch = next(loader)
            requested = loader.sampler.indices_for_step(batch["step"])
            expected = sum(_bad_run(i, bad, len(base)) for i in requested)
            assert batch["n_skipped"] == expected > 0
            assert batch["global_crops"].shape == (20, 3, 32, 32)
            assert not (set(batch["indices"].tolist()) & bad)
    for name in BAD_NAMES:
        assert name in caplog.text


def _bad_run(i: int, bad: set, n: int) -> int:
    """Number of consecutive bad indices starting at i (the items a request for i skips)."""
    run = 0
    while (i + run) % n in bad:
        run += 1
    return run


def test_loader_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.root"):
        build_train_loader(_cfg(dataset="imagefolder", root=""))
    with pytest.raises(ConfigError, match="data.root.*missing_dir"):
        build_train_loader(_cfg(dataset="imagefolder", root=str(tmp_path / "missing_dir")))
    with pytest.raises(ConfigError, match="data.root"):
        build_train_loader(_cfg(dataset="filelist", root=str(tmp_path / "missing.txt")))
    cfg = _cfg()
    cfg.optim.batch_size = 2000
    with pytest.raises(ValueError, match="iters_per_epoch"):
        build_train_loader(cfg)


def test_filelist_loader(image_root: Path, tmp_path: Path) -> None:
    lst = tmp_path / "train.txt"
    files = sorted((image_root / "val").rglob("*.*"))
    lst.write_text("\n".join(str(p) for p in files if p.suffix != ".txt"))
    cfg = _cfg(dataset="filelist", root=str(lst))
    cfg.optim.batch_size = 3
    loader, ipe = build_train_loader(cfg)
    batch = next(loader)
    assert ipe == 7 // 3 and batch["global_crops"].shape == (6, 3, 32, 32) and batch["labels"].tolist() == [-1] * 3


def test_build_eval_datasets(image_root: Path) -> None:
    train, val, k = build_eval_datasets(_cfg(digits_size=16))
    assert (len(train), len(val), k) == (1438, 359, 10)
    x, y = val[0]
    assert x.shape == (3, 16, 16) and isinstance(y, int)

    cfg = _cfg(dataset="imagefolder", root=str(image_root))
    cfg.eval.image_size = 24
    train, val, k = build_eval_datasets(cfg)
    assert k == 2 and len(val) == 7 and len(train) == 10
    xs = [train[i] for i in range(len(train))]  # bad files are substituted, not raised
    assert all(x.shape == (3, 24, 24) for x, _ in xs)
    with pytest.raises(ConfigError, match="data.dataset"):
        build_eval_datasets(_cfg(dataset="filelist", root=str(image_root)))
