"""model.init_from: dense checkpoints (timm, poa_hpc, DINOv2's release, the authors') into the elastic
intact network, checked against timm's forward on the same weights (timm's own DINOv2 converter for the
release format); smaller files into their slice; resume wins over init; one-line errors."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from backbones import tiny
from poa_hpc.checkpoint.layout import atomic_save
from poa_hpc.cli import main
from poa_hpc.config import load_config, to_dict
from poa_hpc.models.extract import extract_state_dict, load_subnet, save_subnet
from poa_hpc.models.registry import apply_timm_attributes, get_backbone
from poa_hpc.models.subnets import Subnet
from poa_hpc.train.meta_arch import POA
from poa_hpc.train.trainer import init_from_file

timm = pytest.importorskip("timm")

FAMILIES = ["vit", "swin", "resnet"]


def cfg_of(family, *extra):
    return load_config("configs/demo_cpu.yaml", tiny(family) + list(extra))


def fresh(cfg, seed=123):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return POA(cfg)


def perturb(module, seed=1):
    """Trained-like weights: every tensor moved, LayerScales and biases included, so every block matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module


def timm_model(cfg, sub=None, **extra_kwargs):
    """timm's model of the (sub-)network of ``cfg``'s elastic net, random weights (perturbed), eval mode."""
    spec = get_backbone(cfg.model.arch)
    model = fresh(cfg, seed=7)
    dense, state = extract_state_dict(model.student.backbone, sub or model.intact)
    e = spec.timm_export(dense, state)
    ref = timm.create_model(e.model, pretrained=False, num_classes=0, **{**e.kwargs, **extra_kwargs})
    apply_timm_attributes(ref, e.attributes)
    return perturb(ref).eval()


def teacher_features(model, x, sub=None):
    b = model.teacher.backbone.eval()
    with torch.no_grad():
        return b(x, sub.width, sub.depth) if sub else b(x)


def images(cfg, n=2, size=None):
    s = size or cfg.model.section.img_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_state_dict_gives_timm_features(tmp_path, family):
    """timm.create_model(...).state_dict() saved (.safetensors for ViT/Swin, .pth for ResNet) then init_from:
    the teacher and the intact student give timm's features at step 0; the report lists what was used."""
    cfg = cfg_of(family)
    ref = timm_model(cfg)
    path = tmp_path / ("w.pth" if family == "resnet" else "w.safetensors")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    torch.save(sd, path) if family == "resnet" else save_file(sd, str(path))
    model = fresh(cfg)
    report = init_from_file(model, _with(cfg, path), tmp_path)
    x = images(cfg)
    with torch.no_grad():
        want = ref(x)
    torch.testing.assert_close(teacher_features(model, x), want, rtol=1e-5, atol=1e-5)
    s = model.student.backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(s(x), want, rtol=1e-5, atol=1e-5)
    saved = json.loads((tmp_path / "init_report.json").read_text())
    assert saved == report and saved["format"] == "timm" and saved["intact"] is True
    assert saved["left"] == ["mask_token"] and saved["unused"] == []
    assert set(saved["used"]) == set(sd)


def _with(cfg, path, fmt="auto", heads=False):
    cfg.model.init_from = str(path)
    cfg.model.init_from_format = fmt
    cfg.model.init_heads = heads
    return cfg


