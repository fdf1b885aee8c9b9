"""`poa eval sweep` / `poa eval linear`: the linear probe, the Pareto front, sub-network selection, the
sweep's k-NN against `poa eval knn` on extracted files, and the files behind the plot.

Everything runs on the tiny network of each registered family (``tests/backbones.py``) and the
digits at 16 px (1,438 train / 359 val images)."""

import contextlib
import csv
import io
import json
import math
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from backbones import tiny
from poa_hpc.checkpoint.layout import atomic_save
from poa_hpc.cli import main
from poa_hpc.config import load_config, to_dict
from poa_hpc.eval.linear import cosine_lr, linear_probe, probe_features
from poa_hpc.eval.pareto import pareto_front
from poa_hpc.eval.plot import read_reference
from poa_hpc.eval.sweep import CSV_COLUMNS, resolve_subnets, run_sweep, subsample_per_class
from poa_hpc.models.registry import backbone_names, get_backbone
from poa_hpc.train.meta_arch import POA

FAMILIES = backbone_names()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ linear probe
def _clusters(n, centers, noise, gen):
    """Balanced classes: n // C points per class around its centre."""
    C, D = centers.shape
    y = torch.arange(C).repeat_interleave(n // C)
    return centers[y] + noise * torch.randn(len(y), D, generator=gen), y


def test_linear_probe_separates_a_linearly_separable_set():
    gen = torch.Generator().manual_seed(0)
    C, D = 8, 24
    centers = 3.0 * F.normalize(torch.randn(C, D, generator=gen), dim=1)
    xtr, ytr = _clusters(800, centers, 0.25, gen)
    xva, yva = _clusters(400, centers, 0.25, gen)
    # separable indeed: the nearest centre classifies every point (a linear rule, as centres have equal norms)
    for x, y in ((xtr, ytr), (xva, yva)):
        assert torch.equal(torch.cdist(x, centers).argmin(1), y)
    res = linear_probe(xtr, ytr, xva, yva, C, epochs=30)
    assert res.top1 == 100.0
    assert res.lr in res.per_lr and res.per_lr[res.lr] == res.top1
    assert res.weight.shape == (D, C) and res.bias.shape == (C,)


def test_linear_probe_is_at_chance_on_shuffled_labels():
    gen = torch.Generator().manual_seed(1)
    C, D = 5, 24
    centers = 3.0 * F.normalize(torch.randn(C, D, generator=gen), dim=1)
    xtr, ytr = _clusters(2000, centers, 0.25, gen)
    xva, yva = _clusters(1000, centers, 0.25, gen)
    assert linear_probe(xtr, ytr, xva, yva, C, epochs=20).top1 == 100.0  # the same set with its labels...
    ytr_s = ytr[torch.randperm(len(ytr), generator=gen)]
    yva_s = yva[torch.randperm(len(yva), generator=gen)]
    res = linear_probe(xtr, ytr_s, xva, yva_s, C, epochs=20)  # ...and with shuffled ones: nothing to learn
    assert 100 / C - 6 < res.top1 < 100 / C + 6, res.per_lr  # chance is 20 %; best of 5 lrs on 1,000 images


def test_linear_probe_is_momentum_sgd_with_cosine_decay():
    """One learning rate without standardisation equals nn.Linear + torch.optim.SGD(momentum=0.9) on the
    same mini-batches (same seed: initial weight drawn first, then one permutation per epoch)."""
    gen = torch.Generator().manual_seed(2)
    n, D, C, bs, epochs, lr = 150, 7, 4, 32, 3, 0.3
    x, y = torch.randn(n, D, generator=gen), torch.randint(0, C, (n,), generator=gen)
    res = linear_probe(x, y, x[:10], y[:10], C, lrs=[lr], epochs=epochs, batch_size=bs, seed=5, standardized=False)

    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(D, C)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(D, C, generator=g) * 0.01).t())
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9)
    steps, t = epochs * math.ceil(n / bs), 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, bs):
            i = perm[s : s + bs]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
            opt.zero_grad()
            F.cross_entropy(lin(x[i]), y[i]).backward()
            opt.step()
            t += 1
    torch.testing.assert_close(res.weight, lin.weight.detach().t(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.bias, lin.bias.detach(), rtol=1e-4, atol=1e-6)
    assert cosine_lr(2.0, 0, 10) == 2.0 and cosine_lr(2.0, 5, 10) == pytest.approx(1.0)


def test_linear_probe_deterministic_in_its_seed():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 10, generator=gen), torch.randint(0, 3, (300,), generator=gen)
    a = linear_probe(x, y, x, y, 3, epochs=3, seed=0)
    b = linear_probe(x, y, x, y, 3, epochs=3, seed=0)
    c = linear_probe(x, y, x, y, 3, epochs=3, seed=1)
    assert torch.equal(a.weight, b.weight) and a.per_lr == b.per_lr
    assert not torch.equal(a.weight, c.weight)


