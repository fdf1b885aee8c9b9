"""The protocols poa_hpc ships: ``knn`` and ``linear`` (on cached features), ``latency`` (on the dense
network).  See :mod:`poa_hpc.eval.protocols` for the interface."""

from __future__ import annotations

from typing import Tuple

from poa_hpc.eval.protocols import Column, Cost, Metric, NetFeatures, Protocol, register_protocol


@register_protocol
class KnnProtocol(Protocol):
    name = "knn"
    help = "weighted k-NN (k = eval.knn_k, T = eval.knn_temperature) on the L2-normalised final-norm [CLS]"
    needs = ("features",)

    def options(self, args, cfg):
        return {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature}

    def columns(self, opts):
        return (Column("knn_top1", "k-NN", "pct"),)

    def metrics(self, opts):
        return (Metric("knn_top1", "weighted k-NN", ("knn", "k-nn")),)

    def provenance(self, opts):
        return {"k": opts["k"], "temperature": opts["temperature"], "features": "final-norm [CLS], L2-normalised"}

    def score(self, feats: NetFeatures, opts):
        from poa_hpc.eval.knn import knn_features, weighted_knn

        d = feats.cls_dim
        train_k = knn_features(feats.train[:, :d].contiguous()).to(feats.device)
        val_k = knn_features(feats.val[:, :d].contiguous()).to(feats.device)
        top1 = weighted_knn(train_k, feats.train_labels.to(feats.device), val_k, feats.val_labels.to(feats.device),
                            opts["k"], opts["temperature"], feats.num_classes)
        return {"knn_top1": top1}


def parse_lrs(text: str) -> Tuple[float, ...]:
    try:
        lrs = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        lrs = ()
    if not lrs or not all(lr > 0 for lr in lrs):
        raise ValueError(f"--lrs {text!r}: expected comma-separated positive learning rates, e.g. 0.01,0.1,1")
    return lrs


@register_protocol
class LinearProtocol(Protocol):
    name = "linear"
    help = "linear probe (DINOv2 protocol) on concat(final-norm [CLS], mean patch token), best lr on val"
    needs = ("features",)

    def add_arguments(self, parser):
        from poa_hpc.eval.linear import LR_GRID

        parser.add_argument("--lrs", default=",".join(f"{v:g}" for v in LR_GRID),
                            help="linear probe learning-rate grid, comma-separated (default: %(default)s)")
        parser.add_argument("--linear-epochs", type=int, default=100, help="linear probe epochs (default: %(default)s)")

    def options(self, args, cfg):
        if args.linear_epochs < 1:
            raise ValueError(f"--linear-epochs {args.linear_epochs}: expected a positive number")
        return {"lrs": parse_lrs(args.lrs), "epochs": args.linear_epochs, "seed": getattr(args, "seed", 0)}

    def columns(self, opts):
        return (Column("linear_top1", "linear", "pct"), Column("linear_lr", "lr", "lr"),
                Column("linear_per_lr", "", json_only=True))

    def metrics(self, opts):
        return (Metric("linear_top1", "linear probe", ("linear", "lin")),)

    def provenance(self, opts):
        from poa_hpc.eval.linear import BATCH_SIZE

        return {"features": "concat(final-norm [CLS], mean of final-norm patch tokens), last block",
                "standardized": True, "lr_grid": list(opts["lrs"]), "epochs": opts["epochs"], "batch_size": BATCH_SIZE,
                "optimizer": "SGD momentum 0.9, no weight decay, cosine decay",
                "selection": "best learning rate on val (as DINOv2)", "seed": opts["seed"]}

    def score(self, feats: NetFeatures, opts):
        from poa_hpc.eval.linear import linear_probe

        r = linear_probe(feats.train.to(feats.device), feats.train_labels, feats.val.to(feats.device), feats.val_labels,
                         feats.num_classes, lrs=opts["lrs"], epochs=opts["epochs"], seed=opts["seed"])
        return {"linear_top1": r.top1, "linear_lr": r.lr, "linear_per_lr": r.per_lr}

    def after(self, rows, opts, log):
        lrs = opts["lrs"]
        if len(lrs) < 2:
            return
        edge = [r.name for r in rows if r.linear_lr in (min(lrs), max(lrs))]
        if edge:
            log(f"linear probe: the best learning rate is at the edge of the grid {list(lrs)} for {len(edge)} of "
                f"{len(rows)} networks ({', '.join(edge[:3])}{', ...' if len(edge) > 3 else ''}); consider "
                "widening --lrs")