def test_timm_vit_without_layerscale_or_qkv_bias(tmp_path):
    """A plain timm ViT (no LayerScale, no qkv bias) is the elastic ViT with LayerScale 1 and zero biases."""
    cfg = cfg_of("vit")
    ref = timm_model(cfg, init_values=None, qkv_bias=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = fresh(cfg)
    report = init_from_file(model, _with(cfg, path), None)
    assert set(report["filled"].values()) == {"LayerScale 1 (the file has none)", "qkv bias 0 (the file has none)"}
    x = images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(teacher_features(model, x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_poa_extracted_file_gives_its_features(tmp_path, family):
    cfg = cfg_of(family)
    src = perturb(fresh(cfg, seed=5))
    arch, state = extract_state_dict(src.teacher.backbone, src.intact)
    path = save_subnet(tmp_path / "intact.safetensors", family, arch, state)
    dense, _ = load_subnet(path)
    model = fresh(cfg)
    report = init_from_file(model, _with(cfg, path), None)
    assert report["format"] == "poa" and report["left"] == [] and report["intact"]
    x = images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(teacher_features(model, x), dense(x), rtol=1e-5, atol=1e-5)


def test_poa_full_checkpoint_teacher_and_heads(tmp_path):
    """checkpoints/step_*.pt: the teacher branch; its heads with model.init_heads=true, else fresh."""
    cfg = cfg_of("vit")
    src = perturb(fresh(cfg, seed=5))
    path = tmp_path / "step_00000007.pt"
    atomic_save({"step": 7, "model": src.state_dict(), "config": to_dict(cfg)}, path)
    model = fresh(cfg)
    heads_before = {k: v.clone() for k, v in model.teacher.heads.state_dict().items()}
    r = init_from_file(model, _with(cfg, path), None)
    assert r["heads"].startswith("fresh") and r["unused"] == ["heads.*", "student.*"]
    assert all(torch.equal(v, model.teacher.heads.state_dict()[k]) for k, v in heads_before.items())
    model = fresh(cfg)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(path.read_bytes())
    r = init_from_file(model, _with(cfg, tmp_path / "run", heads=True), None)  # a run folder: its last.pt
    assert r["heads"] == "loaded" and r["path"].endswith("last.pt")
    for branch in (model.teacher, model.student):
        for k, v in src.teacher.state_dict().items():
            assert torch.equal(branch.state_dict()[k], v), k
    x = images(cfg)
    torch.testing.assert_close(teacher_features(model, x), teacher_features(src, x), rtol=0, atol=0)


@pytest.mark.parametrize("family,sub", [("vit", Subnet(16, 2)), ("vit", Subnet(24, 3)), ("resnet", Subnet(8, (1, 2, 3, 1))),
                                        ("swin", Subnet(12, 4))])
def test_smaller_file_initialises_its_sub_network(tmp_path, family, sub):
    """A dense file of a sub-network's shape (timm's model of it) fills that sub-network's slice: the elastic
    forward of the sub-network equals the file's forward; the rest keeps its initialisation."""
    cfg = cfg_of(family)
    ref = timm_model(cfg, sub)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = fresh(cfg)
    before = {k: v.clone() for k, v in model.teacher.backbone.state_dict().items()}
    r = init_from_file(model, _with(cfg, path), None)
    assert r["subnet"] == str(sub) and not r["intact"]
    assert any("partly" in k for k in r["left"])
    x = images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(teacher_features(model, x, sub), ref(x), rtol=1e-5, atol=1e-5)
    if family == "vit":  # blocks the sub-network skips are untouched
        skipped = [i for i in range(4) if i not in {0, 1, 3}] if sub.depth == 3 else [1, 2]
        for i in skipped:
            k = f"blocks.{i}.attn.qkv.weight"
            assert torch.equal(model.teacher.backbone.state_dict()[k], before[k])


def test_shallower_swin_is_refused(tmp_path, capsys):
    cfg = cfg_of("swin")
    ref = timm_model(cfg, Subnet(16, 3))
    path = tmp_path / "shallow.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    rc = main(["train", "--config", "configs/demo_cpu.yaml", *tiny("swin"), f"train.output_dir={tmp_path / 'r'}",
               f"model.init_from={path}", "train.max_steps=1", "data.num_workers=0", "train.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "window shifts" in err[-1]


# ---------------------------------------------------------------- DINOv2's release format
DINO = ["model.vit.patch_size=14", "model.vit.img_size=56", "data.digits_size=56", "data.global_size=56",
        "data.local_size=28"]


def dinov2_timm(img_size=56, **kw):
    """A tiny timm ViT with the DINOv2 settings (patch 14, LayerScale 1e-5, [CLS] in the position embedding)."""
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=img_size,
                             embed_dim=32, depth=4, num_heads=4, **kw)


def release_state(model):
    """timm's DINOv2 weights written in the release's names and shapes (dinov2/models/vision_transformer.py:
    ``mask_token`` (1, D), ``blocks.N.ls1.gamma``, [CLS] position in ``pos_embed``)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["mask_token"] = torch.randn(1, sd["cls_token"].shape[-1])
    return sd


@pytest.mark.parametrize("chunked", [False, True])
def test_dinov2_release_file_equals_timms_dinov2(tmp_path, chunked):
    """The release file through timm's own converter (checkpoint_filter_fn -> _convert_dinov2) into timm's
    vit_*_patch14_dinov2 is the reference; chunked blocks (``blocks.C.N.*``, ViT-g's layout) read the same."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    src = perturb(dinov2_timm()).eval()
    sd = release_state(src)
    ref = dinov2_timm().eval()
    ref.load_state_dict(checkpoint_filter_fn(dict(sd), ref), strict=True)
    if chunked:  # BlockChunk: chunk c pads with Identity, so its blocks keep their global index
        sd = {(f"blocks.{int(m.group(1)) // 2}.{m.group(1)}.{m.group(2)}" if (m := re.match(r"blocks\.(\d+)\.(.*)", k))
               else k): v for k, v in sd.items()}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    cfg = cfg_of("vit", *DINO)
    model = fresh(cfg)
    r = init_from_file(model, _with(cfg, path), None)
    assert r["format"] == "dinov2" and r["left"] == []
    torch.testing.assert_close(model.teacher.backbone.mask_token, sd["mask_token"])
    x = images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(teacher_features(model, x), ref(x), rtol=1e-5, atol=1e-5)


def test_dinov2_position_embedding_resized_as_in_training(tmp_path):
    """A 98 px (7x7) file into the 56 px (4x4) recipe: DINOv2's interpolate_pos_encoding (scale_factor
    (g + 0.1) / G, bicubic), written out as DINOv2 does."""
    import math

    src = perturb(dinov2_timm(img_size=98))
    sd = release_state(src)
    path = tmp_path / "d.pth"
    torch.save(sd, path)
    cfg = cfg_of("vit", *DINO)
    model = fresh(cfg)
    r = init_from_file(model, _with(cfg, path), None)
    assert r["resized"] == {"pos_embed": [[1, 50, 32], [1, 17, 32]]}
    pos = sd["pos_embed"]
    n = pos.shape[1] - 1
    patch = torch.nn.functional.interpolate(
        pos[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), 32).permute(0, 3, 1, 2),
        scale_factor=((4 + 0.1) / math.sqrt(n), (4 + 0.1) / math.sqrt(n)), mode="bicubic")
    want = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, 16, 32)], 1)
    torch.testing.assert_close(model.teacher.backbone.pos_embed.detach(), want, rtol=0, atol=1e-6)


