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
