"""`poa plot RUN`: the figure is written from a run folder's metrics.jsonl, config.yaml and attempts.jsonl."""

import json

import pytest

from poa_hpc.cli import main
from poa_hpc.errors import DataError
from poa_hpc.plot import read_metrics, resume_steps

pytest.importorskip("matplotlib")


def test_poa_plot_writes_png_and_svg_with_the_resume_marked(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("head:\n  prototypes: [16, 32]\n")
    rows = [{"step": s, "loss": 5 - s / 10, "intact/dino": 2.0, "lr": 1e-3 * s, "wd": 0.04, "momentum": 0.99,
             "teacher_temp": 0.04, "img_per_s": 100.0, "mfu": 0.4, "collapse/teacher_entropy_h0": 1.0,
             "collapse/student_entropy_h0": 2.0, "collapse/teacher_entropy_h1": 1.5,
             "collapse/student_entropy_h1": 2.5} for s in range(0, 20, 2)]
    rows += [{"step": s, "knn/16x3": 50.0 + s, "knn/32x6": 60.0 + s} for s in (9, 19)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2')  # torn last line
    (run / "attempts.jsonl").write_text('{"start_step": 0, "resumed": false}\n{"start_step": 10, "resumed": true}\n')
    assert len(read_metrics(run)) == len(rows) and resume_steps(run) == [10]
    assert main(["plot", str(run)]) == 0
    png, svg = run / "plots" / "training.png", run / "plots" / "training.svg"
    assert capsys.readouterr().out.split() == [str(png), str(svg)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = svg.read_text()
    for label in ("resumed at step 10", "ln 16", "ln 32", "16x3", "32x6", "MFU (%)"):
        assert label in text, label


def test_poa_plot_of_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    with pytest.raises(DataError):
        read_metrics(tmp_path)
