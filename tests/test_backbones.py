"""Contract tests every registered backbone family inherits (as timm's tests over ``list_models()``).

For each family, on its tiny configuration (``tests/backbones.py``):
* the elastic forward of sampled sub-networks equals the forward of the extracted dense network;
* the gradient of a sub-network's forward lands only in the entries extraction reads;
* layer ids and weight-decay exemptions equal a hand-written table;
* ``poa subnets``, ``poa extract`` and ``poa eval knn`` work on a checkpoint of the family.
The multi-process contract (FSDP / ZeRO == one process, SIGKILL then resume) is in
``test_backbones_distributed.py``.
"""

from dataclasses import replace

import pytest
import torch

from backbones import MODEL, RULES, tiny
from poa_hpc.checkpoint.layout import atomic_save
from poa_hpc.cli import main
from poa_hpc.config import load_config, to_dict
from poa_hpc.models.registry import backbone_names, get_backbone
from poa_hpc.models.subnets import SubnetSampler
from poa_hpc.train.meta_arch import POA
from poa_hpc.train.optim import ParamRules

FAMILIES = backbone_names()


def cfg_of(family, *extra):
    return load_config("configs/demo_cpu.yaml", tiny(family) + ["data.n_local=2", *extra])


def trained_like(cfg, seed=0, dtype=torch.float64):
    """The teacher backbone of a fresh POA model with biases, norms and LayerScales moved away from
    their init, so every block and every channel matters."""
    torch.manual_seed(seed)
    model = POA(cfg)
    bb = model.teacher_backbone().to(dtype).eval().requires_grad_(True)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if n.endswith("bias") or "norm" in n or "gamma" in n or "bn" in n or "gn" in n or p.ndim <= 1:
                p.add_(0.3 * torch.randn_like(p))
    return model, bb


def subnets_to_check(space, n=6):
    sampler = SubnetSampler(space, seed=0)
    subs = {sampler.sample(t) for t in range(n)} | {space.intact, min(space.all())}
    return sorted(subs)