def test_authors_teacher_checkpoint(tmp_path):
    """The authors' teacher_checkpoint.pth ({"teacher": ...}): DINOv2's names with their DynamicLinear
    (``.linear``) and DynamicLayerNorm (``.norm``) wrappers; their heads are not loaded."""
    cfg = cfg_of("vit")
    src = perturb(fresh(cfg, seed=5))
    teacher = {}
    for k, v in src.teacher.backbone.state_dict().items():
        k = re.sub(r"\.(qkv|proj|fc1|fc2)\.(weight|bias)$", r".\1.linear.\2", k)
        k = re.sub(r"(^|\.)(norm\d?)\.(weight|bias)$", r"\1\2.norm.\3", k)
        teacher["backbone." + k] = v
    teacher["dino_head.0.mlp.0.linear.weight"] = torch.zeros(3, 3)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    model = fresh(cfg)
    r = init_from_file(model, _with(cfg, path), None)
    assert r["format"] == "authors" and r["left"] == [] and r["unused"] == ["dino_head.0.mlp.0.linear.weight"]
    x = images(cfg)
    torch.testing.assert_close(teacher_features(model, x), teacher_features(src, x), rtol=0, atol=0)


# ---------------------------------------------------------------- the authors' Swin and ResNet
# Their names and shapes, written out from their code (alipay/POA: poa/models/swin_transformer.py,
# poa/models/resnet.py, poa/layers/*): DynamicLinear holds an nn.Linear as ``.linear``, DynamicLayerNorm an
# nn.LayerNorm as ``.norm``, DynamicConv2d an nn.Conv2d as ``.conv``; DynamicGroupNorm has its own
# weight/bias.  Swin: ``stages.S.blocks.J.{norm1, attn.w_msa.{qkv, proj, relative_position_bias_table,
# relative_position_index}, norm2, ffn.{fc1, fc2}}``, the merge at the end of stage S
# (``stages.S.downsample.{norm, reduction}``), one output LayerNorm per stage ``norm0..norm3``.  ResNet:
# ``conv1``/``norm1`` stem, ``layerS.layers.J.{conv1..3, norm1..3, downsample.{0, 1}}``.
def authors_merge_order(C):
    """Their DynamicPatchMerging's merged channel order as timm indices: their steps (``nn.Unfold(2, stride
    2)``, transpose, ``chunk`` into C groups of 4, ``stack``, ``flatten``) run on a 2x2 map whose entry
    (c, dh, dw) holds its timm index ``(2 * dw + dh) * C + c`` (timm: x0 = (0, 0), x1 = (1, 0), x2 = (0, 1),
    x3 = (1, 1) as (row, col))."""
    x = torch.empty(1, C, 2, 2)
    for c in range(C):
        for dh in range(2):
            for dw in range(2):
                x[0, c, dh, dw] = (2 * dw + dh) * C + c
    u = torch.nn.Unfold(kernel_size=2, stride=2)(x).transpose(1, 2)  # (1, 1, 4C)
    u = torch.stack(u.chunk(C, dim=-1), dim=-1).flatten(-2)
    return u.flatten().long().tolist()


