"""poa profile writes a Chrome trace with the step's parts; scripts/gpu_check.sh runs its CPU dry run (so the GPU
campaign cannot rot)."""

import json
import os
import subprocess

from backbones import tiny
from poa_hpc.cli import main

QUICK = tiny() + ["data.n_local=2", "data.num_workers=0", "optim.batch_size=4", "optim.iters_per_epoch=4"]


def test_profile_writes_a_chrome_trace_with_the_phases(tmp_path, capsys):
    assert main(["profile", "--config", "configs/demo_cpu.yaml", "--steps", "2", "--warmup", "1", "--rows", "5",
                 *QUICK, f"train.output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "Self CPU" in out and "intact" in out and "Chrome trace:" in out
    trace = json.loads((tmp_path / "profile" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"poa/data", "poa/teacher", "poa/intact", "poa/elastic", "poa/optimizer"} <= names
    assert any(n and n.startswith("aten::") for n in names)
    summary = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["phase_ms"]["time/intact_ms"] > 0
    assert main(["profile", "--config", "configs/demo_cpu.yaml", "--steps", "0"]) == 2


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "POA_GPU_CHECK_IN_PYTEST": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "skipped  poa bench kernels" in r.stdout and "FAILED" not in r.stdout
    kinds = sorted(p.name.split("_")[0] for p in tmp_path.glob("*.json"))
    assert kinds == ["attention", "engines", "step"]
    step = json.loads(next(tmp_path.glob("step_*.json")).read_text())["rows"][0]
    assert step["img_per_s"] > 0 and step["predicted_peak"] > 0 and step["time/intact_ms"] > 0
    engines = json.loads(next(tmp_path.glob("engines_*.json")).read_text())["rows"]
    assert [(r["engine"], "error" in r) for r in engines] == [("none", False), ("fsdp", False)]
