"""``poa data pack``: a folder of images -> tar shards (WebDataset layout) + an index for ``data.dataset=shards``.

Every file is fully decoded once (Pillow, in ``--workers`` processes); unreadable
and corrupt files are skipped, counted in the printed summary and listed in
``index.json``.  Images are written in the sorted order of the ``folder``
dataset, a new shard starting once the current one reaches ``--shard-size``.
A finished shard is renamed into place with a small sidecar listing its
members, so an interrupted pack (killed, out of time) continues from the last
finished shard when the same command runs again.  See :mod:`poa_hpc.data.shards`
for the layout.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from poa_hpc.commands import register_command
from poa_hpc.errors import DataError, UsageError

__all__ = ["pack", "parse_size"]

STATE = "pack_state.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``1GB`` -> 10**9, ``512MiB`` -> 2**29, ``4096`` -> 4096."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"--shard-size {text!r}: expected a size such as 1GB, 512MB or 256MiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 1 << 16:
        raise UsageError(f"--shard-size {text!r}: at least 64 KiB")
    return size


def _check(path: str) -> Tuple[Optional[bytes], str]:
    """(the file's bytes, "") if Pillow decodes it completely, else (None, the reason)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.width <= 0 or img.height <= 0:
                raise ValueError(f"size {img.width}x{img.height}")
        return data, ""
    except Exception as exc:  # every decode/IO failure is a skipped file
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
    buf = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    assert len(buf) == tarfile.BLOCKSIZE
    return buf


def _pad(n: int) -> bytes:
    return b"\0" * (-n % tarfile.BLOCKSIZE)


class _ShardWriter:
    def __init__(self, out: Path, number: int) -> None:
        self.number = number
        self.name = f"shard-{number:06d}.tar"
        self.final = out / self.name
        self.tmp = out / (self.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.pos = 0
        self.members: List[List[int]] = []  # [source position, data offset, size, label]
        self.skipped: List[List[Any]] = []
        self.first: Optional[int] = None

    def _write(self, name: str, data: bytes) -> int:
        self.f.write(_tar_header(name, len(data)))
        offset = self.pos + tarfile.BLOCKSIZE
        self.f.write(data)
        self.f.write(_pad(len(data)))
        self.pos = offset + len(data) + len(_pad(len(data)))
        return offset

    def add(self, position: int, ext: str, data: bytes, label: int, labelled: bool) -> None:
        key = f"{position:09d}"
        offset = self._write(f"{key}.{ext}", data)
        if labelled:
            self._write(f"{key}.cls", str(label).encode())
        self.members.append([position, offset, len(data), label])

    def finish(self, end: int) -> Dict[str, Any]:
        from .shards import shard_check

        self.f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)
        size = self.final.stat().st_size
        side = {"name": self.name, "end": end, "size": size, "check": shard_check(self.final, size),
                "members": self.members, "skipped": self.skipped}
        tmp = self.final.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(side))
        os.replace(tmp, self.final.with_suffix(".json"))
        return side