def test_authors_merge_order_by_hand():
    """C = 2: their slots hold (dh, dw, c) = (0,0,0) (0,0,1) (0,1,0) (0,1,1) (1,0,0) ..., i.e. timm's 0 1 4 5 2 3
    6 7; the same order on a real map through their steps and poa_hpc's PatchMerging concatenation; init_from's
    permutation takes their order to timm's."""
    from poa_hpc.models.init_from import authors_merge_to_timm
    from poa_hpc.models.swin.model import PatchMerging

    assert authors_merge_order(2) == [0, 1, 4, 5, 2, 3, 6, 7]
    C = 3
    x = torch.randn(2, 4, 6, C)  # (B, H, W, C)
    u = torch.nn.Unfold(kernel_size=2, stride=2)(x.permute(0, 3, 1, 2)).transpose(1, 2)
    theirs = torch.stack(u.chunk(C, dim=-1), dim=-1).flatten(-2)  # (B, H/2 * W/2, 4C)
    merge = PatchMerging(C, "torch")
    captured = {}
    merge.norm.register_forward_hook(lambda m, i, o: captured.setdefault("in", i[0]))
    merge(x)
    ours = captured["in"].flatten(1, 2)
    assert torch.equal(theirs, ours[..., authors_merge_order(C)])
    assert torch.equal(authors_merge_to_timm(theirs), ours)


