"""`poa eval finetune`: layer-wise lr decay over the pre-training layer ids, and a fine-tune killed
with SIGKILL after its first epoch resumes to the same per-epoch top-1 as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from backbones import tiny, vit_rules
from poa_hpc.config import load_config
from poa_hpc.models.extract import extract_state_dict, save_subnet
from poa_hpc.models.registry import get_backbone
from poa_hpc.train.meta_arch import build_branch


def _file(tmp_path):
    cfg = load_config("configs/demo_cpu.yaml", tiny("vit") + ["data.num_workers=0"])
    torch.manual_seed(0)
    bb = build_branch(cfg, 0.0).backbone.eval()
    sub = min(get_backbone("vit").space(cfg.model.section).all())
    arch, state = extract_state_dict(bb, sub)
    from poa_hpc.config import to_dict

    return save_subnet(tmp_path / f"vit_{sub}.safetensors", "vit", arch, state, width=sub.width, depth=sub.depth,
                       config=to_dict(cfg)), arch, state


def test_layer_wise_lr_decay_uses_the_pretraining_layer_ids(tmp_path):
    from poa_hpc.eval.finetune import FinetuneOptions, _Classifier, _param_groups

    cfg = load_config("configs/demo_cpu.yaml", tiny("vit"))
    spec = get_backbone("vit")
    arch = cfg.model.section  # depth 4: ids 0..5
    model = _Classifier(spec.build(arch, drop_path_rate=0.0), arch.embed_dim, 10)
    groups = _param_groups(model, spec, arch, FinetuneOptions(layer_decay=0.5, weight_decay=0.05))
    where = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = where[id(p)]
        if name.startswith("backbone."):
            lid, no_wd = vit_rules(name)  # the hand-written table of test_optim
            no_wd = no_wd or p.ndim <= 1
        else:
            lid, no_wd = 5, name.endswith("bias")
        assert g["layer_id"] == lid and g["lr_mult"] == 0.5 ** (5 - lid), name
        assert g["weight_decay"] == (0.0 if no_wd else 0.05), name


@pytest.mark.slow
def test_sigkill_mid_finetune_resumes(tmp_path):
    f, _, _ = _file(tmp_path)
    args = [str(f), "--ft-epochs", "3", "--ft-warmup-epochs", "1", "--train-per-class", "10", "--ft-drop-path", "0.1",
            "--ft-ema", "0.9", "data.num_workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # uninterrupted
    full = subprocess.run([sys.executable, "-m", "poa_hpc", "eval", "finetune", *args, "--ft-out", str(tmp_path / "a")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert full.returncode == 0, full.stderr
    # killed once the first epoch's checkpoint is there, then started again
    ck = tmp_path / "b" / f"{f.stem}" / "finetune.pt"
    proc = subprocess.Popen([sys.executable, "-m", "poa_hpc", "eval", "finetune", *args, "--ft-out", str(tmp_path / "b")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.time()
    while not ck.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    epochs_done = torch.load(ck, weights_only=False)["epoch"]
    assert 1 <= epochs_done < 3
    again = subprocess.run([sys.executable, "-m", "poa_hpc", "eval", "finetune", *args, "--ft-out", str(tmp_path / "b")],
                           capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {ck} after epoch {epochs_done}" in again.stdout + again.stderr
    a = torch.load(tmp_path / "a" / f.stem / "finetune.pt", weights_only=False)
    b = torch.load(ck, weights_only=False)
    assert a["epoch"] == b["epoch"] == 3 and a["per_epoch"] == b["per_epoch"]
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0)
    # the printed table
    line = [ln for ln in again.stdout.splitlines() if ln.startswith(f.stem)][0]
    assert f"{a['per_epoch'][-1]:.2f}%" in line
