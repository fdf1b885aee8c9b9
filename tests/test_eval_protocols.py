"""Evaluation protocols as plug-ins: k-NN and linear on the protocol driver give the numbers of the
implementation before the move (a frozen copy of it below), the columns follow the protocols, the
latency timer's bookkeeping on a module of known cost, and `poa select` against a brute force."""

import json
import random
import statistics
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from backbones import tiny
from poa_hpc.checkpoint.layout import atomic_save
from poa_hpc.config import load_config, to_dict
from poa_hpc.eval.latency import summarize, time_runs
from poa_hpc.eval.protocols import get_protocol, resolve_protocols
from poa_hpc.eval.sweep import default_protocols, eval_splits, run_sweep
from poa_hpc.train.meta_arch import POA


def _tiny_run(tmp_path, family="vit"):
    cfg = load_config("configs/demo_cpu.yaml", tiny(family) + ["data.num_workers=0"])
    torch.manual_seed(0)
    model = POA(cfg)
    with torch.no_grad():  # features that differ clearly between images (as test_eval_sweep)
        for p in model.teacher_backbone().parameters():
            if p.ndim >= 2:
                p.normal_(0.0, (p.numel() / p.shape[0]) ** -0.5)
            else:
                p.add_(0.3 * torch.randn_like(p))
    atomic_save({"step": 3, "model": model.state_dict(), "config": to_dict(cfg)}, tmp_path / "run" / "checkpoints"
                / "last.pt")
    return cfg, model.teacher_backbone().eval(), model.space


# ------------------------------------------------------------------ the implementation before the move, frozen
@torch.no_grad()
def _old_sweep_scores(backbone, subs, train, val, num_classes, k, T, lrs, epochs, seed):
    """evaluate_networks + score as they were: one pass, probe features, k-NN on the [CLS] columns."""
    from poa_hpc.eval.knn import knn_features, weighted_knn
    from poa_hpc.eval.linear import linear_probe, probe_features

    out = []
    loaders = [DataLoader(ds, batch_size=256, shuffle=False, num_workers=0) for ds in (train, val)]
    for s in subs:
        feats, labels, cls_dim = [], [], 0
        for dl in loaders:
            f, y = [], []
            for batch in dl:
                o = backbone(batch[0], s.width, s.depth, features=True)
                cls_dim = o["x_norm_clstoken"].reshape(batch[0].shape[0], -1).shape[1]
                f.append(probe_features(o).cpu())
                y.append(torch.as_tensor(batch[1]).reshape(-1).long())
            feats.append(torch.cat(f))
            labels.append(torch.cat(y))
        tr_f, va_f = feats
        tr_y, va_y = labels
        top1 = weighted_knn(knn_features(tr_f[:, :cls_dim].contiguous()), tr_y,
                            knn_features(va_f[:, :cls_dim].contiguous()), va_y, k, T, num_classes)
        probe = linear_probe(tr_f, tr_y, va_f, va_y, num_classes, lrs=lrs, epochs=epochs, seed=seed)
        out.append((top1, probe.top1, probe.lr, probe.per_lr))
    return out


def _old_knn_evaluate(models, cfg):
    """knn_evaluate as it was: its own driver (extract_features of each dense model) and weighted_knn."""
    from poa_hpc.data.loader import build_eval_datasets
    from poa_hpc.eval.knn import extract_features, weighted_knn

    train_ds, val_ds, num_classes = build_eval_datasets(cfg)
    loaders = [DataLoader(ds, batch_size=256, shuffle=False, num_workers=0) for ds in (train_ds, val_ds)]
    out = []
    for model in models:
        tr_f, tr_y = extract_features(model.eval(), loaders[0], "cpu")
        va_f, va_y = extract_features(model.eval(), loaders[1], "cpu")
        out.append(weighted_knn(tr_f, tr_y, va_f, va_y, cfg.eval.knn_k, cfg.eval.knn_temperature, num_classes))
    return out