def authors_swin_teacher(sd, stages=4):
    """poa_hpc Swin tensors (timm's names and merge order) in the authors' teacher layout."""
    out = {}
    for k, v in sd.items():
        if m := re.match(r"layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)$", k):
            perm = authors_merge_order(v.shape[-1] // 4)
            name = "norm.norm" if m.group(2) == "norm" else "reduction.linear"
            out[f"stages.{int(m.group(1)) - 1}.downsample.{name}.{m.group(3)}"] = v[..., perm]
        elif m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)$", k):
            rest = m.group(3)
            rest = re.sub(r"^(norm[12])\.", r"\1.norm.", rest)
            rest = re.sub(r"^attn\.(qkv|proj)\.", r"attn.w_msa.\1.linear.", rest)
            rest = rest.replace("attn.relative_position_bias_table", "attn.w_msa.relative_position_bias_table")
            rest = re.sub(r"^mlp\.(fc[12])\.", r"ffn.\1.linear.", rest)
            out[f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"] = v
            if rest.endswith("relative_position_bias_table"):  # their buffer, mmcv's double_step_seq formula
                W = (int(round(v.shape[0] ** 0.5)) + 1) // 2
                seq = (torch.arange(0, (2 * W - 1) * W, 2 * W - 1)[:, None] + torch.arange(W)[None]).reshape(1, -1)
                out[f"stages.{m.group(1)}.blocks.{m.group(2)}.attn.w_msa.relative_position_index"] = (
                    seq + seq.T).flip(1).contiguous()
        elif k.startswith("norm."):
            out[f"norm{stages - 1}.norm.{k[5:]}"] = v
        else:
            out[re.sub(r"^patch_embed\.norm\.", "patch_embed.norm.norm.", k)] = v
    for s in range(stages - 1):  # their per-stage output norms, which their forward does not use
        out[f"norm{s}.norm.weight"] = torch.randn(sd["patch_embed.norm.weight"].shape[0] * 2 ** s)
        out[f"norm{s}.norm.bias"] = torch.randn(sd["patch_embed.norm.weight"].shape[0] * 2 ** s)
    return {"backbone." + k: v for k, v in out.items()}


def authors_resnet_teacher(sd):
    out = {}
    for k, v in sd.items():
        if m := re.match(r"(layer\d)\.(\d+)\.(.*)$", k):
            rest = re.sub(r"^conv(\d)\.", r"conv\1.conv.", m.group(3))
            rest = re.sub(r"^bn(\d)\.", r"norm\1.", rest)
            out[f"{m.group(1)}.layers.{m.group(2)}.{rest}"] = v
        else:
            out[re.sub(r"^bn1\.", "norm1.", k)] = v
    return {"backbone." + k: v for k, v in out.items()}


AUTHORS_RESNET = ["model.resnet.base_channels=8"]  # their mid channels: out / 4 .. out / 2 (8..16 at out 32)


@pytest.mark.parametrize("family,layout", [("swin", "teacher"), ("swin", "full"), ("resnet", "teacher")])
def test_authors_swin_and_resnet_checkpoints(tmp_path, family, layout):
    """The authors' teacher_checkpoint.pth ({"teacher": ...}) and full checkpoint ({"model": {"teacher.*",
    "student.*"}}) of their Swin / ResNet, written from poa_hpc weights in their names, shapes and merge order:
    init_from gives the source's features, intact and for a sub-network."""
    extra = AUTHORS_RESNET if family == "resnet" else []
    cfg = cfg_of(family, *extra)
    src = perturb(fresh(cfg, seed=5))
    sd = src.teacher.backbone.state_dict()
    if family == "resnet":
        for s in range(4):  # their DynamicBottleneck: max mid = out / 2
            assert sd[f"layer{s + 1}.0.conv1.weight"].shape[0] * 2 == sd[f"layer{s + 1}.0.conv3.weight"].shape[0]
    teacher = authors_swin_teacher(sd) if family == "swin" else authors_resnet_teacher(sd)
    teacher["dino_head.mlp.0.linear.weight"] = torch.zeros(3, 3)
    path = tmp_path / "ckpt.pth"
    if layout == "teacher":
        torch.save({"teacher": teacher}, path)
    else:
        torch.save({"model": {**{"teacher." + k: v for k, v in teacher.items()},
                              **{"student." + k: v + 1 for k, v in teacher.items()}}, "iteration": 3}, path)
    model = fresh(cfg)
    r = init_from_file(model, _with(cfg, path), None)
    assert r["format"] == "authors" and r["intact"] and r["left"] == []
    if family == "swin":
        assert r["unused"] == sorted([f"backbone.norm{s}.norm.{p}" for s in range(3) for p in ("bias", "weight")]
                                     + ["dino_head.mlp.0.linear.weight"] + (["student.*"] if layout == "full" else []))
    x = images(cfg)
    sub = Subnet(8, 2) if family == "swin" else Subnet(8, (1, 2, 3, 1))
    torch.testing.assert_close(teacher_features(model, x), teacher_features(src, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher_features(model, x, sub), teacher_features(src, x, sub), rtol=1e-5, atol=1e-5)


def test_authors_extracted_swin_fills_its_sub_network(tmp_path):
    """Their tools/extract_elastic_net.py output: one Swin sub-network as a flat ``backbone.*`` dict in their
    names (sliced, input scales folded in): it fills that sub-network's slice."""
    cfg = cfg_of("swin")
    src = perturb(fresh(cfg, seed=5))
    sub = Subnet(12, 4)
    _, dense = extract_state_dict(src.teacher.backbone, sub)
    path = tmp_path / "teacher_checkpoint_small.pth"
    torch.save(authors_swin_teacher(dense), path)
    model = fresh(cfg)
    r = init_from_file(model, _with(cfg, path), None)
    assert r["format"] == "authors" and r["subnet"] == "12x4" and not r["intact"]
    x = images(cfg)
    torch.testing.assert_close(teacher_features(model, x, sub), teacher_features(src, x, sub), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- one-line errors, exit 2
def _train(tmp_path, *extra, family="vit"):
    return main(["train", "--config", "configs/demo_cpu.yaml", *tiny(family), f"train.output_dir={tmp_path / 'r'}",
                 "train.max_steps=1", "data.num_workers=0", "train.progress=false", *extra])


def _save(tmp_path, name, sd):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    cases = []
    cases.append(([f"model.init_from={tmp_path / 'missing.pth'}"], "does not exist"))
    junk = _save(tmp_path, "junk.safetensors", {"foo.weight": torch.zeros(2)})
    cases.append(([f"model.init_from={junk}"], "in no known format"))
    cfg = cfg_of("vit")
    p8 = _save(tmp_path, "p8.safetensors", timm_model(cfg, patch_size=8, img_size=16).state_dict())
    cases.append(([f"model.init_from={p8}"], "key 'model.vit.patch_size': 4, but"))
    reg = _save(tmp_path, "reg.safetensors", dinov2_timm(reg_tokens=4).state_dict())
    cases.append(([f"model.init_from={reg}", *DINO], "4 register tokens"))
    big = _save(tmp_path, "big.safetensors", timm_model(cfg, embed_dim=48, num_heads=6).state_dict())
    cases.append(([f"model.init_from={big}"], "a larger file is never cropped"))
    sw = _save(tmp_path, "swin.safetensors", timm_model(cfg_of("swin")).state_dict())
    cases.append(([f"model.init_from={sw}"], "set model.arch=swin"))
    cases.append(([f"model.init_from={sw}", "model.init_from_format=dinov2"], "format dinov2"))
    cases.append(([f"model.init_from={sw}", "model.init_from_format=onnx"], "model.init_from_format"))
    glu = release_state(dinov2_timm())
    glu = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in glu.items()}
    torch.save(glu, tmp_path / "g.pth")
    cases.append(([f"model.init_from={tmp_path / 'g.pth'}", *DINO], "SwiGLU"))
    bn = timm_model(cfg_of("resnet"), norm_layer=torch.nn.BatchNorm2d)
    cases.append(([f"model.init_from={_save(tmp_path, 'bn.safetensors', bn.state_dict())}"], "BatchNorm ResNet"))
    torch.save({"teacher": {"backbone.stages.0.blocks.0.attn.w_msa.qkv.linear.weight": torch.zeros(3, 3)}},
               tmp_path / "authors_swin.pth")
    cases.append(([f"model.init_from={tmp_path / 'authors_swin.pth'}"], "not one of the authors' ViT, Swin or ResNet"))
    torch.save({"teacher": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7),
                            "backbone.layer1.layers.0.downsample.2.weight": torch.zeros(3)}}, tmp_path / "avg.pth")
    cases.append(([f"model.init_from={tmp_path / 'avg.pth'}"], "avg_down"))
    for extra, needle in cases:
        assert _train(tmp_path, *extra) == 2, extra
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln]
        assert len(err) == 1 and needle in err[0], (needle, err)


