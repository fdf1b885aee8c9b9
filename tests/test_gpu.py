"""GPU checks (skipped without CUDA): bf16 autocast step and extraction on the device."""

import pytest
import torch

from poa_hpc.models.extract import extract_state_dict
from poa_hpc.models.subnets import Subnet
from poa_hpc.models.vit import build_vit
from poa_hpc.train.trainer import autocast_factory
from test_meta_arch import batch, floats, make, tiny_cfg  # noqa: F401

pytestmark = pytest.mark.gpu


def test_bf16_autocast_step_on_cuda():
    dev = torch.device("cuda")
    m = make(tiny_cfg()).to(dev)
    out = floats(m.forward_backward(batch(), Subnet(16, 2), 0.04, ibot=True, autocast=autocast_factory("auto", dev)))
    assert all(v == v and abs(v) < 1e4 for v in out.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.student.parameters())
    assert all(p.dtype == torch.float32 for p in m.student.parameters())  # autocast keeps fp32 master weights


def test_extracted_equals_elastic_on_cuda():
    dev = torch.device("cuda")
    m = make(tiny_cfg()).teacher_backbone().to(dev).eval()
    arch, state = extract_state_dict(m, Subnet(24, 3))
    dense = build_vit(arch).to(dev).eval()
    dense.load_state_dict(state)
    x = torch.randn(4, 3, 16, 16, device=dev)
    with torch.no_grad():
        assert (dense(x) - m(x, 24, 3)).abs().max().item() < 1e-4  # TF32 matmuls allowed


def test_one_synchronisation_per_step_on_cuda(tmp_path, monkeypatch):
    """torch.cuda.set_sync_debug_mode reports every synchronising call: a training step makes one (the combined
    all-reduce read), a logged step also reads the gradient norm and the phase events."""
    import warnings

    from backbones import tiny
    from poa_hpc.config import load_config
    from poa_hpc.train import trainer as trainer_mod
    from poa_hpc.train.meta_arch import POA

    starts, seen = [], {"w": []}
    real = POA.forward_backward

    def forward_backward(self, batch, *args, **kwargs):
        starts.append(sum("synchroniz" in str(x.message) for x in seen["w"]))
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(POA, "forward_backward", forward_backward)
    cfg = load_config("configs/demo_cpu.yaml", tiny() + [
        "data.n_local=2", "data.num_workers=0", "optim.batch_size=8", "optim.iters_per_epoch=8", "optim.epochs=1",
        "loss.ibot_start_epoch=0", "train.log_every=4", "train.checkpoint_every=1000", "train.progress=false",
        "train.device=cuda", f"train.output_dir={tmp_path}"])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        seen["w"] = w
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer_mod.train(cfg)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    per_step = [b - a for a, b in zip(starts, starts[1:])]
    quiet = [n for s, n in enumerate(per_step) if s % 4 and s > 0]
    assert quiet and max(quiet) <= 1, per_step


def test_memory_estimate_matches_max_memory_allocated():
    from poa_hpc.config import load_config
    from poa_hpc.perf.fake import synthetic_batch
    from poa_hpc.perf.memory import estimate_memory
    from poa_hpc.train.optim import apply_schedules, build_optimizer
    from poa_hpc.train.trainer import autocast_factory

    overrides = ["model.vit.depth=4", "model.vit.min_depth=2", "optim.batch_size=16", "data.n_local=4",
                 "head.prototypes=[8192,16384]"]
    cfg = load_config("configs/vit_l_poa.yaml", overrides)
    dev = torch.device("cuda")
    m = make(cfg).to(dev)
    opt = build_optimizer(m.student.named_parameters(), cfg)
    apply_schedules(opt, 1e-4, 0.04, 1e-4)
    sub, n_masked = Subnet(768, 3), 400
    b = synthetic_batch(cfg, None, n_masked, device=dev)
    ac = autocast_factory("bf16", dev)

    def step():
        m.forward_backward(b, sub, 0.04, ibot=True, autocast=ac)
        torch.nn.utils.clip_grad_norm_(m.student.parameters(), 1.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.update_teacher(0.999)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    predicted = estimate_memory(cfg, 1, engine="none", sub=sub, n_masked=n_masked, target="cuda").peak
    assert predicted == pytest.approx(measured, rel=0.15), (predicted / 2**30, measured / 2**30)
