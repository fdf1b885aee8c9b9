"""GPU checks (skipped without CUDA): bf16 autocast step and extraction on the device."""

import pytest
import torch

from poa_hpc.models.extract import extract_state_dict
from poa_hpc.models.subnets import Subnet
from poa_hpc.models.vit import build_vit
from poa_hpc.train.trainer import autocast_factory

from test_meta_arch import batch, floats, make, tiny_cfg

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