def test_probe_features_concatenate_cls_and_mean_patch_tokens():
    cls, patches = torch.randn(2, 3), torch.randn(2, 5, 3)
    f = probe_features({"x_norm_clstoken": cls, "x_norm_patchtokens": patches})
    assert torch.equal(f[:, :3], cls) and torch.allclose(f[:, 3:], patches.sum(1) / 5)


# ------------------------------------------------------------------ Pareto front
def test_pareto_front_hand_made_points():
    #        0    1    2    3    4    5    6    7
    cost = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 0.5, 4.0]
    acc = [50., 60., 55., 58., 70., 70., 40., 70.]
    # 0.5/40 and 1/50 are the two cheapest and best so far; 2/55 loses to 2/60; 3/58 to 2/60;
    # 4/70 (twice: a duplicate) beats everything below it; 5/70 costs more for the same accuracy.
    assert pareto_front(cost, acc) == [6, 0, 1, 4, 7]
    assert pareto_front([], []) == []
    assert pareto_front([1.0, float("nan"), 2.0], [1.0, 9.0, float("nan")]) == [0]


def test_pareto_front_equals_the_definition_on_random_points():
    rnd = random.Random(0)
    for _ in range(50):
        n = rnd.randint(1, 25)
        cost = [float(rnd.randint(1, 8)) for _ in range(n)]  # small ranges: many ties
        acc = [float(rnd.randint(1, 8)) for _ in range(n)]

        def dominated(i):
            return any(cost[j] <= cost[i] and acc[j] >= acc[i] and (cost[j], acc[j]) != (cost[i], acc[i])
                       for j in range(n))

        assert sorted(pareto_front(cost, acc)) == [i for i in range(n) if not dominated(i)]


# ------------------------------------------------------------------ sub-network selection
@pytest.mark.parametrize("family", FAMILIES)
def test_resolve_subnets(family):
    spec = get_backbone(family)
    for arch in (load_config("configs/demo_cpu.yaml", tiny(family)).model.section, spec.config_cls()):
        space, named = spec.space(arch), spec.named_sizes(arch)
        assert resolve_subnets(family, arch, "all") == space.all()
        smallest, intact = min(space.all()), space.intact
        assert resolve_subnets(family, arch, f"{intact}, {smallest},{intact}") == [intact, smallest]
        for name, sub in named.items():
            assert resolve_subnets(family, arch, name) == [sub]
            assert resolve_subnets(family, arch, name.upper()) == [sub]
        for bad in ("XL", f"{intact.width + 1}x{str(intact).split('x')[1]}", "12x", ""):
            with pytest.raises(ValueError) as err:
                resolve_subnets(family, arch, f"{smallest},{bad}")
            msg = str(err.value)
            assert repr(bad) in msg and "allowed: all" in msg and "\n" not in msg
            assert all(name in msg for name in named)


def test_short_forms_of_named_vit_sizes():
    arch = load_config("configs/vit_l_poa.yaml").model.section
    want = [(384, 12), (768, 12), (1024, 24)]
    assert [(s.width, s.depth) for s in resolve_subnets("vit", arch, "S,B,L")] == want
    assert [(s.width, s.depth) for s in resolve_subnets("vit", arch, "vit-s,ViT-B,1024x24,s")] == want
    assert [(s.width, s.depth) for s in resolve_subnets("vit", arch, "448x13,S")] == [(448, 13), (384, 12)]


