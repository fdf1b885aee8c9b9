"""The CPU demo's recipe, measured: train a recipe, k-NN its sub-networks, time it, say whether it collapsed.

    poa bench demo --recipes demo                       # the packaged demo config as it is
    poa bench demo --recipes base lr2x protos64 --probe-every 20
    poa bench demo --list                               # the recipes of the recipe file

A *recipe* is a name and a list of dotted overrides on top of ``--config`` (default: the
recipe file's ``_base`` config, else the packaged ``demo_cpu.yaml``), read from
``--recipe-file`` (default ``benchmarks/demo_recipes.yaml``: ``_base: demo_v1.yaml`` and
``name: {overrides: [...], note: "..."}``).  Recipes run
one after the other, never two at a time.  For each, the bench

* trains from scratch in ``<workdir>/<name>/`` (the trainer's own loop, engine ``none``);
* measures the training's CPU time (this process and its loader workers, from
  ``getrusage``) and wall time, without the probes below;
* every ``--probe-every`` steps (0: never) probes the EMA teacher on 256 fixed validation
  images: how much its backbone [CLS] differs between images (RMS deviation from the mean
  [CLS] over RMS [CLS]),
  per head the spread of its logits across images (std over images, mean over prototypes)
  and across prototypes, the entropy of its Sinkhorn-Knopp targets at the step's teacher
  temperature relative to ln K, the smallest / largest singular value of the normalised
  prototypes, the mean |LayerScale|, and the weighted k-NN top-1 of the intact network;
* after training, evaluates the smallest, a middle and the intact sub-network of the
  teacher with the weighted k-NN of ``poa eval sweep`` (k = 20, T = 0.07, digits val);
* reads the collapse watchdog's verdict (and step) from the checkpoint.

Each recipe's row is kept in ``<workdir>/<name>/bench_row.json`` (``--reuse`` takes it
instead of training again); the table of all requested recipes is printed and written as
JSON under ``--out`` (``benchmarks/results/demo_<cpu|cuda>_<time>.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from poa_hpc.commands import register_command
from poa_hpc.models.subnets import probe_subnets
from poa_hpc.results import write_result

DEFAULT_RECIPES = Path("benchmarks") / "demo_recipes.yaml"
PROBE_IMAGES = 256


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its reaped children (loader workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


class Prober:
    """Measurements of the EMA teacher during training (see the module docstring)."""

    def __init__(self, cfg, every: int, n_images: int = PROBE_IMAGES):
        import torch

        from poa_hpc.data.loader import build_eval_datasets
        from poa_hpc.eval.knn import knn_features

        self.cfg, self.every = cfg, int(every)
        train, val, self.num_classes = build_eval_datasets(cfg)
        self.train = torch.stack([train[i][0] for i in range(len(train))])
        self.train_y = torch.tensor([int(train[i][1]) for i in range(len(train))])
        self.val = torch.stack([val[i][0] for i in range(len(val))])
        self.val_y = torch.tensor([int(val[i][1]) for i in range(len(val))])
        self.images = self.val[:n_images]
        self._feat = knn_features
        self.rows: List[Dict[str, Any]] = []
        self.cpu = 0.0  # CPU seconds spent probing (taken out of the training time)
        self.wall = 0.0

    def __call__(self, step: int, model, record: Dict[str, float]) -> None:
        self.last = (step, model, record.get("teacher_temp", self.cfg.loss.teacher_temp))
        if self.every > 0 and step % self.every == 0:
            self._timed(*self.last)

    def finish(self) -> None:
        """Probe the teacher after the last step (if that step was not probed already)."""
        last = getattr(self, "last", None)
        if self.every > 0 and last is not None and (not self.rows or self.rows[-1]["step"] != last[0]):
            self._timed(*last)
        self.last = None

    def _timed(self, step: int, model, teacher_temp: float) -> None:
        c0, w0 = cpu_seconds(), time.perf_counter()
        self.rows.append(self.probe(step, model, teacher_temp))
        self.cpu += cpu_seconds() - c0
        self.wall += time.perf_counter() - w0

    def probe(self, step: int, model, teacher_temp: float) -> Dict[str, Any]:
        import torch

        from poa_hpc.eval.knn import weighted_knn
        from poa_hpc.losses import sinkhorn_knopp
        from poa_hpc.train.meta_arch import branch_logits

        teacher = model.teacher
        with torch.no_grad():
            out = teacher(self.images)
            cls = out["cls_global"].float()
            # relative spread of the [CLS] across images: RMS deviation from the mean [CLS] / RMS [CLS]
            row: Dict[str, Any] = {"step": step, "teacher_temp": teacher_temp,
                                   "cls_rel_std": float((cls - cls.mean(0)).pow(2).mean().sqrt()
                                                        / cls.pow(2).mean().sqrt().clamp_min(1e-30))}
            for h, (lg, head) in enumerate(zip(branch_logits(out), teacher.heads)):
                g = lg["global"].float()
                K = g.shape[1]
                q = sinkhorn_knopp(g, teacher_temp, self.cfg.loss.sinkhorn_iters)
                w = head.last_layer.weight_g * torch.nn.functional.normalize(head.last_layer.weight_v, dim=1)
                sv = torch.linalg.svdvals(w.float())
                row[f"logit_img_std_h{h}"] = float(g.std(0).mean())
                row[f"logit_proto_spread_h{h}"] = float((g.amax(1) - g.amin(1)).mean())
                row[f"target_entropy_rel_h{h}"] = float(-torch.special.xlogy(q, q).sum(1).mean() / math.log(K))
                row[f"proto_sv_min_h{h}"] = float(sv[-1])
                row[f"proto_sv_max_h{h}"] = float(sv[0])
            gammas = [p.abs().mean() for name, p in teacher.backbone.named_parameters() if name.endswith("gamma")]
            row["layerscale"] = float(torch.stack(gammas).mean()) if gammas else float("nan")
            bb = teacher.backbone
            feats = [self._feat(torch.cat([bb(x, features=True)["x_norm_clstoken"] for x in data.split(512)]))
                     for data in (self.train, self.val)]
            row["knn_intact"] = weighted_knn(feats[0], self.train_y, feats[1], self.val_y, self.cfg.eval.knn_k,
                                             self.cfg.eval.knn_temperature, self.num_classes)
        return row


def load_recipes(path: Path) -> Tuple[Dict[str, Dict[str, Any]], Optional[Path]]:
    """The recipes of a recipe file and its ``_base`` config (relative to the file; ``None`` if absent)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise SystemExit(f"poa bench demo: recipe file '{path}' does not exist")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise SystemExit(f"poa bench demo: '{path}' must map recipe names to {{overrides: [...], note: ...}}")
    base = data.pop("_base", None)
    base_path = (path.parent / str(base)) if base else None
    if base_path is not None and not base_path.is_file():
        raise SystemExit(f"poa bench demo: '_base' of '{path}': '{base_path}' does not exist")
    out = {}
    for name, r in data.items():
        r = r or {}
        out[str(name)] = {"overrides": [str(o) for o in r.get("overrides", [])], "note": str(r.get("note", "")),
                          "init_from_recipe": r.get("init_from_recipe")}
    return out, base_path


