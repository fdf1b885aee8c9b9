"""Full fine-tuning of an extracted sub-network: ``poa eval finetune FILE`` (and the ``finetune`` sweep protocol).

The dense network (built with stochastic depth ``--drop-path``) plus a linear head on its features is
trained with AdamW, layer-wise lr decay over the same layer ids as pre-training (the family's
``layer_id``; the head gets the last id, ``lr * decay ** (num_layers + 1 - id)``), a per-step cosine
schedule after a linear warm-up, label smoothing, optional mixup / CutMix (timm's ``Mixup``) and an
optional EMA of the weights (evaluated instead of the weights when on).  Top-1 on the validation split
after every epoch.  A checkpoint is written atomically after every epoch to ``<out>/finetune.pt``; a
run started again with the same ``--out`` continues from it (a killed fine-tune resumes).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["FinetuneOptions", "finetune"]


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
def _top1(model: nn.Module, loader: DataLoader, device) -> float:
    model.eval()
    correct = n = 0
    for x, y, *_ in loader:
        pred = model(x.to(device)).argmax(1).cpu()
        y = torch.as_tensor(y).reshape(-1)
        correct += int((pred == y).sum())
        n += len(y)
    return 100.0 * correct / n


def finetune(backbone_builder: Callable[[float], nn.Module], spec, arch, feature_dim: int, train: Dataset,
             val: Dataset, num_classes: int, opts: FinetuneOptions, out: Optional[str | Path] = None,
             device: str | torch.device = "cpu", log: Callable[[str], None] = print,
             stop_after_epoch: Optional[int] = None) -> Dict[str, Any]:
    """Fine-tune ``backbone_builder(drop_path)`` (a dense network with its weights loaded) with a new head.

    Returns ``{"top1": final val top-1 (%), "per_epoch": [...], "ema": bool, "options": ...}``.  With ``out``,
    ``<out>/finetune.pt`` is written after every epoch and resumed from when present."""
    from poa_hpc.checkpoint.layout import atomic_save

    device = torch.device(device)
    torch.manual_seed(opts.seed)
    model = _Classifier(backbone_builder(opts.drop_path), feature_dim, num_classes).to(device)
    groups = _param_groups(model, spec, arch, opts)
    optim = torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.999))
    ema = copy.deepcopy(model).requires_grad_(False) if opts.ema > 0 else None
    mixup = None
    if opts.mixup > 0 or opts.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=opts.mixup, cutmix_alpha=opts.cutmix, label_smoothing=opts.label_smoothing,
                      num_classes=num_classes)
    gen = torch.Generator().manual_seed(opts.seed)
    loader = DataLoader(train, batch_size=opts.batch_size, shuffle=True, drop_last=len(train) > opts.batch_size,
                        num_workers=opts.num_workers, generator=gen)
    val_loader = DataLoader(val, batch_size=256, shuffle=False, num_workers=opts.num_workers)
    total, warmup = opts.epochs * len(loader), opts.warmup_epochs * len(loader)
    start, history = 0, []
    ckpt_path = Path(out) / "finetune.pt" if out is not None else None
    if ckpt_path is not None and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck["options"] != asdict(opts):
            from poa_hpc.errors import ResumeError

            raise ResumeError(f"{ckpt_path}: written with other fine-tuning options; use another --out")
        model.load_state_dict(ck["model"])
        optim.load_state_dict(ck["optimizer"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        start, history = ck["epoch"], ck["per_epoch"]
        gen.set_state(ck["loader_rng"])
        torch.set_rng_state(ck["torch_rng"])
        log(f"finetune: resumed from {ckpt_path} after epoch {start}")
    for epoch in range(start, opts.epochs):
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for i, (x, y, *_) in enumerate(loader):
            step = epoch * len(loader) + i
            lr = _lr_at(step, total, warmup, opts)
            for g in optim.param_groups:
                g["lr"] = lr * g["lr_mult"]
            x, y = x.to(device), torch.as_tensor(y).reshape(-1).to(device)
            if mixup is not None:
                if len(x) % 2:
                    x, y = x[:-1], y[:-1]
                x, target = mixup(x, y)
                loss = torch.sum(-target * F.log_softmax(model(x), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(model(x), y, label_smoothing=opts.label_smoothing)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1.0 - opts.ema)
            loss_sum += float(loss.detach()) * len(x)
            seen += len(x)
        top1 = _top1(ema if ema is not None else model, val_loader, device)
        history.append(top1)
        log(f"finetune: epoch {epoch + 1}/{opts.epochs}  loss {loss_sum / max(seen, 1):.4f}  val top-1 {top1:.2f}%  "
            f"({time.perf_counter() - t0:.1f} s)")
        if ckpt_path is not None:
            atomic_save({"epoch": epoch + 1, "per_epoch": history, "model": model.state_dict(),
                         "optimizer": optim.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                         "options": asdict(opts), "loader_rng": gen.get_state(), "torch_rng": torch.get_rng_state()},
                        ckpt_path)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return {"top1": history[-1] if history else float("nan"), "per_epoch": history, "ema": ema is not None,
            "options": asdict(opts)}
