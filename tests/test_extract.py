"""Extraction: dense sub-networks equal the elastic forward; they load into timm; the CLI."""

import subprocess
import sys

import pytest
import torch

from poa_hpc.checkpoint.layout import atomic_save
from poa_hpc.cli import main
from poa_hpc.config import load_config, to_dict
from poa_hpc.models.extract import extract_state_dict, load_subnet
from poa_hpc.models.registry import get_backbone
from poa_hpc.models.subnets import Subnet, SubnetSampler
from poa_hpc.models.vit import ViTArch, build_vit, count_params, vit_gflops
from poa_hpc.train.meta_arch import POA

# The demo's ViT at 32 px (8x8 patch grid; local crops 16 px, a 4x4 grid): sizes these tests resize between.
DEMO_32PX = ["model.vit.img_size=32", "data.digits_size=32", "data.global_size=32", "data.local_size=16",
             "eval.image_size=32"]


def demo_model():
    cfg = load_config("configs/demo_cpu.yaml", DEMO_32PX)
    torch.manual_seed(0)
    model = POA(cfg)
    with torch.no_grad():  # trained-like LayerScales and biases so every block matters
        for n, p in model.teacher.named_parameters():
            p.add_(0.2 * torch.randn_like(p) if ("gamma" in n or "bias" in n) else 0.0)
    return cfg, model


def test_extracted_subnet_equals_elastic_forward_demo_model():
    cfg, model = demo_model()
    backbone = model.teacher_backbone().eval()
    sampler = SubnetSampler(model.space, seed=0)
    subs = {sampler.sample(t) for t in range(6)} | {model.space.intact}
    x = torch.randn(4, 3, 32, 32)
    for sub in sorted(subs):
        arch, state = extract_state_dict(backbone, sub)
        dense = build_vit(arch).eval()
        dense.load_state_dict(state)
        assert sum(p.numel() for n, p in dense.named_parameters() if n != "mask_token") == count_params(arch)
        with torch.no_grad():
            diff = (dense(x) - backbone(x, sub.width, sub.depth)).abs().max().item()
        assert diff < 1e-5, (sub, diff)


def test_extracted_subnet_matches_timm_vit():
    """At the native size and at the local-crop size: timm resizes position embeddings itself (antialiased,
    to ``size=``), so the export carries the embedding already resized for the size it is built for."""
    timm = pytest.importorskip("timm")
    cfg, model = demo_model()
    backbone = model.teacher_backbone().eval()
    arch, state = extract_state_dict(backbone, Subnet(64, 4))
    for size in (32, cfg.data.local_size, 24):  # native 8x8 grid, local crops 4x4, and 6x6
        e = get_backbone("vit").timm_export(arch, state, img_size=size)
        assert e.attributes == {}
        ref = timm.create_model(e.model, pretrained=False, num_classes=0, **e.kwargs).eval()
        ref.load_state_dict(e.state, strict=True)
        x = torch.randn(3, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ref(x), backbone(x, 64, 4), rtol=1e-5, atol=1e-5)
    # the embedding timm would make itself at 16 px is not ours: that is why it is exported resized
    e = get_backbone("vit").timm_export(arch, state)
    dyn = timm.create_model(e.model, pretrained=False, num_classes=0, **e.kwargs, dynamic_img_size=True).eval()
    dyn.load_state_dict(e.state)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (dyn(x) - backbone(x, 64, 4)).abs().max() > 1e-3