@register_protocol
class LatencyProtocol(Protocol):
    name = "latency"
    help = "batch-1 latency (median, p90) and batch-N throughput of the dense network per runtime"
    needs = ("model",)

    def add_arguments(self, parser):
        parser.add_argument("--runtime", default="eager",
                            help="latency runtimes, comma-separated: eager, compile, onnxruntime (default: %(default)s)")
        parser.add_argument("--threads", type=int, default=0,
                            help="CPU threads for the latency runs (default: torch's current setting)")
        parser.add_argument("--latency-batch", type=int, default=32, help="batch size of the throughput runs")
        parser.add_argument("--warmup", type=int, default=5, help="untimed latency runs first (default: %(default)s)")
        parser.add_argument("--runs", type=int, default=30, help="timed batch-1 runs (default: %(default)s)")
        parser.add_argument("--device", default=None, help="latency device: cpu or cuda (default: cuda if present)")

    def options(self, args, cfg):
        import torch

        from poa_hpc.eval.latency import RUNTIMES

        rts = tuple(dict.fromkeys(r.strip() for r in args.runtime.split(",") if r.strip()))
        bad = [r for r in rts if r not in RUNTIMES]
        if bad or not rts:
            raise ValueError(f"--runtime {args.runtime!r}: expected some of {', '.join(RUNTIMES)}")
        if args.latency_batch < 1 or args.runs < 1 or args.warmup < 0 or args.threads < 0:
            raise ValueError("--latency-batch and --runs must be >= 1, --warmup and --threads >= 0")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if "onnxruntime" in rts:
            from poa_hpc.models.onnx_export import require_onnx

            require_onnx()
        return {"runtimes": rts, "threads": args.threads, "batch": args.latency_batch, "warmup": args.warmup,
                "runs": args.runs, "device": device}

    def columns(self, opts):
        cols = []
        for rt in opts["runtimes"]:
            cols += [Column(f"latency_ms_{rt}", f"ms({rt})", "ms"), Column(f"latency_p90_ms_{rt}", "p90", "ms"),
                     Column(f"throughput_{rt}", "img/s", "ips")]
        return tuple(cols)

    def costs(self, opts):
        out = []
        for rt in opts["runtimes"]:
            out += [Cost(f"latency_ms_{rt}", f"batch-1 latency, {rt} (ms)"),
                    Cost(f"throughput_{rt}", f"throughput at batch {opts['batch']}, {rt} (img/s)", True)]
        return tuple(out)

    def provenance(self, opts):
        import platform

        import torch

        dev = opts["device"]
        name = torch.cuda.get_device_name() if dev.startswith("cuda") else (platform.processor() or platform.machine())
        return {"device": dev, "device_name": name, "threads": opts["threads"] or torch.get_num_threads(),
                "runtimes": list(opts["runtimes"]), "batch": opts["batch"], "warmup": opts["warmup"],
                "runs": opts["runs"], "latency": "batch 1: median and p90 of the timed runs (ms)",
                "throughput": f"batch {opts['batch']}: images / median seconds per batch",
                "timer": "CUDA events + synchronize" if dev.startswith("cuda") else "time.perf_counter"}

    def measure(self, model, img_size, opts):
        from poa_hpc.eval.latency import measure_latency

        out = {}
        for rt in opts["runtimes"]:
            m = measure_latency(model, img_size, runtime=rt, device=opts["device"], threads=opts["threads"],
                                batch=opts["batch"], warmup=opts["warmup"], runs=opts["runs"])
            out.update({f"latency_ms_{rt}": m["latency_ms"], f"latency_p90_ms_{rt}": m["latency_p90_ms"],
                        f"throughput_{rt}": m["throughput"]})
        return out