def config_vs_defaults(cfg) -> Dict[str, Any]:
    """The recipe's whole configuration, as the dotted keys whose values differ from the schema's defaults
    (the run folder and progress display left out): enough to rebuild it whatever the config files say."""
    from poa_hpc.config import POAConfig, flatten, to_dict

    default = flatten(to_dict(POAConfig()))
    return {k: v for k, v in flatten(to_dict(cfg)).items()
            if default.get(k) != v and k not in ("train.output_dir", "train.progress")}


def watchdog_state(ckpt_path: str) -> Dict[str, Any]:
    import torch

    meta = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return meta.get("watchdog") or {}


def intact_export(workdir: Path, recipe: str) -> Path:
    """The intact teacher of ``recipe``'s finished run extracted as a dense file (``model.init_from`` of a
    recipe with ``init_from_recipe: <recipe>``)."""
    from poa_hpc.models.extract import extract_state_dict, save_subnet
    from poa_hpc.train.load import load_teacher

    ckpt = workdir / recipe / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        raise SystemExit(f"poa bench demo: init_from_recipe {recipe!r} has no finished run in {workdir / recipe}; "
                         f"run it first (list it before)")
    from poa_hpc.models.registry import get_backbone

    cfg, teacher, _ = load_teacher(str(ckpt), "teacher")
    sub = get_backbone(cfg.model.arch).space(cfg.model.section).intact
    arch, state = extract_state_dict(teacher, sub)
    return save_subnet(workdir / recipe / "intact.safetensors", cfg.model.arch, arch, state, recipe=recipe)


