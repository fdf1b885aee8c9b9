"""Full fine-tuning of an extracted sub-network: ``poa eval finetune FILE`` (and the ``finetune`` sweep protocol).

The dense network (built with stochastic depth ``--drop-path``) plus a linear head on its features is
trained with AdamW, layer-wise lr decay over the same layer ids as pre-training (the family's
``layer_id``; the head gets the last id, ``lr * decay ** (num_layers + 1 - id)``), a per-step cosine
schedule after a linear warm-up, label smoothing, optional mixup / CutMix (timm's ``Mixup``) and an
optional EMA of the weights (evaluated instead of the weights when on).  Top-1 on the validation split
after every epoch.  A checkpoint is written atomically after every epoch to ``<out>/finetune.pt``; a
run started again with the same ``--out`` continues from it (a killed fine-tune resumes).

Under torchrun or srun (``poa eval finetune --nproc N``, or ``srun ... poa eval finetune``) the same
fine-tune runs data-parallel: each rank trains on its share of every global batch (DDP, gloo on the
CPU, NCCL on GPUs), the validation top-1 is counted on a shard of the validation set per rank and
summed, and rank 0 alone logs and writes the checkpoint.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["FinetuneOptions", "finetune", "CHECKPOINT_FORMAT"]

#: ``finetune.pt``'s layout and data order (2: the step sampler of the determinism contract).
CHECKPOINT_FORMAT = 2
FINETUNE_STREAM = 0x4654  # "FT": the random stream of drop path and mixup


@dataclass
class FinetuneOptions:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3  # at batch size 64 (not rescaled)
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    drop_path: float = 0.1
    warmup_epochs: int = 2
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    mixup: float = 0.0  # timm Mixup alpha (0: off)
    cutmix: float = 0.0  # timm CutMix alpha (0: off)
    ema: float = 0.0  # EMA decay per step (0: off)
    seed: int = 0
    num_workers: int = 0


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.backbone(x).reshape(x.shape[0], -1))


def _param_groups(model: _Classifier, spec, arch, o: FinetuneOptions):
    n = spec.num_layers(arch)
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            b = name[len("backbone."):]
            lid = spec.layer_id(b, arch)
            no_wd = p.ndim <= 1 or name.endswith(".bias") or spec.no_weight_decay(b)
        else:
            lid, no_wd = n + 1, name.endswith(".bias")
        mult = o.layer_decay ** (n + 1 - lid)
        key = (lid, no_wd)
        g = groups.setdefault(key, {"params": [], "lr_mult": mult, "weight_decay": 0.0 if no_wd else o.weight_decay,
                                    "layer_id": lid})
        g["params"].append(p)
    return list(groups.values())


def _lr_at(step: int, total: int, warmup: int, o: FinetuneOptions) -> float:
    if step < warmup:
        return o.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def _top1(model: nn.Module, val: Dataset, device, rank: int, world: int, num_workers: int) -> float:
    """Top-1 (%) on ``val``, sharded: rank r scores items r, r + W, ...; the counts are summed over ranks."""
    model.eval()
    shard = Subset(val, range(rank, len(val), world)) if world > 1 else val
    correct = n = 0
    for x, y, *_ in DataLoader(shard, batch_size=256, shuffle=False, num_workers=num_workers):
        pred = model(x.to(device)).argmax(1).cpu()
        y = torch.as_tensor(y).reshape(-1)
        correct += int((pred == y).sum())
        n += len(y)
    if world > 1:
        counts = torch.tensor([correct, n], dtype=torch.int64, device=device)
        dist.all_reduce(counts)
        correct, n = (int(v) for v in counts.tolist())
    return 100.0 * correct / n


class _Steps:
    """Batch sampler of steps ``start .. end - 1``: this rank's indices of each global batch
    (:class:`poa_hpc.data.samplers.StepBatchSampler`: a pure function of (seed, step, rank))."""

    def __init__(self, sampler, start: int, end: int):
        self.sampler, self.start, self.end = sampler, start, end

    def __iter__(self):
        for step in range(self.start, self.end):
            yield self.sampler.indices_for_step(step)

    def __len__(self) -> int:
        return self.end - self.start


def _unused_parameters(model: nn.Module, img_size: int, device) -> list:
    """Parameters without a gradient from a forward of the classifier (e.g. ViT's mask token): frozen, so
    that DDP's gradient buckets and the optimizer hold only trained ones (AdamW skips them either way)."""
    was = model.training
    model.eval()
    x = torch.zeros(2, 3, img_size, img_size, device=device)
    model(x).float().sum().backward()
    unused = [p for p in model.parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was)
    return unused


def finetune(backbone_builder: Callable[[float], nn.Module], spec, arch, feature_dim: int, train: Dataset,
             val: Dataset, num_classes: int, opts: FinetuneOptions, out: Optional[str | Path] = None,
             device: str | torch.device = "cpu", log: Callable[[str], None] = print,
             stop_after_epoch: Optional[int] = None) -> Dict[str, Any]:
    """Fine-tune ``backbone_builder(drop_path)`` (a dense network with its weights loaded) with a new head.

    In a process group (torchrun, srun) the run is data-parallel: ``opts.batch_size`` is the global batch,
    each rank trains on its share of it (DDP averages the gradients), the validation set is split over the
    ranks and the counts summed; only rank 0 logs and writes the checkpoint.  Which images a rank reads at a
    step, and the random draws of drop path and mixup, are pure functions of (seed, step, rank), so a resumed
    run continues exactly, and W ranks compute the one-process run up to float rounding (without drop path
    and mixup, whose draws are per rank).

    Returns ``{"top1": final val top-1 (%), "per_epoch": [...], "ema": bool, "options": ...}``.  With ``out``,
    ``<out>/finetune.pt`` is written after every epoch and resumed from when present."""
    from poa_hpc.checkpoint.layout import atomic_save
    from poa_hpc.data.samplers import StepBatchSampler
    from poa_hpc.data.transforms import derive_seed

    device = torch.device(device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if opts.batch_size % world:
        raise ValueError(f"--ft-batch-size {opts.batch_size} (the global batch) is not divisible by the {world} ranks")
    if len(train) < opts.batch_size:
        raise ValueError(f"fine-tuning: {len(train)} training images, fewer than one batch (--ft-batch-size "
                         f"{opts.batch_size})")
    if rank != 0:
        log = _quiet  # one voice: rank 0's
    torch.manual_seed(opts.seed)
    model = _Classifier(backbone_builder(opts.drop_path), feature_dim, num_classes).to(device)
    for p in _unused_parameters(model, int(val[0][0].shape[-1]), device):
        p.requires_grad_(False)
    groups = _param_groups(model, spec, arch, opts)
    optim = torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.999))
    ema = copy.deepcopy(model).requires_grad_(False) if opts.ema > 0 else None
    mixup = None
    if opts.mixup > 0 or opts.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=opts.mixup, cutmix_alpha=opts.cutmix, label_smoothing=opts.label_smoothing,
                      num_classes=num_classes)
    iters = len(train) // opts.batch_size  # drop_last
    sampler = StepBatchSampler(len(train), opts.batch_size // world, opts.seed, iters, rank, world)
    total, warmup = opts.epochs * iters, opts.warmup_epochs * iters
    start, history = 0, []
    ckpt_path = Path(out) / "finetune.pt" if out is not None else None
    if ckpt_path is not None and ckpt_path.is_file():
        from poa_hpc.errors import ResumeError

        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise ResumeError(f"{ckpt_path}: written by another version of the fine-tuning (its data order "
                              "differs); use another --out")
        if ck["options"] != asdict(opts):
            raise ResumeError(f"{ckpt_path}: written with other fine-tuning options; use another --out")
        model.load_state_dict(ck["model"])
        optim.load_state_dict(ck["optimizer"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        start, history = ck["epoch"], ck["per_epoch"]
        log(f"finetune: resumed from {ckpt_path} after epoch {start}")
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for epoch in range(start, opts.epochs):
        model.train()
        t0, sums = time.perf_counter(), torch.zeros(2, dtype=torch.float64)
        steps = _Steps(sampler, epoch * iters, (epoch + 1) * iters)
        loader = DataLoader(train, batch_sampler=steps, num_workers=opts.num_workers)
        for step, (x, y, *_) in zip(range(steps.start, steps.end), loader):
            # drop path and mixup draw from generators seeded by (seed, step, rank): resumable, launch-independent
            seed = derive_seed(opts.seed, FINETUNE_STREAM, step, rank)
            torch.manual_seed(seed)
            np.random.seed(seed % (1 << 32))
            lr = _lr_at(step, total, warmup, opts)
            for g in optim.param_groups:
                g["lr"] = lr * g["lr_mult"]
            x, y = x.to(device), torch.as_tensor(y).reshape(-1).to(device)
            if mixup is not None:
                if len(x) % 2:
                    x, y = x[:-1], y[:-1]
                x, target = mixup(x, y)
                loss = torch.sum(-target * F.log_softmax(net(x), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(net(x), y, label_smoothing=opts.label_smoothing)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1.0 - opts.ema)
            sums += torch.tensor([float(loss.detach()) * len(x), len(x)], dtype=torch.float64)
        if world > 1:
            sums = sums.to(device)
            dist.all_reduce(sums)
        top1 = _top1(ema if ema is not None else model, val, device, rank, world, opts.num_workers)
        history.append(top1)
        loss_sum, seen = sums.tolist()
        log(f"finetune: epoch {epoch + 1}/{opts.epochs}  loss {loss_sum / max(seen, 1):.4f}  val top-1 {top1:.2f}%  "
            f"({time.perf_counter() - t0:.1f} s)")
        if ckpt_path is not None:
            if rank == 0:
                atomic_save({"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "per_epoch": history,
                             "model": model.state_dict(), "optimizer": optim.state_dict(),
                             "ema": ema.state_dict() if ema is not None else None, "options": asdict(opts),
                             "world_size": world}, ckpt_path)
            if world > 1:
                dist.barrier()  # no rank runs ahead of a checkpoint it might have to resume from
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return {"top1": history[-1] if history else float("nan"), "per_epoch": history, "ema": ema is not None,
            "options": asdict(opts)}


def _quiet(_: str) -> None:
    pass