@register_protocol
class FinetuneProtocol(Protocol):
    name = "finetune"
    help = ("full fine-tuning with a linear head: AdamW, layer-wise lr decay, drop path, cosine schedule, label "
            "smoothing, mixup/CutMix, optional EMA; val top-1")
    needs = ("model",)
    distributed = True  # data-parallel under torchrun / srun (poa eval finetune --nproc N)

    def add_arguments(self, parser):
        from poa_hpc.eval.finetune import FinetuneOptions

        d = FinetuneOptions()
        parser.add_argument("--ft-epochs", type=int, default=d.epochs, help="fine-tuning epochs (default: %(default)s)")
        parser.add_argument("--ft-lr", type=float, default=d.lr, help="fine-tuning peak lr (default: %(default)s)")
        parser.add_argument("--ft-batch-size", type=int, default=d.batch_size, help="default: %(default)s")
        parser.add_argument("--ft-weight-decay", type=float, default=d.weight_decay, help="default: %(default)s")
        parser.add_argument("--ft-layer-decay", type=float, default=d.layer_decay,
                            help="layer-wise lr decay over the pre-training layer ids (default: %(default)s)")
        parser.add_argument("--ft-drop-path", type=float, default=d.drop_path, help="default: %(default)s")
        parser.add_argument("--ft-warmup-epochs", type=int, default=d.warmup_epochs, help="default: %(default)s")
        parser.add_argument("--ft-label-smoothing", type=float, default=d.label_smoothing, help="default: %(default)s")
        parser.add_argument("--ft-mixup", type=float, default=d.mixup, help="mixup alpha (timm Mixup; 0: off)")
        parser.add_argument("--ft-cutmix", type=float, default=d.cutmix, help="CutMix alpha (0: off)")
        parser.add_argument("--ft-ema", type=float, default=d.ema, help="EMA decay per step (0: off)")
        parser.add_argument("--ft-out", help="fine-tuning checkpoints (one folder per sub-network; a run started "
                                             "again with the same folder resumes)")

    def options(self, args, cfg):
        from poa_hpc.eval.finetune import FinetuneOptions
        from poa_hpc.eval.sweep import eval_splits

        o = FinetuneOptions(epochs=args.ft_epochs, batch_size=args.ft_batch_size, lr=args.ft_lr,
                            weight_decay=args.ft_weight_decay, layer_decay=args.ft_layer_decay,
                            drop_path=args.ft_drop_path, warmup_epochs=args.ft_warmup_epochs,
                            label_smoothing=args.ft_label_smoothing, mixup=args.ft_mixup, cutmix=args.ft_cutmix,
                            ema=args.ft_ema, seed=getattr(args, "seed", 0), num_workers=cfg.data.num_workers)
        if o.epochs < 1 or o.batch_size < 1 or not o.lr > 0 or not 0 < o.layer_decay <= 1 or not 0 <= o.drop_path < 1:
            raise ValueError("fine-tuning: need --ft-epochs, --ft-batch-size >= 1, --ft-lr > 0, 0 < --ft-layer-decay "
                             "<= 1, 0 <= --ft-drop-path < 1")
        train, val, num_classes, _ = eval_splits(cfg, getattr(args, "train_per_class", 0) or 0, o.seed)
        return {"options": o, "train": train, "val": val, "num_classes": num_classes, "out": args.ft_out,
                "progress": not getattr(args, "no_progress", False)}

    def columns(self, opts):
        return (Column("finetune_top1", "finetune", "pct"), Column("finetune_per_epoch", "", json_only=True))

    def metrics(self, opts):
        return (Metric("finetune_top1", "fine-tuned", ("finetune", "ft")),)

    def provenance(self, opts):
        from dataclasses import asdict

        return {**asdict(opts["options"]), "optimizer": "AdamW, layer-wise lr decay, cosine after linear warm-up",
                "head": "linear on the final-norm features", "evaluated": "EMA weights" if opts["options"].ema else
                "weights"}

    def measure(self, model, img_size, opts):
        from pathlib import Path

        import torch

        from poa_hpc.eval.evaluate import dense_cost
        from poa_hpc.eval.finetune import finetune
        from poa_hpc.models.registry import get_backbone

        spec = get_backbone(model.family)
        sub = dense_cost(model, img_size)[0]
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def build(drop_path):
            m = spec.build(model.arch, drop_path_rate=drop_path)
            m.load_state_dict(state)
            return m

        out = Path(opts["out"]) / f"{model.family}_{sub}" if opts["out"] else None
        # in a process group init_distributed has set this rank's GPU as the current one
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        r = finetune(build, spec, model.arch, spec.feature_dim(model.arch, sub.width), opts["train"], opts["val"],
                     opts["num_classes"], opts["options"], out, device=device,
                     log=print if opts["progress"] else (lambda s: None))
        return {"finetune_top1": r["top1"], "finetune_per_epoch": r["per_epoch"]}
