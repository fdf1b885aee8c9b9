"""Multi-crop loader throughput: torchvision vs DALI (CPU backend) vs DALI (nvJPEG on the GPU),
each reading image files or packed shards (``poa data pack``) of the same images.

    poa bench data                         # every loader that can run here, files and shards
    poa bench data --loaders torch dali --workers 8 16 --batch 128 --sources shards

Without ``--data`` it generates (once, cached) an ImageNet-like set: JPEGs of
about 500x375 pixels and about 110 KB, the size and weight of an average
ImageNet-1k training image, in 10 class folders.  Each loader produces POA's
full training batch (2 x 224 crops, ``--n-local`` x 96 crops, iBOT masks) from
it; img/s counts source images per second after ``--warmup`` batches.
``--sources files shards`` reads the images as files (``data.dataset=imagefolder``)
and as shards packed from them (``data.dataset=shards``, packed once, cached);
``opens/img`` counts the files opened per image during the timed batches (every
``open``/``os.open`` of this process and its loader workers, through a Python
audit hook): about one per image from files, about none from shards (each
worker keeps its shards open).
``--workers`` is the CPU budget: DataLoader worker processes for ``torch``,
DALI CPU threads for ``dali_cpu`` and ``dali``.  Prints a table and writes JSON
under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from poa_hpc.commands import register_command
from poa_hpc.results import write_result

LOADERS = ("torch", "dali_cpu", "dali")
SOURCES = ("files", "shards")
_OPENS = None  # a shared counter of file opens (this process and its forked workers), see _count_opens


def _count_opens():
    """A process-shared counter incremented by every ``open``/``os.open`` (Python audit hook, inherited by forks)."""
    global _OPENS
    if _OPENS is None:
        import multiprocessing as mp
        import sys

        counter = mp.get_context("fork").Value("q", 0)

        def hook(event: str, args: tuple) -> None:
            if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
                with counter.get_lock():
                    counter.value += 1

        sys.addaudithook(hook)
        _OPENS = counter
    return _OPENS


def _photo_like(rng: np.random.Generator, w: int, h: int, detail: float) -> np.ndarray:
    """Low-frequency colour layout + mid-frequency texture + grain, like a photo's spectrum."""
    from PIL import Image

    def field(gh: int, gw: int, amp: float) -> np.ndarray:
        small = rng.normal(0.0, amp, (gh, gw, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(small + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        return np.asarray(img).astype(np.float32) - 128

    a = 128 + field(4, 5, 60) + field(24, 32, 25 * detail) + field(h // 3, w // 3, 20 * detail)
    a += rng.normal(0.0, 6 * detail, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def generate_jpegs(folder: Path, n: int, size=(500, 375), target_kb: float = 110.0, seed: int = 0) -> Path:
    """Write ``n`` photo-like JPEGs (~``target_kb`` KB each, quality 90) into 10 class folders, once."""
    from PIL import Image

    stamp = folder / f".complete_{n}"
    if stamp.exists():
        return folder
    rng = np.random.default_rng(seed)
    w, h = size
    # calibrate the texture strength on one image so the files weigh about target_kb
    lo, hi = 0.1, 4.0
    for _ in range(12):
        detail = (lo + hi) / 2
        probe = folder / "_probe.jpg"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo_like(np.random.default_rng(seed), w, h, detail)).save(probe, quality=90)
        kb = probe.stat().st_size / 1024
        lo, hi = (detail, hi) if kb < target_kb else (lo, detail)
    probe.unlink()
    for i in range(n):
        d = folder / f"n{i % 10:08d}"
        d.mkdir(parents=True, exist_ok=True)
        jitter_w, jitter_h = rng.integers(-40, 41, 2)
        img = _photo_like(rng, int(w + jitter_w), int(h + jitter_h), detail)
        Image.fromarray(img).save(d / f"img_{i:06d}.jpg", quality=90)
    stamp.touch()
    return folder


def _measure(loader_kind: str, root: Path, workers: int, batch: int, n_local: int, steps: int, warmup: int,
             dataset: str = "imagefolder") -> dict:
    import torch

    from poa_hpc.config import load_config
    from poa_hpc.data import build_train_loader

    opens = _count_opens()
    cfg = load_config(overrides=[
        f"data.dataset={dataset}", f"data.root={root}", f"data.loader={loader_kind}",
        f"data.num_workers={workers}", f"optim.batch_size={batch}", f"data.n_local={n_local}",
        f"optim.iters_per_epoch={steps + warmup}",
    ])
    loader, _ = build_train_loader(cfg)
    try:
        for _ in range(warmup):
            next(loader)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        opened0 = opens.value
        t0 = time.perf_counter()
        for _ in range(steps):
            b = next(loader)
        if b["global_crops"].is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        opened = opens.value - opened0
    finally:
        loader.close()
    # the torch loader's workers run ahead (prefetch): opens are counted per image over the timed window
    return {"img_per_s": steps * batch / dt, "ms_per_batch": 1e3 * dt / steps, "on": str(b["global_crops"].device),
            "opens_per_img": opened / (steps * batch), "opens_per_s": opened / dt}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="an image folder in ImageNet layout (default: generate an ImageNet-like set)")
    p.add_argument("--images", type=int, default=512, help="size of the generated set")
    p.add_argument("--cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "poa_hpc"),
                   help="where the generated set is kept")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES,
                   help="read the images as files, as shards packed from them (poa data pack), or both")
    p.add_argument("--loaders", nargs="+", default=None, choices=LOADERS,
                   help="default: torch and dali_cpu, plus dali with a GPU")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="CPU workers/threads (default: all cores)")
    p.add_argument("--batch", type=int, default=32, help="images per batch")
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")


def run(args: argparse.Namespace) -> int:

    import torch

    from poa_hpc.data.dali import dali_available

    if args.data:
        root = Path(args.data).expanduser()
        if not root.is_dir():
            print(f"poa bench data: --data '{root}' is not a directory")
            return 2
    else:
        root = Path(args.cache).expanduser() / f"bench_jpegs_{args.images}"
        t0 = time.perf_counter()
        generate_jpegs(root, args.images)
        print(f"data: {root} ({args.images} JPEGs, ready in {time.perf_counter() - t0:.1f} s)")
    files = sorted(root.rglob("*.jpg"))
    if not files:
        print(f"poa bench data: no .jpg files under '{root}'")
        return 2
    sizes = [f.stat().st_size for f in files[:200]]
    loaders = args.loaders or ["torch", *(["dali_cpu"] if dali_available() else []),
                               *(["dali"] if dali_available() and torch.cuda.is_available() else [])]
    workers = args.workers or [os.cpu_count() or 1]
    print(f"{len(files)} images, mean {np.mean(sizes) / 1024:.0f} KB; batch {args.batch}, 2 x 224 + "
          f"{args.n_local} x 96 crops; {os.cpu_count()} CPU cores")
    shards = None
    if "shards" in args.sources:
        from poa_hpc.data.pack import pack

        shards = root.parent / f"{root.name}_shards"
        if not (shards / "index.json").exists():
            t0 = time.perf_counter()
            summary = pack(root, shards, shard_size=256 * 10**6, workers=os.cpu_count() or 1, progress=False)
            print(f"packed {summary['packed']} images into {summary['shards']} shard(s) in {shards} "
                  f"({time.perf_counter() - t0:.1f} s)")
    print(f"{'loader':<10}{'source':<8}{'workers':>8}{'img/s':>10}{'ms/batch':>10}{'opens/img':>10}  output")
    rows = []
    for kind in loaders:
        for source in args.sources:
            for nw in workers:
                row: dict = {"loader": kind, "source": source, "workers": nw}
                try:
                    row.update(_measure(kind, shards if source == "shards" else root, nw, args.batch, args.n_local,
                                        args.steps, args.warmup, "shards" if source == "shards" else "imagefolder"))
                    print(f"{kind:<10}{source:<8}{nw:>8}{row['img_per_s']:>10.1f}{row['ms_per_batch']:>10.1f}"
                          f"{row['opens_per_img']:>10.2f}  {row['on']}", flush=True)
                except Exception as exc:  # one loader failing (no GPU, no DALI) must not hide the others
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    print(f"{kind:<10}{source:<8}{nw:>8}  error: {row['error']}", flush=True)
                rows.append(row)
    base = {(r["workers"], r["source"]): r["img_per_s"] for r in rows if r["loader"] == "torch" and "img_per_s" in r}
    files = {(r["workers"], r["loader"]): r["img_per_s"] for r in rows if r["source"] == "files" and "img_per_s" in r}
    for r in rows:
        if "img_per_s" in r and (r["workers"], r["source"]) in base:
            r["speedup_vs_torch"] = r["img_per_s"] / base[(r["workers"], r["source"])]
        if "img_per_s" in r and r["source"] == "shards" and (r["workers"], r["loader"]) in files:
            r["speedup_vs_files"] = r["img_per_s"] / files[(r["workers"], r["loader"])]
    write_result("data", rows, args.out, {
        "images": len(files), "mean_kb": float(np.mean(sizes) / 1024), "batch": args.batch, "n_local": args.n_local,
        "global_size": 224, "local_size": 96, "steps": args.steps, "cpu_cores": os.cpu_count(),
    })
    return 0 if all("error" not in r for r in rows) else 1


@register_command("bench data")
class BenchDataCommand:
    __doc__ = "multi-crop loader img/s (torchvision, DALI CPU, DALI GPU)\n\n" + __doc__

    add_arguments = staticmethod(add_arguments)
    run = staticmethod(run)
