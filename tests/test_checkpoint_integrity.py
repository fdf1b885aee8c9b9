"""Checkpoint integrity: one byte flipped inside a tensor's payload after the checkpoint was written (a bit flip
on disk or in a copy) is caught by the step's manifest of SHA-256 digests, and resume falls back to the newest
intact checkpoint, naming the file -- for the step file (.pt), FSDP's DCP folder and a DeepSpeed tag folder.

Without the manifest such a file still loads (torch.load does not check the zip's CRCs): the first test shows
that, so a test here fails if the manifest check is skipped.
"""

from __future__ import annotations

import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from backbones import tiny
from poa_hpc.checkpoint.manifest import manifest_path, verify_manifest
from poa_hpc.cli import main
from runs import ENV, RUN, train_cmd

TINY = tiny("vit") + RUN
SAVE = ["train.max_steps=6", "train.checkpoint_every=3"]


def flip_in_pt_tensor(path: Path) -> str:
    """Flip one byte in the middle of the largest tensor stored in a torch zip file; returns the member."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))
    return info.filename


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def resume(out: Path, nproc: int, engine: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = train_cmd(out, nproc, engine, [*TINY, "train.max_steps=7", *extra], resume=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


def assert_fell_back(r: subprocess.CompletedProcess, bad_file: Path) -> None:
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    assert re.search(rf"cannot resume from the checkpoint of step 6: '{re.escape(str(bad_file))}' does not match "
                     r"its manifest 'step_00000006\.manifest\.json' .*; trying the previous one \(step 3\)", text), \
        text[-3000:]
    assert re.search(r"resumed from .* at step 3", text), text[-3000:]


@pytest.mark.slow
def test_a_flipped_byte_in_the_step_file_falls_back_and_with_no_fallback_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "configs/demo_cpu.yaml", *TINY, f"train.output_dir={out}"]
    assert main([*args, *SAVE]) == 0
    ckpts = out / "checkpoints"
    m = json.loads(manifest_path(ckpts, 6).read_text())
    assert m["hash"] == "sha256" and set(m["files"]) == {"step_00000006.pt"}
    assert verify_manifest(ckpts, 6) is None
    newest = ckpts / "step_00000006.pt"
    before = torch.load(newest, weights_only=False)["model"]
    member = flip_in_pt_tensor(newest)
    after = torch.load(newest, weights_only=False)["model"]  # still loads: only the hash sees it
    assert [k for k in before if not torch.equal(before[k], after[k])], member
    assert "does not match its manifest" in verify_manifest(ckpts, 6)
    r = subprocess.run([*train_cmd(out, 1, "none", [*TINY, "train.max_steps=7"], resume=True)], capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert_fell_back(r, newest)
    assert (ckpts / "step_00000006.pt.unreadable").is_file() and (ckpts / "step_00000007.pt").is_file()
    assert verify_manifest(ckpts, 7) is None

    # every checkpoint corrupted: nothing to fall back to is bad input (exit code 2), one line, no traceback
    for step in (3, 7):
        flip_in_pt_tensor(ckpts / f"step_{step:08d}.pt")
    capsys.readouterr()
    assert main(["train", "--resume", *args[1:], "train.max_steps=8"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("poa train: error")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "no readable checkpoint" in lines[0] and "step_00000007.pt" in lines[0]


@pytest.mark.slow
def test_a_flipped_byte_in_a_dcp_shard_falls_back(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(train_cmd(out, 2, "fsdp", [*TINY, *SAVE]), capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    shard = out / "checkpoints" / "step_00000006_dcp" / "__1_0.distcp"
    assert "step_00000006_dcp/__1_0.distcp" in json.loads(manifest_path(out / "checkpoints", 6).read_text())["files"]
    flip_middle(shard)
    assert_fell_back(resume(out, 2, "fsdp"), shard)


@pytest.mark.slow
def test_a_flipped_byte_in_a_deepspeed_tag_falls_back(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    r = subprocess.run(train_cmd(out, 2, "deepspeed", [*TINY, *SAVE, "dist.zero_stage=2"]), capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    tag = out / "checkpoints" / "deepspeed" / "step00000006"
    states = next(tag.glob("*model_states.pt"))
    flip_in_pt_tensor(states)
    assert_fell_back(resume(out, 2, "deepspeed", "dist.zero_stage=2"), states)