# ---------------------------------------------------------------- resume wins over init
def test_requeued_run_with_init_from_resumes_exactly(tmp_path):
    """Uninterrupted 6 steps vs 3 steps, init file replaced by garbage, then --resume to 6: the resumed
    run never re-reads init_from and ends with the same metrics and weights."""
    cfg = cfg_of("vit")
    path = _save(tmp_path, "init.safetensors", timm_model(cfg).state_dict())
    base = ["data.n_local=2", "optim.batch_size=8", "optim.iters_per_epoch=3", "optim.epochs=2",
            "optim.warmup_epochs=1", "loss.ibot_start_epoch=1", "loss.warmup_teacher_temp_epochs=1",
            "train.log_every=1", "train.checkpoint_every=3", f"model.init_from={path}"]
    args = lambda out, *e: ["train", "--config", "configs/demo_cpu.yaml", *tiny("vit"), *base,
                            f"train.output_dir={out}", "data.num_workers=0", "train.progress=false", *e]
    torch.set_num_threads(1)
    assert main(args(tmp_path / "ref")) == 0
    assert main(args(tmp_path / "cut", "train.max_steps=3")) == 0
    report = json.loads((tmp_path / "cut" / "init_report.json").read_text())
    assert report["intact"] and report["format"] == "timm"
    path.write_bytes(b"garbage")  # a re-read would fail
    # the requeued config may even name another file or format: the keys that only initialise are not checked
    assert main(["train", "--resume", *args(tmp_path / "cut")[1:], "model.init_from_format=timm"]) == 0
    ref = [json.loads(ln) for ln in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss", "intact/dino", "elastic/dino", "lr", "width", "depth")
    assert [r["step"] for r in got] == list(range(6))
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in ref]
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... and a fresh run (no --resume) with the garbage file does read it: exit 2
    assert main(args(tmp_path / "new")) == 2