def pack(src: str | os.PathLike, out: str | os.PathLike, shard_size: int = 10**9, workers: int = 1,
         progress: bool = True) -> Dict[str, Any]:
    """Pack every image under ``src`` into shards in ``out`` (see the module doc); returns the summary."""
    import numpy as np

    from .datasets import FolderDataset
    from .shards import FORMAT, INDEX_JSON, INDEX_NPY, VERSION

    t0 = time.perf_counter()
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if (out / INDEX_JSON).exists():
        raise UsageError(f"'{out}' already holds a finished pack ({INDEX_JSON}); choose another -o folder")
    try:
        source = FolderDataset(src)  # sorted listing, labels from class subfolders
    except DataError as exc:  # its message names data.root; here the folder is SRC
        raise DataError(str(exc).replace("key 'data.root': ", "SRC: ").replace("point data.root at", "give")) from None
    paths = [p for p, _ in source.samples]
    labelled = bool(source.classes)
    rel = [os.path.relpath(p, src) for p in paths]
    listing = hashlib.blake2b("\n".join(rel).encode(), digest_size=16).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    state = {"source": str(src.resolve()), "listing": listing, "files": len(paths), "shard_size": shard_size}
    state_path = out / STATE
    if state_path.exists():
        old = json.loads(state_path.read_text())
        if old != state:
            raise UsageError(f"'{out}' holds an interrupted pack of another source listing or shard size ({old['source']}, "
                             f"{old['files']} files, --shard-size {old['shard_size']}); finish it with the same "
                             "command or choose another -o folder")
    else:
        state_path.write_text(json.dumps(state))
    for leftover in out.glob("shard-*.tar.tmp"):
        leftover.unlink()
    # finished shards of an interrupted pack
    done: List[Dict[str, Any]] = []
    while True:
        side_path = out / f"shard-{len(done):06d}.json"
        tar_path = side_path.with_suffix(".tar")
        if not (side_path.exists() and tar_path.exists()):
            break
        side = json.loads(side_path.read_text())
        if tar_path.stat().st_size != side["size"]:
            break
        done.append(side)
    for stale in out.glob("shard-*"):  # shards after the last complete one are redone
        m = re.match(r"shard-(\d+)\.", stale.name)
        if m and int(m.group(1)) >= len(done):
            stale.unlink()
    start = done[-1]["end"] if done else 0
    if start:
        print(f"resuming: {len(done)} finished shard(s), {start} of {len(paths)} files done")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), initial=start, desc="poa data pack", unit="img", dynamic_ncols=True)
    pool = None
    todo = paths[start:]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_check, todo, chunksize=16)
    else:
        results = map(_check, todo)
    writer: Optional[_ShardWriter] = None
    try:
        for k, (data, reason) in enumerate(results):
            i = start + k
            if writer is None:
                writer = _ShardWriter(out, len(done))
            if data is None:
                writer.skipped.append([rel[i], reason])
            else:
                ext = Path(paths[i]).suffix.lower().lstrip(".") or "img"
                writer.add(i, ext, data, source.samples[i][1], labelled)
            if writer.pos >= shard_size:
                done.append(writer.finish(i + 1))
                writer = None
            if bar is not None:
                bar.update(1)
        if writer is not None:
            done.append(writer.finish(len(paths)))
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    rows = [[s, m[1], m[2], m[3]] for s, side in enumerate(done) for m in side["members"]]
    skipped = [sk for side in done for sk in side["skipped"]]
    if not rows:
        raise DataError(f"none of the {len(paths)} image file(s) under '{src}' could be read ({skipped[0][1]} ...); "
                        "nothing to pack")
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    seconds = time.perf_counter() - t0
    summary = {"source": str(src), "files": len(paths), "packed": len(rows), "skipped": len(skipped),
               "shards": len(done), "bytes": int(sum(s["size"] for s in done)), "seconds": round(seconds, 2),
               "skipped_files": skipped[:1000]}
    meta = {"format": FORMAT, "version": VERSION, "n_samples": len(rows), "classes": source.classes,
            "shards": [{k: s[k] for k in ("name", "size", "check")} | {"samples": len(s["members"])} for s in done],
            "summary": summary}
    np.save(out / (INDEX_NPY + ".tmp.npy"), arr)
    os.replace(out / (INDEX_NPY + ".tmp.npy"), out / INDEX_NPY)
    tmp = out / (INDEX_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / INDEX_JSON)  # the index last: its presence means the pack is complete
    for side in out.glob("shard-*.json"):
        side.unlink()
    state_path.unlink()
    return summary


@register_command("data pack")
class PackCommand:
    """Pack a folder of images into tar shards + an index (data.dataset=shards).

    Writes OUT/shard-NNNNNN.tar (WebDataset layout: other tools read them as they are),
    OUT/index.npy (shard, byte offset, size, label of every image) and OUT/index.json
    (classes, shard sizes and hashes, the summary).  Unreadable or corrupt files are skipped
    and counted.  Run the same command again to finish an interrupted pack.
    Then train with: poa train --config C data.dataset=shards data.root=OUT
    """

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("src", help="folder of images (recursive; class subfolders become labels)")
        parser.add_argument("-o", "--output", required=True, help="folder for the shards and the index")
        parser.add_argument("--shard-size", default="1GB", help="bytes per shard, e.g. 1GB, 512MB (default 1GB)")
        parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                            help="processes decoding the images to check them (default: min(8, cores))")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        if args.workers < 1:
            raise UsageError("--workers must be >= 1")
        summary = pack(args.src, args.output, parse_size(args.shard_size), args.workers, not args.no_progress)
        print(f"packed {summary['packed']} of {summary['files']} images into {summary['shards']} shard(s), "
              f"{summary['bytes'] / 1e6:.1f} MB, in {summary['seconds']:.1f} s; skipped {summary['skipped']} "
              f"unreadable file(s){' (listed in index.json)' if summary['skipped'] else ''} -> {args.output}")
        for path, reason in summary["skipped_files"][:5]:
            print(f"  skipped {path}: {reason}")
        return 0
