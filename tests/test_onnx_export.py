"""ONNX export of every family's dense sub-networks (tiny configs): onnxruntime reproduces PyTorch
within 1e-4 relative, on a batch size other than the one traced (the batch axis is dynamic), and
`poa export --format onnx` writes a file onnxruntime loads."""

import pytest
import torch

from backbones import tiny
from poa_hpc.config import load_config
from poa_hpc.models.extract import extract_state_dict
from poa_hpc.models.registry import backbone_names, get_backbone
from poa_hpc.train.meta_arch import build_branch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from poa_hpc.models.onnx_export import export_onnx, onnx_session  # noqa: E402


def _dense(family, smallest=False):
    cfg = load_config("configs/demo_cpu.yaml", tiny(family))
    spec, arch = get_backbone(family), cfg.model.section
    torch.manual_seed(0)
    bb = build_branch(cfg, 0.0).backbone.eval()
    space = spec.space(arch)
    sub = min(space.all()) if smallest else space.intact
    a, state = extract_state_dict(bb, sub)
    model = spec.build_dense(a)
    model.load_state_dict(state)
    return model.eval(), arch.img_size


@pytest.mark.slow
@pytest.mark.parametrize("family", backbone_names())
def test_onnxruntime_matches_pytorch(family, tmp_path):
    model, size = _dense(family)
    diff = export_onnx(model, size, tmp_path / "m.onnx")
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))  # traced with 2
    with torch.no_grad():
        ref = model(x)
    got = torch.from_numpy(onnx_session(tmp_path / "m.onnx").run(None, {"images": x.numpy()})[0])
    assert got.shape == ref.shape
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 1e-4 * scale
    assert diff is not None and diff <= 1e-4 * scale


def test_poa_export_onnx_from_an_extracted_file(tmp_path, capsys):
    from poa_hpc.cli import main
    from poa_hpc.models.extract import save_subnet

    cfg = load_config("configs/demo_cpu.yaml", tiny("vit"))
    bb = build_branch(cfg, 0.0).backbone.eval()
    sub = min(get_backbone("vit").space(cfg.model.section).all())
    arch, state = extract_state_dict(bb, sub)
    f = save_subnet(tmp_path / f"vit_{sub}.safetensors", "vit", arch, state, width=sub.width, depth=sub.depth)
    assert main(["export", str(f), "--format", "onnx", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "max abs diff" in out
    onnx_file = tmp_path / "out" / f"vit_{sub}.onnx"
    model = get_backbone("vit").build_dense(arch)
    model.load_state_dict(state)
    x = torch.randn(3, 3, 16, 16)
    got = onnx_session(onnx_file).run(None, {"images": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model.eval()(x).detach(), rtol=1e-4, atol=1e-5)
