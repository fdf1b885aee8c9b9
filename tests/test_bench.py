"""The benchmark commands run and write their JSON (the numbers themselves are not asserted)."""

import json

import pytest
import torch

from poa_hpc.cli import main


def test_bench_attention_writes_json(tmp_path, capsys):
    assert main(["bench", "attention", "--batch", "1", "--iters", "1", "--backends", "sdpa", "math",
                 "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("attention_*.json")
    result = json.loads(path.read_text())
    assert {"device", "versions", "commit", "rows"} <= result.keys()
    assert result["versions"]["torch"] == torch.__version__
    assert len(result["rows"]) == 3 * 2 * 2  # models x sequence lengths x backends
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in result["rows"])
    assert "vit_l" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_bench_kernels_needs_a_gpu(capsys):
    assert main(["bench", "kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_bench_data_generates_jpegs_and_writes_json(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    from PIL import Image

    cache = tmp_path / "cache"
    assert main(["bench", "data", "--images", "12", "--batch", "4", "--steps", "1", "--warmup", "1",
                 "--n-local", "2", "--workers", "1", "--loaders", "torch", "dali_cpu", "--cache", str(cache),
                 "--out", str(tmp_path)]) == 0
    jpegs = sorted((cache / "bench_jpegs_12").rglob("*.jpg"))
    assert len(jpegs) == 12
    with Image.open(jpegs[0]) as im:  # ImageNet-like: ~500x375 (+-40 px) baseline JPEGs of ~110 KB
        assert im.format == "JPEG" and 460 <= im.width <= 540 and 335 <= im.height <= 415
    mean_kb = sum(p.stat().st_size for p in jpegs) / len(jpegs) / 1024
    assert 80 < mean_kb < 140
    (path,) = tmp_path.glob("data_*.json")
    result = json.loads(path.read_text())
    assert {"device", "versions", "commit", "rows", "cpu_cores"} <= result.keys()
    rows = result["rows"]
    assert [(r["loader"], r["source"]) for r in rows] == [
        ("torch", "files"), ("torch", "shards"), ("dali_cpu", "files"), ("dali_cpu", "shards")]
    assert all(r["img_per_s"] > 0 and r["workers"] == 1 for r in rows)
    assert rows[0]["speedup_vs_torch"] == 1.0 and rows[1]["speedup_vs_torch"] == 1.0
    # one open per image from files (the torch workers run ahead: about one), none from shards (kept open)
    assert all(r["opens_per_img"] >= 0.5 for r in rows if r["source"] == "files")
    assert all(r["opens_per_img"] < 0.5 for r in rows if r["source"] == "shards")
    assert "dali_cpu" in capsys.readouterr().out


def test_bench_step_compares_drop_path_modes(tmp_path, capsys):
    assert main(["bench", "step", "--preset", "vit_tiny", "--steps", "1", "--warmup", "1", "--batch", "4",
                 "--no-estimate", "--drop-path-mode", "mask", "subset", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "drop path mode vs mask" in out
    (path,) = tmp_path.glob("step_*.json")
    result = json.loads(path.read_text())
    mask, subset = result["rows"]
    assert (mask["drop_path_mode"], subset["drop_path_mode"]) == ("mask", "subset")
    assert all(r["step_ms"] > 0 and r["time/intact_ms"] > 0 for r in result["rows"])
    # same sub-networks and batch; rate 0.2: the students' blocks run on 6 of 8 global and 25 of 32 local crops
    assert subset["step_tflop"] < 0.9 * mask["step_tflop"]
