"""Datasets from the registry on real files: folder, imagefolder, packed shards (poa data pack), bad data.

Images (JPEG, PNG, WebP), a truncated JPEG and a non-image file are written by the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from poa_hpc.config import load_config
from poa_hpc.data import build_train_loader
from poa_hpc.data.datasets import FolderDataset, ImageFolderDataset
from poa_hpc.data.pack import pack
from poa_hpc.data.registry import dataset_names
from poa_hpc.data.shards import ShardsDataset
from poa_hpc.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
B = 4  # per-rank batch
SMALL = ["data.global_size=32", "data.local_size=16", "data.n_local=2", "model.vit.patch_size=16",
         "data.num_workers=0", f"optim.batch_size={B}"]


def _write_images(root: Path, n: int, nested: bool = True, seed: int = 0) -> list:
    """n images cycling JPEG/PNG/WebP, sizes differing, in class folders c0..c2 (or flat)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        d = root / f"c{i % 3}" / ("deep" if i % 5 == 0 else "") if nested else root
        d.mkdir(parents=True, exist_ok=True)
        ext = ("jpg", "png", "webp")[i % 3]
        img = Image.fromarray(rng.integers(0, 256, (36 + i % 7, 44 + i % 5, 3), dtype=np.uint8))
        if ext == "png" and i % 2:
            img = img.convert("L")  # a grayscale PNG among RGB images (to_rgb converts it)
        p = d / f"im{i:03d}.{ext}"
        img.save(p, **({"quality": 90} if ext != "png" else {}))
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    _write_images(root, 24)
    return root