# ---------------------------------------------------------------- model.swin.init
def test_swin_init_authors_is_pytorch_default_with_zero_tables():
    """authors: PyTorch's Linear default U(-1/sqrt(in), 1/sqrt(in)) for weights and biases (std 1/sqrt(3 in)),
    zero relative-position tables (their DynamicSwinTransformer calls no init); timm: trunc_normal(0.02),
    zero biases, trunc_normal tables."""
    for init in ("authors", "timm"):
        cfg = cfg_of("swin", "model.swin.embed_dim=64", "model.swin.min_width=32", "model.swin.width_step=16",
                     f"model.swin.init={init}")
        b = fresh(cfg).student.backbone
        tables = [m.relative_position_bias_table for m in b.modules() if hasattr(m, "relative_position_bias_table")]
        linears = [m for m in b.modules() if isinstance(m, torch.nn.Linear)]
        qkv = b.layers[2].blocks[0].attn.qkv  # 256 inputs
        if init == "authors":
            assert all(torch.count_nonzero(t) == 0 for t in tables)
            for m in linears:
                bound = 1 / m.in_features ** 0.5
                assert m.weight.abs().max() <= bound and (m.bias is None or m.bias.abs().max() <= bound)
            assert qkv.weight.std().item() == pytest.approx(1 / (3 * 256) ** 0.5, rel=0.05)
            assert qkv.bias.abs().max() > 0
        else:
            assert all(t.std().item() == pytest.approx(0.02, rel=0.2) for t in tables)
            assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
            assert all(m.bias is None or torch.count_nonzero(m.bias) == 0 for m in linears)


