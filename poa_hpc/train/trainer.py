"""The POA training loop (single process; engines for sharded training plug in later).

Exact resume: everything random in a step is a pure function of
(seed, rank, step) — the batch and its augmentations, the iBOT masks, the
elastic sub-network and drop-path (torch's RNG is re-seeded every step) — so a
run resumed from a checkpoint at step ``t`` continues exactly as the
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from poa_hpc.config import POAConfig, to_dict, to_yaml
from poa_hpc.data.loader import build_train_loader
from poa_hpc.models.subnets import SubnetSampler
from poa_hpc.train.checkpoint import LAST, atomic_save, find_last, load_checkpoint
from poa_hpc.train.meta_arch import POA
from poa_hpc.train.optim import apply_schedules, build_optimizer, clip_grad_norm
from poa_hpc.train.schedules import build_schedules

log = logging.getLogger("poa_hpc.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without touching the last checkpoint."""


class ResumeError(ValueError):
    """The checkpoint to resume from does not belong to this configuration."""


def _flat(d: dict, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Keys that must not change across a resume: they define the parameters or the sampled sequence.
_RESUME_FIXED = ("model.", "head.", "train.seed")


def check_resumable(saved_cfg: dict, cfg: POAConfig, path: Path) -> None:
    saved, now = _flat(saved_cfg), _flat(to_dict(cfg))
    changed = [k for k in now if k.startswith(_RESUME_FIXED) and saved.get(k) != now[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:5])
        raise ResumeError(f"cannot resume from '{path}': the config changed ({detail}); "
                          f"use a new train.output_dir or restore these keys")


def step_seed(seed: int, rank: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"poa-step-{seed}-{rank}-{step}".encode()).digest()[:8], "little") >> 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def autocast_factory(amp: str, device: torch.device):
    use_bf16 = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_model(cfg: POAConfig) -> POA:
    """The POA model at initialisation; deterministic in ``train.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return POA(cfg)


class MetricsLog:
    """JSONL metrics (one object per logged step), optionally mirrored to TensorBoard."""

    def __init__(self, path: Path, start_step: int, tensorboard_dir: Optional[Path] = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # drop what a killed run logged after its last checkpoint
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < start_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.f = path.open("a")
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                log.warning("train.tensorboard=true but tensorboard is not installed; logging JSONL only")

    def write(self, record: Dict[str, float]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def train(cfg: POAConfig, resume: bool = False, rank: int = 0, world_size: int = 1) -> Dict[str, object]:
    """Train POA; returns a summary (final step, checkpoint path, last metrics)."""
    device = resolve_device(cfg.train.device)
    out_dir = Path(cfg.train.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))

    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model.student.named_parameters(), cfg, num_layers=cfg.model.depth)
    start_step = 0
    if resume:
        last = find_last(out_dir)
        if last is None:
            log.info("resume requested but %s has no checkpoint; starting from scratch", ckpt_dir)
        else:
            try:
                ckpt = load_checkpoint(last, map_location=device)
            except ValueError as exc:
                raise ResumeError(str(exc)) from None
            check_resumable(ckpt["config"], cfg, last)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_step = int(ckpt["step"])
            log.info("resumed from %s at step %d", last, start_step)

    loader, iters_per_epoch = build_train_loader(cfg, rank=rank, world_size=world_size, start_step=start_step)
    total = cfg.optim.epochs * iters_per_epoch
    end = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
    sched = build_schedules(cfg, iters_per_epoch, world_size)
    sampler = SubnetSampler(model.space, cfg.train.seed, rank, cfg.model.elastic.rank_sampling)
    ibot_start = cfg.loss.ibot_start_epoch * iters_per_epoch
    autocast = autocast_factory(cfg.train.amp, device)
    global_batch = cfg.optim.batch_size * world_size
    metrics = MetricsLog(out_dir / "metrics.jsonl", start_step,
                         out_dir / "tensorboard" if cfg.train.tensorboard else None)

    def save(step: int) -> Path:
        return atomic_save(
            {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "config": to_dict(cfg), "sampler": sampler.state_dict(), "iters_per_epoch": iters_per_epoch},
            ckpt_dir / LAST,
        )

    bar = None
    if cfg.train.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=start_step, desc="poa train", dynamic_ncols=True, leave=True)
    model.train()
    model.teacher.eval()
    last_record: Dict[str, float] = {}
    skipped = 0
    it = iter(loader)
    t_last = time.perf_counter()
    try:
        for step in range(start_step, end):
            torch.manual_seed(step_seed(cfg.train.seed, rank, step))
            batch = next(it)
            assert int(batch.get("step", step)) == step, f"loader out of step: batch {batch.get('step')} at step {step}"
            skipped += int(batch.get("n_skipped", 0))
            s = sched.at(step)
            apply_schedules(optimizer, s["lr"], s["wd"], s["last_layer_lr"])
            sub = sampler.sample(step)
            terms = model.forward_backward(batch, sub, s["teacher_temp"], ibot=step >= ibot_start, autocast=autocast)
            if not math.isfinite(terms["loss"]):
                bad = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                raise NonFiniteLossError(
                    f"loss is not finite at step {step} (sub-network {sub}; {bad}); the run stopped before the "
                    f"optimizer step and the last good checkpoint in {ckpt_dir} was left untouched. "
                    f"Lower optim.base_lr or raise optim.warmup_epochs, then resume with --resume."
                )
            grad_norm = clip_grad_norm(model.student.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_teacher(s["momentum"])

            now = time.perf_counter()
            ips = global_batch / max(now - t_last, 1e-9)
            t_last = now
            record = {"step": step, "epoch": step // iters_per_epoch, "width": sub.width, "depth": sub.depth,
                      "lr": s["lr"], "wd": s["wd"], "momentum": s["momentum"], "teacher_temp": s["teacher_temp"],
                      "grad_norm": grad_norm, "img_per_s": ips, "skipped_images": skipped, **terms}
            last_record = record
            if step % cfg.train.log_every == 0 or step == end - 1:
                metrics.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{s['lr']:.2e}", sub=str(sub), ips=f"{ips:.0f}")
            if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == end:
                save(step + 1)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    if skipped:
        log.warning("%d unreadable images were skipped and replaced during training", skipped)
    return {"step": end, "checkpoint": str(ckpt_dir / LAST), "metrics": last_record, "skipped_images": skipped}
