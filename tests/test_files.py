"""The one atomic-write helper and the checkpoint layout's refusal of the pre-history layout."""

import os

import pytest

from poa_hpc.checkpoint.layout import atomic_save, committed_steps, newest_step
from poa_hpc.errors import ResumeError
from poa_hpc.files import atomic_write, atomic_write_text
from poa_hpc.launch.status import classify_error


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic_write_text(p, "old")
    assert p.read_text() == "old"

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, fail)
    assert p.read_text() == "old" and sorted(os.listdir(p.parent)) == ["a.json"]  # no temporary file left
    atomic_write_text(p, "new", fsync=True)
    assert p.read_text() == "new" and sorted(os.listdir(p.parent)) == ["a.json"]


def test_step_files_and_an_old_layout(tmp_path):
    d = tmp_path / "checkpoints"
    assert committed_steps(d) == [] and newest_step(d) is None
    atomic_save({"step": 3}, d / "step_00000003.pt")
    atomic_save({"step": 12}, d / "step_00000012.pt")
    assert committed_steps(d) == [12, 3]
    old = tmp_path / "old" / "checkpoints"
    atomic_save({"step": 5}, old / "last.pt")  # the layout before the per-step history
    with pytest.raises(ResumeError, match="older poa_hpc layout") as exc:
        committed_steps(old)
    assert classify_error(exc.value)[0] == 2 and "\n" not in str(exc.value) and "train.output_dir" in str(exc.value)