@pytest.fixture(scope="module")
def packed(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "shards"
    summary = pack(images, out, shard_size=1 << 16, workers=1, progress=False)
    assert summary["packed"] == 24 and summary["skipped"] == 0 and summary["shards"] >= 2
    return out


def _cfg(dataset: str, root, *extra: str, loader: str = "torch"):
    return load_config(overrides=[f"data.dataset={dataset}", f"data.root={root}", f"data.loader={loader}",
                                  *SMALL, *extra])


def _take(loader, n):
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def test_registry_lists_the_datasets_and_config_uses_it():
    assert {"folder", "imagefolder", "filelist", "digits", "shards"} <= set(dataset_names())
    with pytest.raises(DataError.__mro__[2], match="data.dataset"):  # ConfigError
        load_config(overrides=["data.dataset=nope"])
    cfg = load_config(overrides=["data.dataset=shards", "data.shards.roots=[a,b]", "data.shards.weights=[1,3]"])
    assert cfg.data.shards.roots == ["a", "b"] and cfg.data.shards.weights == [1.0, 3.0]


def test_docs_dataset_table_is_the_registry():
    from poa_hpc.data.registry import dataset_table

    assert dataset_table() in (ROOT / "docs" / "own_images.md").read_text()


def test_folder_flat_and_nested(tmp_path):
    flat = tmp_path / "flat"
    _write_images(flat, 5, nested=False)
    (flat / "readme.txt").write_text("not an image")
    ds = FolderDataset(flat)
    assert len(ds) == 5 and ds.classes == [] and set(ds.targets) == {-1}
    assert ds[0][0].mode == "RGB"
    nested = tmp_path / "nested"
    paths = _write_images(nested, 9)
    ds = FolderDataset(nested)
    assert ds.classes == ["c0", "c1", "c2"]
    assert sorted(p for p, _ in ds.samples) == sorted(map(str, paths))  # the deep/ subfolders too
    for p, label in ds.samples:
        assert Path(p).relative_to(nested).parts[0] == f"c{label}"
    # the same flat folder is an error under imagefolder, naming the dataset to use
    with pytest.raises(DataError, match="data.dataset=folder"):
        ImageFolderDataset(flat)


def test_mixed_image_modes_train_as_rgb(tmp_path):
    """A folder mixing modes (RGB, L, RGBA, P, CMYK, 16-bit) trains: every image becomes RGB, 16-bit scaled."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)
    gray16 = (np.arange(24 * 28).reshape(24, 28) * 97).astype(np.uint16)
    images = {"rgb.jpg": Image.fromarray(rgb), "gray.png": Image.fromarray(rgb[..., 0]),
              "rgba.png": Image.fromarray(rgb).convert("RGBA"), "pal.png": Image.fromarray(rgb).convert("P"),
              "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "deep.png": Image.fromarray(gray16),
              "rgb.webp": Image.fromarray(rgb), "gray.jpg": Image.fromarray(rgb[..., 1])}
    for name, img in images.items():
        img.save(tmp_path / name)
    ds = FolderDataset(tmp_path)
    modes = {Path(p).name: Image.open(p).mode for p, _ in ds.samples}
    assert modes["deep.png"].startswith("I") and modes["cmyk.jpg"] == "CMYK" and modes["pal.png"] == "P"
    for i in range(len(ds)):
        assert ds[i][0].mode == "RGB"
    deep = np.asarray(ds[[Path(p).name for p, _ in ds.samples].index("deep.png")][0])[..., 0]
    assert np.array_equal(deep, np.round(gray16 * (255 / 65535)).astype(np.uint8))  # scaled, not clipped to white
    batch = _take(build_train_loader(_cfg("folder", tmp_path))[0], 1)[0]
    assert batch["global_crops"].shape == (2 * B, 3, 32, 32) and batch["n_skipped"] == 0


def test_shards_index_matches_the_files(images, packed):
    folder, shards = FolderDataset(images), ShardsDataset(packed)
    assert len(shards) == len(folder) and shards.classes == folder.classes
    for i in range(len(folder)):
        assert shards.read_bytes(i) == Path(folder.samples[i][0]).read_bytes()
        assert shards.labels[i] == folder.targets[i]
    # other tools read the shards as plain tars in WebDataset layout
    import tarfile

    with tarfile.open(packed / "shard-000000.tar") as tf:
        names = tf.getnames()
    assert names[0] == "000000000.jpg" and names[1] == "000000000.cls"


def test_shards_crops_bit_identical_to_folder_per_step_and_rank(images, packed):
    for rank in range(2):
        a = _take(build_train_loader(_cfg("folder", images), rank=rank, world_size=2, start_step=3)[0], 2)
        b = _take(build_train_loader(_cfg("shards", packed), rank=rank, world_size=2, start_step=3)[0], 2)
        for x, y in zip(a, b):
            assert torch.equal(x["indices"], y["indices"]) and torch.equal(x["labels"], y["labels"])
            assert torch.equal(x["global_crops"], y["global_crops"])
            assert torch.equal(x["local_crops"], y["local_crops"])


def test_shards_resume_and_world_size_exact(packed):
    whole = _take(build_train_loader(_cfg("shards", packed))[0], 5)  # 24 images, B=4: an epoch is 6 steps
    resumed = _take(build_train_loader(_cfg("shards", packed), start_step=3)[0], 2)
    for x, y in zip(whole[3:], resumed):
        assert torch.equal(x["global_crops"], y["global_crops"]) and torch.equal(x["indices"], y["indices"])
    # 1 rank with batch 2B == 2 ranks with batch B, concatenated (same crops, masks included)
    one = _take(build_train_loader(_cfg("shards", packed, f"optim.batch_size={2 * B}"))[0], 2)
    two = [_take(build_train_loader(_cfg("shards", packed), rank=r, world_size=2)[0], 2) for r in range(2)]
    for s in range(2):
        assert torch.equal(one[s]["indices"], torch.cat([two[0][s]["indices"], two[1][s]["indices"]]))
        g = one[s]["global_crops"].view(2, 2 * B, *one[s]["global_crops"].shape[1:])
        for r in range(2):
            gr = two[r][s]["global_crops"].view(2, B, *g.shape[2:])
            assert torch.equal(g[:, r * B:(r + 1) * B], gr)


def test_dali_cpu_reads_shards_in_the_folder_order(images, packed):
    pytest.importorskip("nvidia.dali")
    a = _take(build_train_loader(_cfg("folder", images, "data.num_workers=1", loader="dali_cpu"))[0], 3)
    b = _take(build_train_loader(_cfg("shards", packed, "data.num_workers=1", loader="dali_cpu"))[0], 3)
    for x, y in zip(a, b):
        assert torch.equal(x["indices"], y["indices"])
        assert torch.equal(x["global_crops"], y["global_crops"])  # same bytes, same host-drawn parameters


def test_pack_skips_bad_files_and_resumes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    good = _write_images(src, 18)[3].read_bytes()  # a JPEG
    (src / "c0" / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (src / "c1" / "fake.png").write_bytes(b"this is not a png")
    (src / "c2" / "notes.txt").write_text("ignored: not an image extension")
    fresh = pack(src, tmp_path / "fresh", shard_size=1 << 13, progress=False)
    assert (fresh["files"], fresh["packed"], fresh["skipped"]) == (20, 18, 2)
    meta = json.loads((tmp_path / "fresh" / "index.json").read_text())
    assert sorted(p for p, _ in meta["summary"]["skipped_files"]) == ["c0/trunc.jpg", "c1/fake.png"]
    # interrupt a pack after 12 files, then run it again
    import poa_hpc.data.pack as P

    real, seen = P._check, []

    def flaky(path):
        if len(seen) == 12:
            raise KeyboardInterrupt
        seen.append(path)
        return real(path)

    monkeypatch.setattr(P, "_check", flaky)
    with pytest.raises(KeyboardInterrupt):
        pack(src, tmp_path / "again", shard_size=1 << 13, progress=False)
    assert not (tmp_path / "again" / "index.json").exists()
    assert any((tmp_path / "again").glob("shard-*.json"))  # at least one finished shard to resume from
    monkeypatch.setattr(P, "_check", real)
    again = pack(src, tmp_path / "again", shard_size=1 << 13, progress=False)
    assert again["packed"] == 18 and again["skipped"] == 2
    assert np.array_equal(np.load(tmp_path / "again" / "index.npy"), np.load(tmp_path / "fresh" / "index.npy"))
    for shard in sorted((tmp_path / "fresh").glob("shard-*.tar")):
        assert shard.read_bytes() == (tmp_path / "again" / shard.name).read_bytes()


def test_changed_or_truncated_shard_is_detected(packed, tmp_path):
    import shutil

    for how in ("truncate", "rewrite"):
        copy = tmp_path / how
        shutil.copytree(packed, copy)
        shard = copy / "shard-000001.tar"
        data = bytearray(shard.read_bytes())
        if how == "truncate":
            data = data[:-1024]
        else:
            data[len(data) // 3 + 100] ^= 0xFF  # same size, one byte changed inside a hashed block
        shard.write_bytes(bytes(data))
        with pytest.raises(DataError, match="shard-000001.tar.*(truncated|changed)"):
            ShardsDataset(copy)


def test_mixed_shard_roots_by_weight(packed, images):
    cfg = _cfg("shards", images, f"data.shards.roots=[{packed},{packed}]", "data.shards.weights=[1,3]")
    loader, _ = build_train_loader(cfg)
    ds = loader.dataset.source.dataset
    assert len(ds) == 48 and list(ds.slots) == [12, 36]
    # root 0 (down-weighted) gives 12 distinct images, root 1 every image once plus 12 repeats
    first = {ds.locate(i)[1] for i in range(12)}
    assert len(first) == 12
    second = [ds.locate(i)[1] for i in range(12, 48)]
    assert sorted(set(second)) == list(range(24))
    a, b = _take(loader, 2), _take(build_train_loader(cfg)[0], 2)
    assert all(torch.equal(x["global_crops"], y["global_crops"]) for x, y in zip(a, b))


def _bad_inputs(tmp: Path) -> dict:
    flat = tmp / "flat"
    _write_images(flat, 3, nested=False)
    only_text = tmp / "only_text"
    only_text.mkdir()
    (only_text / "a.txt").write_text("x")
    empty = tmp / "empty"
    empty.mkdir()
    fake = tmp / "fake"
    fake.mkdir()
    for i in range(80):
        (fake / f"x{i}.jpg").write_bytes(b"not a jpeg at all")
    bad_index = tmp / "bad_index"
    bad_index.mkdir()
    (bad_index / "index.json").write_text("{not json")
    return {
        "missing root": (["data.dataset=folder", f"data.root={tmp / 'nowhere'}"], "data.root.*does not exist"),
        "empty root": (["data.dataset=folder", f"data.root={empty}"], "no image files.*empty"),
        "no images": (["data.dataset=folder", f"data.root={only_text}"], "no image files"),
        "flat imagefolder": (["data.dataset=imagefolder", f"data.root={flat}"], "data.dataset=folder"),
        "too few images": (["data.dataset=folder", f"data.root={flat}"], "fewer than one global batch"),
        "no decodable image": (["data.dataset=folder", f"data.root={fake}"], "none of 16 images.*could be decoded"),
        "not a pack": (["data.dataset=shards", f"data.root={flat}"], "poa data pack"),
        "unreadable index": (["data.dataset=shards", f"data.root={bad_index}"], "index.*unreadable"),
    }


@pytest.mark.parametrize("case", ["missing root", "empty root", "no images", "flat imagefolder", "too few images",
                                  "no decodable image", "not a pack", "unreadable index"])
def test_bad_data_is_one_line_exit_2_before_training(case, tmp_path, capsys):
    from poa_hpc.cli import main

    overrides, pattern = _bad_inputs(tmp_path)[case]
    code = main(["train", "--config", "demo_cpu",
                 f"train.output_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("poa train: error: key 'data.root'"), err
    import re

    assert re.search(pattern, err[0]), err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the training loop


def test_changed_shard_via_poa_train_subprocess(packed, tmp_path):
    """The whole path as a user meets it: exit code 2, one line, no traceback (so Slurm does not requeue)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    shard = copy / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-512])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "poa_hpc", "train", "--config", "demo_cpu",
                        "data.dataset=shards", f"data.root={copy}", f"train.output_dir={tmp_path / 'run'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    from poa_hpc.errors import FATAL_EXIT_CODES

    assert r.returncode == 2 and 2 in FATAL_EXIT_CODES, r.stderr  # a Slurm job does not restart on it
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [lines[-1]] and "shard-000000.tar" in lines[-1] and "truncated" in lines[-1]