def test_subsample_per_class():
    targets = [0] * 10 + [1] * 3 + [2] * 7
    a = subsample_per_class(targets, 5, seed=0)
    assert a == sorted(set(a)) and [targets[i] for i in a].count(0) == 5
    assert [targets[i] for i in a].count(1) == 3 and [targets[i] for i in a].count(2) == 5
    assert subsample_per_class(targets, 5, seed=0) == a
    assert any(subsample_per_class(targets, 5, seed=s) != a for s in range(1, 5))
    assert subsample_per_class(targets, 100, seed=0) == list(range(20))


# ------------------------------------------------------------------ the sweep on a tiny checkpoint
def _checkpoint(family, path):
    """A checkpoint of the tiny ``family`` network whose teacher's weights are redrawn so that features
    differ clearly between images: every matrix / kernel ``N(0, 1 / fan_in)`` (variance-preserving),
    biases, norms and LayerScales moved away from their init.  At init (weights of std 0.02,
    LayerScale 1e-5) every image's [CLS] has nearly the same direction, and k-NN decisions would
    hang on float roundoff."""
    cfg = load_config("configs/demo_cpu.yaml", tiny(family) + ["data.num_workers=0"])
    torch.manual_seed(0)
    model = POA(cfg)
    with torch.no_grad():
        for p in model.teacher_backbone().parameters():
            if p.ndim >= 2:
                p.normal_(0.0, (p.numel() / p.shape[0]) ** -0.5)
            else:
                p.add_(0.3 * torch.randn_like(p))
    atomic_save({"step": 7, "model": model.state_dict(), "config": to_dict(cfg)}, path)
    return cfg, model.space


def _table_top1(text, prefix):
    """{sub-network: [percentages printed on its line]}"""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            out[line.split()[0]] = [float(t.rstrip("%")) for t in line.split() if t.endswith("%")]
    return out