def dinov2_interpolate(pos_embed, w, h, patch_size, offset=0.1):
    """DINOv2's / the authors' ``interpolate_pos_encoding`` (scale_factor form), written out as they do."""
    import math

    N = pos_embed.shape[1] - 1
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size + offset, h // patch_size + offset
    sqrt_n = math.sqrt(N)
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(sqrt_n), int(sqrt_n), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / sqrt_n, h0 / sqrt_n), mode="bicubic")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("offset", [0.1, 0.0])
def test_position_embedding_at_other_sizes_follows_the_authors(offset):
    """224 -> 96 px (14x14 -> 6x6 grid): scale_factor (g + 0.1) / G by default, size=(g, g) with offset 0."""
    arch = ViTArch(img_size=224, patch_size=16, embed_dim=64, depth=1, num_heads=1, interpolate_offset=offset)
    torch.manual_seed(0)
    m = build_vit(arch)
    pos = m.pos_embed.detach()
    got = m._pos_embed(6, 6, 64)
    if offset:
        want = dinov2_interpolate(pos, 96, 96, 16)
    else:
        patch = torch.nn.functional.interpolate(pos[:, 1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2), size=(6, 6),
                                                mode="bicubic")
        want = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, 36, 64)], 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if not offset:  # the two forms differ: the choice is recorded with every extracted sub-network
        assert (dinov2_interpolate(pos, 96, 96, 16) - got).abs().max() > 1e-3


def test_sizes_match_timm_and_the_literature():
    """Parameter counts equal timm's backbones; GFLOPs (MACs) as DeiT: ViT-S 4.6, ViT-B 17.6, ViT-L 61.6."""
    timm = pytest.importorskip("timm")
    L = ViTArch(224, 16, 3, 1024, 24, 16)
    for w in (384, 768):
        arch = L.sub(w, 12)
        ref = timm.models.vision_transformer.VisionTransformer(**get_backbone("vit").timm_export(arch, {}).kwargs,
                                                               num_classes=0)
        assert count_params(arch) == sum(p.numel() for p in ref.parameters())
    # ViT-L/16: 304.33M with timm's 1000-class head (1,025,000) -> 303.30M backbone + 49,152 LayerScale
    assert count_params(L) == 304_326_632 - 1_025_000 + 49_152
    assert vit_gflops(L.sub(384, 12)) == pytest.approx(4.6, abs=0.05)
    assert vit_gflops(L.sub(768, 12)) == pytest.approx(17.6, abs=0.1)
    assert vit_gflops(L) == pytest.approx(61.6, abs=0.2)


def _ckpt(tmp_path):
    cfg, model = demo_model()
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 7, "model": model.state_dict(), "config": to_dict(cfg)}, path)
    return cfg, model, path


def test_cli_extract_single_and_all(tmp_path, capsys):
    cfg, model, ckpt = _ckpt(tmp_path)
    out = tmp_path / "s.safetensors"
    assert main(["extract", str(ckpt), "--width", "48", "--depth", "3", "-o", str(out)]) == 0
    dense, meta = load_subnet(out)
    assert meta["width"] == 48 and meta["depth"] == 3 and meta["step"] == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (dense(x) - model.teacher_backbone().eval()(x, 48, 3)).abs().max() < 1e-5
    assert main(["extract", str(ckpt), "--all", "-o", str(tmp_path / "all")]) == 0
    assert len(list((tmp_path / "all").glob("*.safetensors"))) == 16


@pytest.mark.parametrize("args,needle", [
    (["--width", "50", "--depth", "3"], "not in the elastic space"),
    (["--width", "48"], "--width and --depth"),
    ([], "name the sub-networks"),
])
def test_cli_extract_bad_input(tmp_path, capsys, args, needle):
    _, _, ckpt = _ckpt(tmp_path)
    assert main(["extract", str(ckpt), *args, "-o", str(tmp_path / "x.safetensors")]) == 2
    assert needle in capsys.readouterr().err


def test_cli_extract_missing_or_bogus_checkpoint(tmp_path, capsys):
    assert main(["extract", str(tmp_path / "none.pt"), "--all", "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["extract", str(junk), "--all", "-o", str(tmp_path / "o")]) == 2
    assert "could not be read" in capsys.readouterr().err


def test_poa_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "poa_hpc", "subnets", "--config", "configs/vit_l_poa.yaml"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "143 sub-networks" in r.stdout
    assert "384x12" in r.stdout and "intact" in r.stdout