def test_knn_and_linear_numbers_unchanged_by_the_protocols(tmp_path):
    from poa_hpc.eval.evaluate import knn_evaluate
    from poa_hpc.eval.sweep import dense_network

    cfg, backbone, space = _tiny_run(tmp_path)
    subs = [min(space.all()), space.intact]
    lrs, epochs = (0.01, 0.1, 1.0), 10
    rows = run_sweep(cfg, backbone, subs, tmp_path / "out", train_per_class=0, lrs=lrs, epochs=epochs, seed=0,
                     progress=False, log=lambda s: None, num_workers=0, device="cpu")
    train, val, num_classes, _ = eval_splits(cfg)
    old = _old_sweep_scores(backbone, subs, train, val, num_classes, cfg.eval.knn_k, cfg.eval.knn_temperature,
                            lrs, epochs, 0)
    for r, (knn, lin, lr, per_lr) in zip(rows, old):
        assert r.knn_top1 == knn and r.linear_top1 == lin and r.linear_lr == lr and r.linear_per_lr == per_lr
    assert max(r.knn_top1 for r in rows) > 30.0  # not a degenerate case
    # poa eval knn's driver (now the same feature driver) on the dense extracted networks
    arch = cfg.model.section
    dense = [dense_network(backbone, arch, s) for s in subs]
    new = [r.top1 for r in knn_evaluate([(str(s), m) for s, m in zip(subs, dense)], cfg)]
    assert new == _old_knn_evaluate(dense, cfg)
    assert new == [r.knn_top1 for r in rows]


@pytest.mark.slow
def test_columns_and_panels_follow_the_protocols(tmp_path):
    import csv

    pytest.importorskip("matplotlib")
    cfg, backbone, space = _tiny_run(tmp_path)
    lat = get_protocol("latency")
    runs = [default_protocols(True, False, cfg=cfg)[0],
            (lat, {"runtimes": ("eager",), "threads": 1, "batch": 4, "warmup": 1, "runs": 3, "device": "cpu"})]
    run_sweep(cfg, backbone, [min(space.all()), space.intact], tmp_path / "out", protocols=runs,
              train_per_class=10, progress=False, log=lambda s: None, num_workers=0, device="cpu")
    with (tmp_path / "out" / "sweep.csv").open() as f:
        cols = csv.DictReader(f).fieldnames
    assert cols == ["name", "named", "width", "depth", "params_m", "gflops", "knn_top1", "latency_ms_eager",
                    "latency_p90_ms_eager", "throughput_eager"]
    doc = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert doc["provenance"]["protocols"] == ["knn", "latency"] and doc["provenance"]["latency"]["device"] == "cpu"
    for r in doc["rows"]:
        assert r["latency_ms_eager"] > 0 and r["latency_p90_ms_eager"] >= r["latency_ms_eager"]
        assert r["throughput_eager"] > 0 and "linear_top1" not in r
    assert (tmp_path / "out" / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in resolve_protocols("latency,knn,knn")] == ["latency", "knn"]
    with pytest.raises(ValueError, match="available: knn, linear, latency"):
        resolve_protocols("knn,top5")


# ------------------------------------------------------------------ the timer
class _Sleeper(torch.nn.Module):
    """Sleeps a known time per call: 60 ms for the first `slow` calls (the warm-up), then a cycle of known times."""

    def __init__(self, slow, cycle):
        super().__init__()
        self.calls, self.slow, self.cycle = 0, slow, cycle

    def forward(self, x):
        t = 0.06 if self.calls < self.slow else self.cycle[(self.calls - self.slow) % len(self.cycle)]
        self.calls += 1
        time.sleep(t)
        return x


def test_timer_excludes_warmup_and_takes_median_and_p90():
    cycle = [0.004, 0.008, 0.012, 0.016, 0.020, 0.024, 0.028, 0.032, 0.036, 0.040]
    m = _Sleeper(slow=3, cycle=cycle)
    times = time_runs(lambda: m(torch.zeros(1)), warmup=3, runs=10)
    assert m.calls == 13 and len(times) == 10
    # each timed run is its own sleep (never the 60 ms warm-up ones), plus at most a few ms of overhead
    for t, want in zip(times, cycle):
        assert want <= t < want + 0.008, (t, want)
    s = summarize(times)
    assert s["median"] == statistics.median(times) and s["p90"] == pytest.approx(float(np.percentile(times, 90)))
    assert 0.022 <= s["median"] < 0.030 and 0.0364 - 1e-9 <= s["p90"] < 0.045  # 22 ms; 0.9-quantile 36.4 ms
    # summarize: hand-computed
    assert summarize([5, 1, 3, 2, 4]) == {"median": 3.0, "p90": pytest.approx(4.6)}