@pytest.mark.slow
def test_two_processes_match_one_on_shards(tmp_path):
    """The distributed contract on shards: a 2-rank DDP run (torchrun, gloo) computes the 1-process run."""
    from backbones import tiny
    from runs import RUN, SAME_AS_ONE_PROCESS, assert_same_run, assert_same_weights, train

    _write_images(tmp_path / "src", 64)
    pack(tmp_path / "src", tmp_path / "shards", progress=False)
    base = [*tiny("vit"), *RUN, *SAME_AS_ONE_PROCESS, "model.vit.drop_path_rate=0.0", "model.rank_sampling=shared",
            "data.dataset=shards", f"data.root={tmp_path / 'shards'}"]
    one = train(tmp_path / "one", 1, "none", *base)
    two = train(tmp_path / "two", 2, "ddp", *base)
    assert_same_run(one, two)
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_eval_reads_a_labelled_eval_root_whatever_trains(packed, tmp_path):
    from poa_hpc.data import build_eval_datasets
    from poa_hpc.errors import ConfigError

    for split, n in (("train", 9), ("val", 6)):
        _write_images(tmp_path / "labelled" / split, n, seed=n)
    cfg = _cfg("shards", packed, f"data.eval_root={tmp_path / 'labelled'}", "eval.image_size=16")
    train, val, k = build_eval_datasets(cfg)
    assert (len(train), len(val), k) == (9, 6, 3)
    x, label = val[4]
    path = val.source.dataset.samples[4][0]
    assert x.shape == (3, 16, 16) and label == int(Path(path).relative_to(tmp_path / "labelled" / "val").parts[0][1:])
    with pytest.raises(ConfigError, match="data.eval_root"):
        build_eval_datasets(_cfg("shards", packed))
    (tmp_path / "flat").mkdir()
    _write_images(tmp_path / "flat" / "train", 3, nested=False)
    _write_images(tmp_path / "flat" / "val", 3, nested=False)
    with pytest.raises(DataError, match="class subfolders"):
        build_eval_datasets(_cfg("shards", packed, f"data.eval_root={tmp_path / 'flat'}"))
