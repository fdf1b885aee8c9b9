"""The memory estimator against the peak of a real CPU step measured from the operating system's side
(1 process, and 2 processes with gloo and FSDP2), its CUDA stand-in against a fake-CUDA forward, and the
ViT-L recipe's predicted peak."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from backbones import tiny
from poa_hpc.cli import main
from poa_hpc.config import load_config
from poa_hpc.models.subnets import Subnet
from poa_hpc.perf.memory import estimate_memory

# A small ViT whose step holds a few hundred MiB (so allocator noise is small next to it) and runs in ~1 s.
SMALL = ["model.vit.img_size=64", "model.vit.patch_size=8", "model.vit.embed_dim=192", "model.vit.depth=4",
         "model.vit.num_heads=3", "model.vit.min_width=64", "model.vit.width_step=64", "model.vit.min_depth=2",
         "data.global_size=64", "data.local_size=32", "data.n_local=2", "optim.batch_size=16",
         "head.prototypes=[4096,8192]", "head.hidden_dim=512", "head.bottleneck_dim=128"]
SUB, MASKED = "128x3", 150


def _measure(tmp_path, world, overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "POA_PROBE_SUB": SUB,
           "POA_PROBE_MASKED": str(MASKED)}
    out = str(tmp_path / "probe")
    probe = os.path.join("tests", "memory_probe.py")
    cmd = [sys.executable, probe, out, *overrides] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", probe, out,
        *overrides]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return [json.loads(open(f"{out}.{rank}").read())["peak"] for rank in range(world)]


SUBSET = ["model.vit.drop_path_rate=0.3", "model.drop_path_mode=subset"]  # students' blocks on 70 % of the crops


@pytest.mark.parametrize("world,engine,extra", [(1, "none", []), (2, "fsdp", []), (1, "none", SUBSET)],
                         ids=["none", "fsdp", "none-subset-drop-path"])
def test_estimate_matches_the_measured_cpu_peak(tmp_path, world, engine, extra):
    overrides = SMALL + [f"dist.engine={engine}", *extra]
    measured = max(_measure(tmp_path, world, overrides))
    cfg = load_config("configs/demo_cpu.yaml", overrides)
    predicted = estimate_memory(cfg, world, engine=engine, sub=Subnet.parse(SUB), n_masked=MASKED, target="cpu").peak
    assert measured > 100 * 2 ** 20  # the step is big enough to be measured
    assert predicted == pytest.approx(measured, rel=0.15), (predicted / 2 ** 20, measured / 2 ** 20)
    if extra:  # the students' residual branches keep activations for the subset only
        whole = estimate_memory(load_config("configs/demo_cpu.yaml", SMALL + ["model.vit.drop_path_rate=0.3"]), world,
                                engine=engine, sub=Subnet.parse(SUB), n_masked=MASKED, target="cpu").peak
        assert predicted < 0.9 * whole, (predicted / 2 ** 20, whole / 2 ** 20)


def test_cpu_stand_in_makes_the_ops_of_a_fake_cuda_forward():
    """Fake CUDA tensors run a forward here (only autograd's backward needs a real device): the estimator's
    CPU stand-in (CPU autocast + CUDA's fp32 policy, flash kernel) makes the same ops, dtypes and sizes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from poa_hpc.models.ops import attention_kernel
    from poa_hpc.perf.fake import meta_model, synthetic_batch
    from poa_hpc.perf.memory import cuda_autocast_policy
    from poa_hpc.train.meta_arch import StepInputs

    cfg = load_config("configs/vit_l_poa.yaml", ["model.vit.depth=1", "model.vit.min_depth=1", "optim.batch_size=2",
                                                 "data.n_local=1"])

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, torch.Tensor):
                self.ops.append((str(func), first.dtype, first.numel()))
            return out

    traces = {}
    for dev in ("cpu", "cuda"):
        model, batch = meta_model(cfg), synthetic_batch(cfg, device="cpu")
        fm = FakeTensorMode(allow_non_fake_inputs=True)
        with fm:
            model.to_empty(device=dev)
            fb = {k: fm.from_tensor(v).to(dev) for k, v in batch.items()}
        trace = Trace()
        policy = cuda_autocast_policy() if dev == "cpu" else contextlib.nullcontext()
        with fm, policy, trace, attention_kernel("flash"):
            if dev == "cuda":  # torch.autocast refuses CUDA without a device; its dispatch key does not
                torch.set_autocast_dtype("cuda", torch.bfloat16)
                torch.set_autocast_enabled("cuda", True)
                ctx = contextlib.nullcontext()
            else:
                ctx = torch.autocast("cpu", dtype=torch.bfloat16)
            try:
                with ctx:
                    inp = StepInputs.from_batch(fb, torch.device(dev))
                    model.student(inp.global_crops, inp.local_crops, inp.masks, inp.mask_indices)
            finally:
                torch.set_autocast_enabled("cuda", False)
        traces[dev] = trace.ops
    assert any(op == "aten.native_layer_norm.default" and dt == torch.float32 for op, dt, _ in traces["cuda"])
    assert traces["cpu"] == traces["cuda"]


def test_vit_l_recipe_peak_and_breakdown():
    """configs/vit_l_poa.yaml on 32 ranks (FSDP2, bf16, batch 50, no activation checkpointing): at most 40 GB,
    and the intact backbone's saved activations are what dominates."""
    cfg = load_config("configs/vit_l_poa.yaml")
    rep = estimate_memory(cfg, 32)
    assert rep.info["engine"] == "fsdp" and rep.info["bf16"] and rep.info["attention_kernel"] == "flash"
    assert 20e9 < rep.peak <= 40e9
    top = next(iter(rep.breakdown))
    assert top == "activations/temporaries, intact: backbone forward" and rep.breakdown[top] > 0.8 * rep.peak
    assert rep.breakdown["parameters: student"] == pytest.approx(4 * rep.info["student_params"] / 32, rel=0.02)


def test_deepspeed_states_shrink_with_the_stage():
    peaks = []
    for stage in (1, 3):
        cfg = load_config("configs/demo_cpu.yaml", tiny() + [f"dist.zero_stage={stage}"])
        rep = estimate_memory(cfg, 8, engine="deepspeed", n_masked=5)
        n = rep.info["student_params"]
        assert rep.breakdown["optimizer state"] == pytest.approx(12 * n / 8, rel=1e-6)
        assert rep.breakdown["parameters: student"] == pytest.approx(4 * n / (8 if stage == 3 else 1), rel=1e-6)
        peaks.append(rep.peak)
    assert peaks[1] < peaks[0]


def test_estimate_memory_cli(tmp_path, capsys):
    assert main(["estimate", "memory", "--config", "configs/demo_cpu.yaml", "--world-size", "2", "--out",
                 str(tmp_path), *tiny()]) == 0
    out = capsys.readouterr().out
    assert "peak (predicted max_memory_allocated per rank)" in out and "fsdp on 2 ranks" in out
    (path,) = tmp_path.glob("memory_*.json")
    result = json.loads(path.read_text())
    assert result["peak_bytes"] > 0 and result["world_size"] == 2 and {"device", "versions", "commit"} <= result.keys()
    assert main(["estimate", "memory", "--config", "configs/demo_cpu.yaml", "--engine", "none", "--world-size",
                 "2"]) == 2
    assert "--engine none" in capsys.readouterr().err