@pytest.mark.gpu
def test_cuda_timer_measures_gpu_work():
    a = torch.randn(2048, 2048, device="cuda")
    one = statistics.median(time_runs(lambda: a @ a, 2, 5, cuda=True))
    four = statistics.median(time_runs(lambda: [a @ a for _ in range(4)], 2, 5, cuda=True))
    assert 2.5 * one < four < 6 * one  # asynchronous launches are timed to their end


# ------------------------------------------------------------------ poa select
def _brute_force(rows, metric, key, limit, higher):
    ok = [r for r in rows if (r[key] >= limit if higher else r[key] <= limit)]
    if not ok:
        return None
    best = max(r[metric] for r in ok)
    return min((r for r in ok if r[metric] == best), key=lambda r: -r[key] if higher else r[key])["name"]


def test_select_equals_brute_force_on_random_sweeps():
    from poa_hpc.eval.select import select_subnet

    rng = random.Random(0)
    for trial in range(300):
        rows = [{"name": f"n{i}", "linear_top1": float(rng.randint(40, 60)), "latency_ms_eager": rng.uniform(1, 10),
                 "throughput_eager": rng.uniform(100, 1000)} for i in range(rng.randint(1, 20))]
        for key, higher in (("latency_ms_eager", False), ("throughput_eager", True)):
            limit = rng.uniform(0, 11) if not higher else rng.uniform(50, 1100)
            best, front = select_subnet(rows, "linear_top1", key, limit, higher)
            want = _brute_force(rows, "linear_top1", key, limit, higher)
            assert (rows[best]["name"] if best is not None else None) == want, (trial, key)
            if best is not None:
                assert best in front