def run_recipe(name: str, overrides: Sequence[str], config: Path, workdir: Path, probe_every: int,
               note: str = "", init_from_recipe: Optional[str] = None) -> Dict[str, Any]:
    """Train one recipe (from scratch, or from ``init_from_recipe``'s intact teacher) and measure it; returns
    its row."""
    import torch

    from poa_hpc.config import load_config
    from poa_hpc.eval.sweep import run_sweep
    from poa_hpc.models.registry import get_backbone
    from poa_hpc.train.load import load_teacher
    from poa_hpc.train.trainer import train

    out_dir = workdir / name
    if init_from_recipe:
        overrides = [*overrides, f"model.init_from={intact_export(workdir, init_from_recipe)}"]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cfg = load_config(config, [*overrides, f"train.output_dir={out_dir}", "train.progress=false"])
    space = get_backbone(cfg.model.arch).space(cfg.model.section)
    subs = probe_subnets(space)
    prober = Prober(cfg, probe_every)
    load0 = os.getloadavg()[0]
    c0, w0 = cpu_seconds(), time.perf_counter()
    summary = train(cfg, resume=False, on_step=prober)
    prober.finish()
    cpu_train = cpu_seconds() - c0 - prober.cpu
    wall_train = time.perf_counter() - w0 - prober.wall
    steps = int(summary["step"])
    c1, w1 = cpu_seconds(), time.perf_counter()
    _, teacher, _ = load_teacher(summary["checkpoint"], "teacher")
    rows = run_sweep(cfg, teacher, subs, None, linear=False, progress=False, num_workers=0, device="cpu",
                     log=lambda s: None)
    cpu_eval, wall_eval = cpu_seconds() - c1, time.perf_counter() - w1
    wd = watchdog_state(summary["checkpoint"])
    last = summary["metrics"]
    heads = cfg.head.prototypes
    row: Dict[str, Any] = {
        "name": name, "note": note, "overrides": list(overrides), "config": config_vs_defaults(cfg), "steps": steps,
        "batch_size": cfg.optim.batch_size, "n_local": cfg.data.n_local, "local_size": cfg.data.local_size,
        "prototypes": list(heads),
        "model": f"{cfg.model.section.embed_dim}x{cfg.model.section.depth}" if cfg.model.arch == "vit" else cfg.model.arch,
        "knn": {str(s): r.knn_top1 for s, r in zip(subs, rows)},
        "knn_smallest": rows[0].knn_top1, "knn_middle": rows[1].knn_top1, "knn_intact": rows[2].knn_top1,
        "collapsed": wd.get("fired_step") is not None, "collapse_step": wd.get("fired_step"),
        "final_teacher_entropy_rel": [last.get(f"collapse/teacher_entropy_h{i}", float("nan")) / math.log(k)
                                      for i, k in enumerate(heads)],
        "final_intact_dino": last.get("intact/dino"),
        "cpu_s_train": round(cpu_train, 1), "cpu_s_per_step": round(cpu_train / max(steps, 1), 3),
        "wall_s_train": round(wall_train, 1), "cpu_s_eval3": round(cpu_eval, 1), "wall_s_eval3": round(wall_eval, 1),
        "load_avg_1min_start": round(load0, 2), "load_avg_1min_end": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(), "data_workers": cfg.data.num_workers,
        "probes": prober.rows,
    }
    (out_dir / "bench_row.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def format_rows(rows: Sequence[Dict[str, Any]]) -> str:
    w = max([len("recipe")] + [len(r["name"]) for r in rows]) + 2
    head = (f"{'recipe':<{w}}{'steps':>6}{'smallest':>10}{'middle':>9}{'intact':>9}{'collapsed':>11}"
            f"{'CPU s/step':>11}{'CPU s':>8}{'wall s':>8}{'load':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        col = f"at {r['collapse_step']}" if r["collapsed"] else "no"
        lines.append(f"{r['name']:<{w}}{r['steps']:>6}{r['knn_smallest']:>9.1f}%{r['knn_middle']:>8.1f}%"
                     f"{r['knn_intact']:>8.1f}%{col:>11}{r['cpu_s_per_step']:>11.2f}{r['cpu_s_train']:>8.0f}"
                     f"{r['wall_s_train']:>8.0f}{r['load_avg_1min_start']:>6.1f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes", nargs="*", default=None, help="recipe names (default: all in the file)")
    p.add_argument("--recipe-file", default=str(DEFAULT_RECIPES))
    p.add_argument("--config", default=None, help="base config (default: the recipe file's _base, else the "
                                                   "packaged demo_cpu.yaml)")
    p.add_argument("--workdir", default="runs/bench_demo", help="one training folder per recipe")
    p.add_argument("--probe-every", type=int, default=0, help="probe the teacher every N steps (0: never)")
    p.add_argument("--reuse", action="store_true", help="take a recipe's row from <workdir>/<name>/bench_row.json "
                                                        "when present instead of training again")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON table ('' : none)")
    p.add_argument("--tag", default="demo", help="name of the JSON table (benchmarks/results/<tag>_cpu_<time>.json)")


def run(args: argparse.Namespace) -> int:
    from poa_hpc.config import packaged_config


    recipes, base = load_recipes(Path(args.recipe_file))
    if args.list:
        for name, r in recipes.items():
            print(f"{name:<22}{' '.join(r['overrides']) or '(the config as it is)'}" + (f"  # {r['note']}" if r["note"] else ""))
        return 0
    names = args.recipes or list(recipes)
    unknown = [n for n in names if n not in recipes]
    if unknown:
        print(f"poa bench demo: unknown recipe(s) {unknown}; known: {list(recipes)}")
        return 2
    config = Path(args.config) if args.config else (base or packaged_config("demo_cpu.yaml"))
    workdir = Path(args.workdir)
    rows = []
    for name in names:
        saved = workdir / name / "bench_row.json"
        if args.reuse and saved.is_file():
            row = json.loads(saved.read_text())
            if row.get("overrides") == recipes[name]["overrides"]:
                rows.append(row)
                print(f"{name}: reused {saved}", flush=True)
                continue
        print(f"{name}: training ({' '.join(recipes[name]['overrides']) or 'as configured'})", flush=True)
        row = run_recipe(name, recipes[name]["overrides"], config, workdir, args.probe_every, recipes[name]["note"],
                         recipes[name]["init_from_recipe"])
        rows.append(row)
        print(format_rows([row]).splitlines()[-1], flush=True)
    print()
    print(format_rows(rows))
    if args.out:
        write_result(args.tag, rows, args.out, {"config": str(config.name), "recipe_file": args.recipe_file,
                                               "cpu_cores": os.cpu_count(),
                                               "knn": "weighted k-NN, k=20, T=0.07, [CLS] of the EMA teacher, "
                                                      "digits val (359) against train (1,438)"})
    return 0


@register_command("bench demo")
class BenchDemoCommand:
    __doc__ = "train demo recipes, k-NN of their sub-networks, CPU time, collapse\n\n" + __doc__

    add_arguments = staticmethod(add_arguments)
    run = staticmethod(run)


@register_command("demo")
class DemoCommand:
    """train the embedded CPU demo, k-NN 3 sub-networks against raw pixels, sweep all sub-networks (k-NN + linear probe, plot)"""

    @staticmethod
    def add_arguments(d: argparse.ArgumentParser) -> None:
        d.add_argument("--config", help="default: the packaged configs/demo_cpu.yaml (ViT); "
                                         "configs/swin_demo_cpu.yaml is the Swin demo")
        d.add_argument("--output-dir", help="default: the config's train.output_dir (runs/demo)")
        d.add_argument("--linear-epochs", type=int, default=100, help="linear-probe epochs of the final sweep")
        d.add_argument("--eval-every", type=int, default=200,
                       help="k-NN of the teacher's smallest, a middle and the intact sub-network every N steps "
                            "(train.eval_every; poa plot shows the curves; 0: off)")
        d.add_argument("overrides", nargs="*")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from poa_hpc.config import load_config, packaged_config, to_dict
        from poa_hpc.errors import UsageError
        from poa_hpc.eval.baseline import raw_pixel_knn
        from poa_hpc.eval.evaluate import format_table, knn_evaluate
        from poa_hpc.eval.sweep import format_sweep_table, run_sweep
        from poa_hpc.models.extract import extract_to, load_subnet
        from poa_hpc.models.registry import get_backbone
        from poa_hpc.train.load import load_teacher
        from poa_hpc.train.trainer import build_model, train

        overrides = [f"train.eval_every={args.eval_every}", *args.overrides]  # an override given wins
        if args.output_dir:
            overrides.append(f"train.output_dir={args.output_dir}")
        cfg = load_config(args.config or packaged_config("demo_cpu.yaml"), overrides)
        if args.linear_epochs < 1:
            raise UsageError(f"--linear-epochs {args.linear_epochs}: expected a positive number of epochs")
        out = Path(cfg.train.output_dir)
        space = get_backbone(cfg.model.arch).space(cfg.model.section)
        subs = probe_subnets(space)
        t_start = time.perf_counter()
        baseline = raw_pixel_knn(cfg)
        print(f"POA demo: {len(space)} sub-networks; training on {cfg.data.dataset} for "
              f"{cfg.optim.epochs} epochs, output in {out}")
        print(f"reference: weighted k-NN (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature:g}) on the centred raw pixels "
              f"of the same split: {baseline:.2f}%")
        t0 = time.perf_counter()
        summary = train(cfg, resume=True)
        print(f"training finished in {time.perf_counter() - t0:.0f}s (step {summary['step']})")

        init_backbone = build_model(cfg).teacher_backbone().eval()
        _, trained_backbone, step = load_teacher(summary["checkpoint"], "teacher")
        tables = []
        for label, backbone, folder in (("at initialisation", init_backbone, out / "subnets_init"),
                                        ("after POA training (teacher)", trained_backbone, out / "subnets")):
            paths = extract_to(backbone, subs, folder, False, step, label, to_dict(cfg))
            models = [(p.stem, load_subnet(p)[0]) for p in paths]
            rows = knn_evaluate(models, cfg)
            tables.append(rows)
            print()
            print(format_table(rows, f"weighted k-NN on {cfg.data.dataset} val, sub-networks {label}"))

        print("\nevery sub-network of the trained teacher (k-NN and linear probe):")
        sweep_dir = out / "sweep"
        rows = run_sweep(cfg, trained_backbone, space.all(), sweep_dir, source=f"{summary['checkpoint']}:teacher",
                         step=step, epochs=args.linear_epochs, device="cpu", progress=False)
        print(format_sweep_table(rows))

        print(f"\nraw pixels (centred): k-NN top-1 {baseline:.2f}%")
        for a, b in zip(*tables):
            print(f"{a.name}: k-NN top-1 {a.top1:.2f}% at init -> {b.top1:.2f}% trained ({b.top1 - a.top1:+.2f})")
        print(f"\nextracted sub-networks: {out / 'subnets'}")
        plot = sweep_dir / "sweep.png"
        print(f"sweep of all {len(rows)} sub-networks: {sweep_dir / 'sweep.json'}, {sweep_dir / 'sweep.csv'}"
              + (f"\nplot: {plot}" if plot.is_file() else " (no plot: matplotlib is not installed)"))
        from poa_hpc.plot import plot_run

        try:
            print(f"training curves: {plot_run(out)[0]}")
        except Exception as exc:  # UsageError without matplotlib: the demo's results stand
            print(f"no training curves: {exc}")
        print(f"demo finished in {time.perf_counter() - t_start:.0f}s")
        return 0