def test_every_registered_family_has_a_tiny_config():
    assert set(FAMILIES) == set(MODEL) == set(RULES)
    assert "vit" in FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_elastic_forward_equals_extracted_dense_forward(family):
    cfg = cfg_of(family)
    model, bb = trained_like(cfg)
    spec, arch = model.spec, cfg.model.section
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(3, 3, s, s, generator=g, dtype=torch.float64) for s in (cfg.data.global_size,
                                                                                  cfg.data.local_size)]
    for sub in subnets_to_check(model.space):
        dense_arch, state = spec.extract_tensors(bb.state_dict(), arch, sub)
        dense = spec.build_dense(dense_arch).double().eval()
        dense.load_state_dict(state)
        assert sum(p.numel() for n, p in dense.named_parameters() if "mask_token" not in n) == spec.params(arch, sub)
        with torch.no_grad():
            for x in views:
                want = bb(x, sub.width, sub.depth, features=True)
                got = dense(x, features=True)
                assert got["x_norm_clstoken"].shape == (3, spec.feature_dim(arch, sub.width))
                for k in ("x_norm_clstoken", "x_norm_patchtokens"):
                    torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-10, msg=f"{sub} {k}")


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_land_only_in_the_entries_extraction_reads(family):
    cfg = cfg_of(family)
    model, bb = trained_like(cfg)
    spec, arch = model.spec, cfg.model.section
    params = dict(bb.named_parameters())
    space = model.space
    sub = min(s for s in space.all() if s.depth != space.intact.depth and s.width != space.intact.width)
    # Which entries the dense sub-network is made of: extraction is slicing and scaling, so the
    # gradient of the sum of its tensors is non-zero exactly there.
    _, tensors = spec.extract_tensors(params, arch, sub)
    used = torch.autograd.grad(sum(t.sum() for t in tensors.values()), list(params.values()), allow_unused=True)
    used = {n: (u != 0) if u is not None else torch.zeros_like(p, dtype=torch.bool)
            for (n, p), u in zip(params.items(), used)}
    grid = spec.mask_grid(arch, cfg.data.global_size)
    masks = torch.zeros(2, grid * grid, dtype=torch.bool)
    masks[0, : grid] = True
    x = torch.randn(2, 3, cfg.data.global_size, cfg.data.global_size, dtype=torch.float64)
    out = bb(x, sub.width, sub.depth, masks=masks, features=True)
    loss = (out["x_norm_clstoken"] * torch.randn_like(out["x_norm_clstoken"])).sum() + \
        (out["x_norm_patchtokens"] * torch.randn_like(out["x_norm_patchtokens"])).sum()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    touched = 0
    for (n, p), gr in zip(params.items(), grads):
        gr = torch.zeros_like(p) if gr is None else gr
        assert gr[~used[n]].abs().max().item() == 0 if (~used[n]).any() else True, f"{sub}: gradient outside the slice of {n}"
        touched += bool(gr[used[n]].abs().sum() > 0)
    # every parameter the sub-network is made of gets a gradient (all but a handful, e.g. biases whose
    # effect a following norm cancels)
    assert touched >= 0.9 * sum(bool(u.any()) for u in used.values())
    assert any(not u.any() for u in used.values()) or len(space.depths) == 1  # skipped blocks exist


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_blocks_on_an_empty_batch_give_every_parameter_a_gradient(family):
    """Sharded engines run the blocks a sub-network skips on an empty batch so that ranks training
    different depths issue the same per-block collectives.  That holds only if every parameter of a
    skipped block gets a gradient (zeros) there: FSDP2 reduce-scatters the parameters that have one, so a
    parameter left at None on one rank only is a collective-size mismatch."""
    cfg = cfg_of(family)
    model, bb = trained_like(cfg)
    space = model.space
    sub = min(space.all())
    x = torch.randn(2, 3, cfg.data.global_size, cfg.data.global_size, dtype=torch.float64)
    with torch.no_grad():
        want = bb(x, sub.width, sub.depth)
    bb.sync_skipped_blocks = True
    out = bb(x, sub.width, sub.depth)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)  # the skipped blocks change nothing
    out.sum().backward()
    missing = [n for n, p in bb.named_parameters() if p.grad is None and n != "mask_token"]
    assert not missing, f"{sub}: no gradient for {missing[:5]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_ids_and_weight_decay_by_hand(family):
    cfg = cfg_of(family, "optim.layer_decay=0.5", "optim.patch_embed_lr_mult=0.2")
    model = POA(cfg)
    rules = ParamRules(cfg)
    expect = RULES[family]
    names = [n for n, _ in model.student.named_parameters()]
    for name in names:
        layer, no_wd = expect(name)
        assert rules.layer_id(name) == layer, name
        lr, wd, last = rules(name)
        assert wd == (0.0 if no_wd else 1.0), name
        assert last == ("last_layer" in name), name
        mult = 0.2 if name.startswith("backbone.") and get_backbone(family).is_patch_embed(name[9:]) else 1.0
        assert lr == pytest.approx(0.5 ** (rules.num_layers + 1 - layer) * mult), name


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_subnets_extract_and_knn(family, tmp_path, capsys):
    over = tiny(family)
    cfg = cfg_of(family)
    torch.manual_seed(0)
    model = POA(cfg)
    ckpt = tmp_path / "ckpt.pt"
    atomic_save({"step": 3, "model": model.state_dict(), "config": to_dict(cfg)}, ckpt)
    space = model.space

    assert main(["subnets", "--config", "configs/demo_cpu.yaml", *over]) == 0
    out = capsys.readouterr().out
    assert f"{len(space)} sub-networks" in out and str(min(space.all())) in out and "intact" in out

    assert main(["extract", str(ckpt), "--all", "-o", str(tmp_path / "all")]) == 0
    files = sorted((tmp_path / "all").glob("*.safetensors"))
    assert len(files) == len(space) and all(f.name.startswith(f"{family}_") for f in files)

    picked = [str(tmp_path / "all" / f"{family}_{s}.safetensors") for s in (min(space.all()), space.intact)]
    capsys.readouterr()
    assert main(["eval", "knn", *picked]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"{family}_")]
    assert len(rows) == 2 and all(0.0 <= float(r.split()[-1].rstrip("%")) <= 100.0 for r in rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_poa_export_timm_gives_the_same_features(family, tmp_path, capsys):
    """`poa export --format timm` (run -> timm state dict + JSON) loads strictly into timm.create_model and
    gives the elastic teacher's features at the native input size, and at the local-crop size unless the
    family refuses that size with a one-line reason (Swin: timm pads windows differently there)."""
    timm = pytest.importorskip("timm")
    import json

    from safetensors.torch import load_file

    from poa_hpc.models.registry import apply_timm_attributes

    cfg = cfg_of(family)
    model, bb = trained_like(cfg, dtype=torch.float32)
    ckpt = tmp_path / "ckpt.pt"
    atomic_save({"step": 5, "model": model.state_dict(), "config": to_dict(cfg)}, ckpt)
    subs = [min(model.space.all()), model.space.intact]
    for size in (cfg.data.global_size, cfg.data.local_size):
        out = tmp_path / f"export{size}"
        capsys.readouterr()
        code = main(["export", str(ckpt), "--format", "timm", *[a for s in subs for a in ("--subnet", str(s))],
                     "--img-size", str(size), "-o", str(out)])
        if code == 2 and size != cfg.data.global_size:
            err = capsys.readouterr().err
            assert "would differ" in err and len(err.strip().splitlines()) == 1, err
            continue
        assert code == 0
        for sub in subs:
            meta = json.loads((out / f"{family}_{sub}.json").read_text())
            assert meta["input_size"] == [3, size, size] and meta["poa_hpc"]["step"] == 5
            assert meta["poa_hpc"]["width"] == sub.width
            ref = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0, **meta["timm_kwargs"])
            apply_timm_attributes(ref, meta["timm_attributes"])
            ref.load_state_dict(load_file(str(out / f"{family}_{sub}.safetensors")), strict=True)
            x = torch.randn(2, 3, size, size)
            with torch.no_grad():
                diff = (ref.eval()(x) - bb(x, sub.width, sub.depth)).abs().max().item()
            assert diff < 1e-5, (sub, size, diff)
    # one extracted poa_hpc file -> timm, and the safetensors format round trip
    assert main(["export", str(ckpt), "--format", "safetensors", "--subnet", str(subs[0]), "-o", str(tmp_path / "p")]) == 0
    single = tmp_path / "p" / f"{family}_{subs[0]}.safetensors"
    assert main(["export", str(single), "-o", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / f"{family}_{subs[0]}.json").is_file()
    assert main(["export", str(single), "--all", "-o", str(tmp_path / "t")]) == 2
    assert "holds one extracted sub-network" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_named_sizes_at_their_real_shapes_round_trip_through_timm(family):
    """The paper's named sizes (ViT-S/B/L, ...) at their real widths and depths, cut from the family's
    recipe network, load into timm and give the same features (fp32, small inputs to keep it fast)."""
    pytest.importorskip("timm")
    from poa_hpc.config import packaged_config
    from poa_hpc.models.extract import extract_state_dict

    spec = get_backbone(family)
    cfg = load_config(packaged_config(spec.recipe))
    arch = cfg.model.section
    named = spec.named_sizes(arch)
    assert named, f"{spec.recipe} names no sizes"
    torch.manual_seed(0)
    bb = spec.build(arch, drop_path_rate=0.0).eval()
    size = 64  # small, to keep it fast; the native size where the family's export refuses 64 px
    for label, sub in named.items():
        dense, state = extract_state_dict(bb, sub)
        try:
            spec.timm_export(dense, state, img_size=size)
        except ValueError:
            size = arch.img_size
        ref = spec.timm_model(dense, state, img_size=size)
        # (built for `size`: a ViT's position embedding has that many entries)
        assert sum(p.numel() for p in ref.parameters()) == spec.params(replace(arch, img_size=size), sub), label
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            diff = (ref(x) - bb(x, sub.width, sub.depth)).abs().max().item()
        assert diff < 1e-5, (label, diff)
        del ref, dense, state