@pytest.mark.slow
def test_poa_select_chooses_and_exports(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from poa_hpc.cli import main
    from poa_hpc.eval.sweep import dense_network
    from poa_hpc.models.onnx_export import onnx_session
    from poa_hpc.models.subnets import Subnet

    cfg, backbone, space = _tiny_run(tmp_path)
    run = tmp_path / "run"
    assert main(["eval", "sweep", str(run), "--protocols", "knn,latency", "--subnets", ",".join(map(str, space.all()[::2])),
                 "--train-per-class", "10",
                 "--runs", "3", "--warmup", "1", "--latency-batch", "4", "--threads", "1", "--no-progress",
                 "data.num_workers=0"]) == 0
    doc = json.loads((run / "eval" / "sweep.json").read_text())
    rows = doc["rows"]
    lats = sorted(r["latency_ms_eager"] for r in rows)
    limit = lats[len(lats) // 2]
    capsys.readouterr()
    assert main(["select", str(run), "--max-latency-ms", str(limit), "--metric", "knn", "--device", "cpu",
                 "--export", "onnx", "-o", str(tmp_path / "ship")]) == 0
    out = capsys.readouterr().out
    want = _brute_force(rows, "knn_top1", "latency_ms_eager", limit, False)
    assert f"chosen: {want} " in out and "Pareto front" in out
    # the export loads and matches the sub-network of the teacher
    sub = Subnet.parse(want.split("_", 1)[1])
    x = torch.randn(3, 3, 16, 16)
    got = onnx_session(tmp_path / "ship" / f"{want}.onnx").run(None, {"images": x.numpy()})[0]
    ref = dense_network(backbone, cfg.model.section, sub)(x).detach()
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-5)
    # no sub-network fits: one line naming the smallest's figure
    assert main(["select", str(run), "--max-latency-ms", "1e-6", "--metric", "knn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no sub-network fits --max-latency-ms 1e-06" in err
    smallest = min(rows, key=lambda r: r["latency_ms_eager"])
    assert smallest["name"] in err and f"{smallest['latency_ms_eager']:.4g} ms" in err
    assert main(["select", str(run), "--max-gflops", "1", "--metric", "linear"]) == 2  # no linear column


# ------------------------------------------------------------------ finetune on a chosen subset
def test_finetune_protocol_on_a_subset_of_the_sweep(tmp_path, capsys):
    """`--finetune-subnets smallest,intact`: the sweep fine-tunes those two alone (the same fine-tune as
    `poa eval finetune` on their extracted files), the other rows get an empty CSV cell and a JSON null."""
    import csv

    from poa_hpc.cli import main
    from poa_hpc.models.extract import extract_state_dict, save_subnet
    from poa_hpc.models.subnets import probe_subnets

    cfg, backbone, space = _tiny_run(tmp_path)
    smallest, middle, intact = probe_subnets(space)
    assert space.resolve("Smallest, intact,middle") == [smallest, intact, middle]
    ft = ["--ft-epochs", "1", "--ft-warmup-epochs", "0", "--ft-lr", "0.01", "--train-per-class", "10",
          "--no-progress", "data.num_workers=0"]
    subs = f"{smallest},{middle},{intact}"
    code = main(["eval", "sweep", str(tmp_path / "run"), "--protocols", "knn,finetune", "--subnets", subs,
                 "--finetune-subnets", "smallest,intact", "--out", str(tmp_path / "out"),
                 "--ft-out", str(tmp_path / "ft"), *ft])
    assert code == 0, capsys.readouterr().err
    with (tmp_path / "out" / "sweep.csv").open() as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert list(rows) == [f"vit_{s}" for s in (smallest, middle, intact)]
    assert rows[f"vit_{middle}"]["finetune_top1"] == "" and rows[f"vit_{middle}"]["knn_top1"] != ""
    doc = json.loads((tmp_path / "out" / "sweep.json").read_text())
    js = {r["name"]: r for r in doc["rows"]}
    assert js[f"vit_{middle}"]["finetune_top1"] is None and js[f"vit_{middle}"]["finetune_per_epoch"] is None
    assert doc["provenance"]["finetune"]["subnets"] == [f"vit_{smallest}", f"vit_{intact}"]
    assert sorted(p.name for p in (tmp_path / "ft").iterdir()) == sorted([f"vit_{smallest}", f"vit_{intact}"])
    assert (tmp_path / "out" / "sweep.png").read_bytes().startswith(b"\x89PNG")
    # the same fine-tune as poa eval finetune on the extracted sub-network
    for s in (smallest, intact):
        arch, state = extract_state_dict(backbone, s)
        f = save_subnet(tmp_path / "files" / f"vit_{s}.safetensors", "vit", arch, state, width=s.width,
                        depth=s.depth, config=to_dict(cfg))
        assert main(["eval", "finetune", str(f), "--ft-out", str(tmp_path / "ft_files"), *ft]) == 0
        assert float(rows[f"vit_{s}"]["finetune_top1"]) == js[f"vit_{s}"]["finetune_top1"]
        a = torch.load(tmp_path / "ft" / f"vit_{s}" / "finetune.pt", weights_only=False)
        b = torch.load(tmp_path / "ft_files" / f"vit_{s}" / "finetune.pt", weights_only=False)
        assert a["per_epoch"] == b["per_epoch"] == js[f"vit_{s}"]["finetune_per_epoch"]
        for k, v in a["model"].items():
            torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    capsys.readouterr()
    # a subset outside --subnets, or without the protocol, is a one-line error
    for extra, message in ((["--subnets", str(smallest), "--finetune-subnets", "intact"], "not among the sweep"),
                           (["--protocols", "knn", "--finetune-subnets", "intact"], "add finetune to --protocols"),
                           (["--finetune-subnets", "huge"], "--finetune-subnets: 'huge' is not a sub-network")):
        args = ["eval", "sweep", str(tmp_path / "run"), "--protocols", "knn,finetune", "--out", str(tmp_path / "x"),
                *ft, *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