def test_swin_init_bad_value_is_one_line(tmp_path, capsys):
    assert _train(tmp_path, "model.swin.init=kaiming", family="swin") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.swin.init" in err[0]


# ---------------------------------------------------------------- patch 14 end to end, the recipe
def test_patch14_run_from_a_dinov2_file_end_to_end(tmp_path):
    """`poa train` with model.vit.patch_size=14 from a DINOv2 release file of another grid: two steps,
    then its checkpoint's teacher started from the file (the report in the run folder)."""
    sd = release_state(perturb(dinov2_timm(img_size=70)))
    path = tmp_path / "d.pth"
    torch.save(sd, path)
    assert _train(tmp_path, *DINO, f"model.init_from={path}", "train.max_steps=2", "head.prototypes=[32]") == 0
    report = json.loads((tmp_path / "r" / "init_report.json").read_text())
    assert report["format"] == "dinov2" and report["resized"]["pos_embed"] == [[1, 26, 32], [1, 17, 32]]


def test_vit_l14_recipe_takes_dinov2_vitl14_and_vitb14_shapes():
    """configs/vit_l14_from_dinov2.yaml against timm's DINOv2 ViT-L/14 and ViT-B/14 shapes (meta tensors, no
    weights): L is the intact network (518 px embedding resized to 224 px), B its 768x12 sub-network."""
    from poa_hpc.models import init_from as I

    cfg = load_config("configs/vit_l14_from_dinov2.yaml")
    spec, arch = get_backbone("vit"), cfg.model.vit
    with torch.device("meta"):
        elastic = {k: v for k, v in spec.build(arch, drop_path_rate=0.0).state_dict().items()}
        for name, want in (("vit_large_patch14_dinov2", Subnet(1024, 24)), ("vit_base_patch14_dinov2", Subnet(768, 12))):
            state = dict(timm.create_model(name, pretrained=False, num_classes=0).state_dict())
            assert state["pos_embed"].shape[1] == 1 + 37 * 37
            state["pos_embed"] = torch.empty(1, 1 + 16 * 16, state["pos_embed"].shape[-1])  # after the resize
            assert I._find_subnet(spec, arch, elastic, state)[0] == want
    assert cfg.model.init_from.endswith("dinov2_vitl14_pretrain.pth") and arch.patch_size == 14


# ---------------------------------------------------------------- poa bench demo: init_from_recipe
@pytest.mark.slow  # two tiny trainings and their k-NN evaluations (~15 s idle)
def test_bench_demo_recipe_starts_from_another_recipes_intact_teacher(tmp_path, capsys):
    from poa_hpc.config import to_yaml

    base = tiny("vit") + ["data.n_local=0", "data.num_workers=0", "optim.batch_size=16", "optim.iters_per_epoch=2",
                          "optim.epochs=1", "optim.warmup_epochs=1", "train.log_every=1"]
    (tmp_path / "base.yaml").write_text(to_yaml(load_config("configs/demo_cpu.yaml", base)))
    recipes = tmp_path / "r.yaml"
    recipes.write_text("_base: base.yaml\ndense:\n  overrides: [loss.lam=1.0]\n"
                       "init:\n  overrides: []\n  init_from_recipe: dense\n")
    assert main(["bench", "demo", "--recipe-file", str(recipes), "--workdir", str(tmp_path / "w"), "--out", ""]) == 0
    report = json.loads((tmp_path / "w" / "init" / "init_report.json").read_text())
    assert report["format"] == "poa" and report["intact"] and report["path"].endswith("dense/intact.safetensors")
    row = json.loads((tmp_path / "w" / "init" / "bench_row.json").read_text())
    assert row["config"]["model.init_from"] == report["path"]
    dense, _ = load_subnet(report["path"])
    from poa_hpc.train.load import load_teacher

    _, teacher, _ = load_teacher(str(tmp_path / "w" / "dense" / "checkpoints" / "last.pt"), "teacher")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), teacher(x), rtol=1e-5, atol=1e-5)
