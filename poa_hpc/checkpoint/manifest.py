"""Per-file hashes of a committed checkpoint: detect bytes changed after writing.

A checkpoint is the step file (``step_XXXXXXXX.pt``) plus the engine's resume
state (a DCP folder for FSDP, a DeepSpeed tag folder).  Once the step is
committed, rank 0 writes ``step_XXXXXXXX.manifest.json`` next to it, last and
atomically (temp file, fsync, rename): every file of the checkpoint, its size
and its SHA-256 digest (OpenSSL's, through ``hashlib``: with the CPU's SHA
instructions it measured twice as fast as ``hashlib.blake2b`` here; the cost per
GB is in docs/reliability.md).

On resume (:func:`verify_manifest`), each rank re-hashes its share of the
listed files (file ``i`` on rank ``i % world``) and the step is refused -- the
trainer falls back to the next older intact one -- if a file is missing, has
another size or another digest; the message names the file.  A step without a
manifest (written before manifests existed, or a crash between its commit and
its manifest) is checked as before (readability only).  No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, List, Optional

MANIFEST_VERSION = 1
HASH = "sha256"
_BLOCK = 1 << 22


def manifest_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.manifest.json"


def file_digest(path: str | Path) -> str:
    """SHA-256 of the file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _files(ckpt_dir: Path, paths: Iterable[Path]) -> List[Path]:
    out: List[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(p)
    return out


def write_manifest(ckpt_dir: str | Path, step: int, paths: Iterable[Path]) -> Path:
    """Hash every file of ``paths`` (files, or folders: every file under them) and write the manifest of
    ``step`` atomically; returns its path.  Raises ``OSError`` if it cannot be written."""
    ckpt_dir = Path(ckpt_dir)
    files = {str(f.relative_to(ckpt_dir)): {"size": f.stat().st_size, "digest": file_digest(f)}
             for f in _files(ckpt_dir, paths)}
    final = manifest_path(ckpt_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": MANIFEST_VERSION, "step": step, "hash": HASH, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def verify_manifest(ckpt_dir: str | Path, step: int, rank: int = 0, world: int = 1) -> Optional[str]:
    """Why the checkpoint of ``step`` does not match its manifest (this rank's share of the files), or
    ``None`` if it does or has no manifest."""
    ckpt_dir = Path(ckpt_dir)
    mpath = manifest_path(ckpt_dir, step)
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
        files = sorted(manifest["files"].items())
        if manifest.get("hash") != HASH:
            return f"manifest '{mpath}' uses an unknown hash {manifest.get('hash')!r}"
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return f"manifest '{mpath}' could not be read ({type(exc).__name__}: {exc})"
    for i, (rel, want) in enumerate(files):
        if i % world != rank:
            continue
        f = ckpt_dir / rel
        try:
            size = f.stat().st_size
            if size != want["size"]:
                return f"'{f}' is {size} bytes, its manifest '{mpath.name}' says {want['size']}"
            if file_digest(f) != want["digest"]:
                return f"'{f}' does not match its manifest '{mpath.name}' (its bytes changed after it was written)"
        except FileNotFoundError:
            return f"'{f}' is missing (listed in its manifest '{mpath.name}')"
        except OSError as exc:
            return f"'{f}' could not be read ({type(exc).__name__}: {exc})"
    return None