def _main(*argv):
    """``main(argv)`` with its stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", params=FAMILIES)
def swept(request, tmp_path_factory):
    """`poa eval sweep` of 3 sub-networks of each family's tiny checkpoint (overrides after the options,
    default output folder <run>/eval), and `poa eval knn` of the same 3 sub-networks extracted."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"sweep_{family}")
    run = tmp / "run"
    _, space = _checkpoint(family, run / "checkpoints" / "last.pt")
    subs = [min(space.all()), space.all()[len(space) // 2], space.intact]
    code, sweep_out, err = _main("eval", "sweep", run, "--subnets", ",".join(map(str, subs)), "--no-progress",
                                 "--linear-epochs", "30", "data.num_workers=0")
    assert code == 0, err
    code, _, err = _main("extract", run, *[a for s in subs for a in ("--subnet", s)], "-o", tmp / "files")
    assert code == 0, err
    files = [tmp / "files" / f"{family}_{s}.safetensors" for s in subs]
    code, knn_out, err = _main("eval", "knn", *files)
    assert code == 0, err
    return {"family": family, "run": run, "subs": subs, "space": space, "files": files, "sweep": sweep_out,
            "knn": knn_out}


def test_sweep_knn_equals_eval_knn_on_extracted_files(swept):
    family, subs = swept["family"], swept["subs"]
    sweep = _table_top1(swept["sweep"], f"{family}_")
    knn = _table_top1(swept["knn"], f"{family}_")
    names = [f"{family}_{s}" for s in subs]
    assert list(sweep) == names and list(knn) == names
    for name in names:
        assert sweep[name][0] == knn[name][0], name  # the k-NN column, as printed
    rows = json.loads((swept["run"] / "eval" / "sweep.json").read_text())["rows"]
    assert [f"{r['knn_top1']:.2f}" for r in rows] == [f"{knn[n][0]:.2f}" for n in names]
    # not a degenerate case (ties between near-identical features would make "equal" luck)
    assert max(r["knn_top1"] for r in rows) > 30.0


def test_sweep_files_have_one_row_per_subnet(swept):
    family, subs = swept["family"], swept["subs"]
    out = swept["run"] / "eval"
    with (out / "sweep.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    doc = json.loads((out / "sweep.json").read_text())
    cfg = load_config("configs/demo_cpu.yaml", tiny(family))
    spec, arch, size = get_backbone(family), cfg.model.section, cfg.data.digits_size  # digits: eval at that size
    assert len(rows) == len(doc["rows"]) == len(subs)
    for row, jrow, sub in zip(rows, doc["rows"], subs):
        assert row["name"] == jrow["name"] == f"{family}_{sub}"
        assert int(row["width"]) == sub.width and row["depth"] == str(sub).split("x", 1)[1]
        assert float(row["params_m"]) == pytest.approx(spec.params(arch, sub) / 1e6)
        assert float(row["gflops"]) == pytest.approx(spec.gflops(arch, sub, img_size=size))
        assert float(row["knn_top1"]) == pytest.approx(jrow["knn_top1"])
        assert 0.0 <= float(row["linear_top1"]) <= 100.0 and float(row["linear_lr"]) in doc["provenance"]["linear"]["lr_grid"]
        per_lr = {float(k): v for k, v in jrow["linear_per_lr"].items()}
        assert list(per_lr) == doc["provenance"]["linear"]["lr_grid"]
        assert max(per_lr.values()) == jrow["linear_top1"] == per_lr[jrow["linear_lr"]]
    prov = doc["provenance"]
    assert prov["family"] == family and prov["step"] == 7 and prov["checkpoint"].endswith("run:teacher")
    assert prov["knn"]["k"] == 20 and prov["knn"]["temperature"] == 0.07
    assert prov["dataset"]["n_train"] == 1438 and prov["dataset"]["n_val"] == 359
    png = (out / "sweep.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    # the printed table has the same rows
    assert list(_table_top1(swept["sweep"], f"{family}_")) == [r["name"] for r in rows]


def test_eval_linear_on_extracted_files_matches_the_sweep(swept):
    family = swept["family"]
    code, out, err = _main("eval", "linear", *swept["files"], "--no-progress", "--linear-epochs", "30",
                           "data.num_workers=0")
    assert code == 0, err
    lin = _table_top1(out, f"{family}_")
    rows = json.loads((swept["run"] / "eval" / "sweep.json").read_text())["rows"]
    assert list(lin) == [r["name"] for r in rows]
    for r in rows:
        # same protocol on the same features up to float roundoff (dense vs elastic forward): at most one
        # of the 359 validation images may fall on the other side of a decision boundary
        assert abs(lin[r["name"]][0] - r["linear_top1"]) <= 100 / 359 + 1e-9, r["name"]
    assert "k-NN" not in out


def test_bad_input_is_a_one_line_error(swept):
    run, space = swept["run"], swept["space"]
    bad_runs = [
        (["--subnets", f"{min(space.all())},XL"], "'XL'"),
        (["--subnets", f"{space.intact.width * 8}x1"], f"'{space.intact.width * 8}x1'"),
        (["--train-per-class", "0"], "--train-per-class"),
        (["--lrs", "0.1,abc"], "--lrs"),
        (["--max-feature-gb", "0"], "--max-feature-gb"),
        (["--reference", run / "missing.csv"], "missing.csv"),
        (["model.vit.depth=3"], "model.vit.depth"),
    ]
    for extra, needle in bad_runs:
        code, out, err = _main("eval", "sweep", run, "--no-progress", *extra)
        assert code == 2, (extra, err)
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    code, _, err = _main("eval", "sweep", run / "nope")
    assert code == 2 and "does not exist" in err
    code, _, err = _main("eval", "linear", run / "nope.safetensors")
    assert code == 2 and "does not exist" in err


def test_train_per_class_and_grouped_passes(swept, tmp_path):
    """--train-per-class subsamples the train split; features of more networks than fit in
    max_feature_gb are computed in several passes with the same results."""
    from poa_hpc.train.load import load_teacher

    cfg, backbone, step = load_teacher(str(swept["run"]), "teacher")
    subs = swept["subs"][:2]
    kw = dict(train_per_class=20, epochs=5, progress=False, log=lambda s: None, num_workers=0)
    one = run_sweep(cfg, backbone, subs, tmp_path / "one", **kw)
    logs = []
    two = run_sweep(cfg, backbone, subs, None, max_feature_gb=1e-9, **{**kw, "log": logs.append})
    assert any("2 passes over the data" in m for m in logs)
    assert [(r.knn_top1, r.linear_top1) for r in one] == [(r.knn_top1, r.linear_top1) for r in two]
    prov = json.loads((tmp_path / "one" / "sweep.json").read_text())["provenance"]["dataset"]
    assert prov["n_train"] == 200 and prov["train_per_class"] == 20 and prov["n_train_total"] == 1438


def test_sweep_on_an_imagenet_layout_folder(swept, tmp_path):
    """train/<class>/*.jpg and val/<class>/*.jpg, resized to eval.image_size; --train-per-class on it."""
    import numpy as np
    from PIL import Image

    from poa_hpc.train.load import load_teacher

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 30, (20 + i, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg")
    train_cfg, backbone, _ = load_teacher(str(swept["run"]), "teacher")
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={tmp_path / 'data'}", "eval.image_size=16",
                             "eval.knn_k=3"], base=to_dict(train_cfg))
    rows = run_sweep(cfg, backbone, swept["subs"][:2], tmp_path / "out", train_per_class=4, epochs=20,
                     progress=False, log=lambda s: None, num_workers=0)
    assert len(rows) == 2 and all(r.knn_top1 is not None and r.linear_top1 is not None for r in rows)
    prov = json.loads((tmp_path / "out" / "sweep.json").read_text())["provenance"]
    assert prov["dataset"]["n_train"] == 8 and prov["dataset"]["n_val"] == 6 and prov["knn"]["k"] == 3
    assert prov["dataset"]["root"] == str(tmp_path / "data") and prov["dataset"]["image_size"] == 16


def test_without_matplotlib_json_and_csv_are_written(swept, tmp_path, monkeypatch):
    from poa_hpc.train.load import load_teacher

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    cfg, backbone, _ = load_teacher(str(swept["run"]), "teacher")
    logs = []
    run_sweep(cfg, backbone, swept["subs"][:1], tmp_path, train_per_class=5, linear=False, progress=False,
              log=logs.append, num_workers=0)
    assert (tmp_path / "sweep.json").is_file() and (tmp_path / "sweep.csv").is_file()
    assert not (tmp_path / "sweep.png").exists()
    assert any("pip install 'poa_hpc[plot]'" in m for m in logs)


# ------------------------------------------------------------------ reference points and the plot
def test_paper_reference_points():
    """The shipped reference CSV holds spec §5's ImageNet numbers and the ViT-S/B/L GFLOPs."""
    ref = read_reference("benchmarks/reference/poa_paper_vit.csv")
    got = {(r["name"], r["metric"]): (r["gflops"], r["accuracy"]) for r in ref}
    assert got == {("ViT-S", "knn"): (4.6, 76.8), ("ViT-S", "linear"): (4.6, 77.6),
                   ("ViT-B", "knn"): (17.6, 80.9), ("ViT-B", "linear"): (17.6, 81.7),
                   ("ViT-L", "knn"): (61.6, 82.3), ("ViT-L", "linear"): (61.6, 83.6)}
    # and those GFLOPs are what the ViT spec counts for the named sizes at 224 px
    arch = load_config("configs/vit_l_poa.yaml").model.section
    spec = get_backbone("vit")
    for name, sub in spec.named_sizes(arch).items():
        assert spec.gflops(arch, sub, img_size=224) == pytest.approx(got[(name, "knn")][0], abs=0.05)


def test_bad_reference_files(tmp_path):
    cases = {"cols.csv": "name,flops,accuracy\nA,1,2\n", "num.csv": "name,gflops,accuracy\nA,x,2\n",
             "metric.csv": "name,gflops,accuracy,metric\nA,1,2,top5\n", "empty.csv": "# nothing\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as err:
            read_reference(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_plot_with_reference_and_named_sizes(tmp_path):
    pytest.importorskip("matplotlib")
    from poa_hpc.eval.plot import plot_sweep
    from poa_hpc.eval.sweep import SweepRow

    arch = load_config("configs/vit_l_poa.yaml").model.section
    spec = get_backbone("vit")
    named = {s: n for n, s in spec.named_sizes(arch).items()}
    rows = [SweepRow(f"vit_{s}", named.get(s, ""), s.width, s.depth, spec.params(arch, s) / 1e6,
                     spec.gflops(arch, s, img_size=224), {"knn_top1": 60 + s.width / 50 + s.depth / 3,
                                                          "linear_top1": 62 + s.width / 50, "linear_lr": 0.1})
            for s in spec.space(arch).all()]
    ref = read_reference("benchmarks/reference/poa_paper_vit.csv")
    path = plot_sweep(rows, tmp_path / "p.png", title="test", reference=ref, reference_label="paper",
                      img_size=224, knn={"k": 20, "temperature": 0.07})
    assert path.read_bytes().startswith(PNG_MAGIC)
