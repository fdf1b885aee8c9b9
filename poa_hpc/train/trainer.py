"""The POA training loop, the same for every engine (none, ddp, FSDP2, DeepSpeed).

Exact resume: everything random in a step is a pure function of
(seed, rank, step) — the batch and its augmentations, the iBOT masks, the
elastic sub-network and drop-path (torch's RNG is re-seeded every step) — so a
run resumed from a checkpoint at step ``t`` continues exactly as the
uninterrupted run.  ``--resume`` takes the newest checkpoint that every rank can
read; an unreadable or incomplete newer one is reported, set aside
(``*.unreadable``) and the one before it is used (see :func:`resume_newest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from poa_hpc.checkpoint.layout import LAST, point_last, resolve, set_aside, step_file
from poa_hpc.checkpoint.manifest import verify_manifest
from poa_hpc.config import POAConfig, flatten, to_dict, to_yaml
from poa_hpc.data.loader import build_train_loader, check_train_data
from poa_hpc.distributed.engines import build_engine
from poa_hpc.distributed.env import (
    all_reduce_mean,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
    shutdown,
)
from poa_hpc.errors import ConfigError, NonFiniteLossError, OutputWriteError, ResumeError
from poa_hpc.files import atomic_write_text
from poa_hpc.models.init_from import init_backbones
from poa_hpc.models.registry import backbone_names
from poa_hpc.models.subnets import SubnetSampler
from poa_hpc.perf.flops import analytic_step_flops, peak_tflops
from poa_hpc.perf.timing import StepTimer
from poa_hpc.train.knn_eval import InRunKnn
from poa_hpc.train.loggers import build_loggers
from poa_hpc.train.loggers import check_available as check_loggers
from poa_hpc.train.meta_arch import POA
from poa_hpc.train.optim import apply_schedules, build_optimizer
from poa_hpc.train.progress import StepClock, log_line
from poa_hpc.train.schedules import build_schedules, phase_steps
from poa_hpc.train.stop import StopRequest
from poa_hpc.train.watchdog import CollapseWatchdog

log = logging.getLogger("poa_hpc.train")


# Keys that must not change across a resume: they define the parameters or the sampled sequence.
_RESUME_FIXED = ("model.", "head.", "train.seed")
# ... except the keys that only choose the initial weights: a resume never re-initialises (and checkpoints
# written before these keys existed stay resumable).
_RESUME_FREE = ("model.init_from", "model.init_from_format", "model.init_heads", "model.swin.init")


def check_resumable(saved_cfg: dict, cfg: POAConfig, path: Path) -> None:
    saved, now = flatten(saved_cfg), flatten(to_dict(cfg))
    # The sections of the families this run does not build do not matter.
    idle = tuple(f"model.{name}." for name in backbone_names() if name != cfg.model.arch)
    changed = [k for k in now if k.startswith(_RESUME_FIXED) and not k.startswith(idle) and k not in _RESUME_FREE
               and saved.get(k) != now[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:5])
        raise ResumeError(f"cannot resume from '{path}': the config changed ({detail}); "
                          f"use a new train.output_dir or restore these keys")


def step_seed(seed: int, rank: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"poa-step-{seed}-{rank}-{step}".encode()).digest()[:8], "little") >> 1


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


OnStop = Callable[[int, str, int], None]
StepHook = Callable[[int, POA, Dict[str, float]], None]


def check_train_keys(cfg: POAConfig) -> None:
    """The checkpoint-history and timeout keys (validated here, next to their use)."""
    t = cfg.train
    if t.checkpoint_every < 1:
        raise ConfigError(f"key 'train.checkpoint_every': {t.checkpoint_every} must be >= 1")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"key 'train.keep_checkpoints': {t.keep_checkpoints} must be >= 1 (the newest is resumed from)")
    if t.keep_every < 0:
        raise ConfigError(f"key 'train.keep_every': {t.keep_every} must be >= 0 (0: off)")
    if not cfg.dist.timeout_s > 0:
        raise ConfigError(f"key 'dist.timeout_s': {cfg.dist.timeout_s} must be > 0 seconds")


def _verify(engine, ckpt_dir: Path, step: int, ctx) -> Optional[str]:
    """This rank's verdict on a candidate: its share of the manifest's hashes, then the engine's checks."""
    problem = verify_manifest(ckpt_dir, step, ctx.rank, ctx.world_size)
    if problem:
        return problem
    return engine.verify(ckpt_dir, step)


def resume_newest(engine, ckpt_dir: Path, cfg: POAConfig, ctx) -> Optional[dict]:
    """Load the newest checkpoint every rank can read; ``None`` if there is none.

    Candidates come newest first from rank 0's listing.  Each rank checks a
    candidate (:meth:`Engine.verify`: the full file for none/ddp, metadata and
    shard sizes for FSDP, the tag's files for DeepSpeed); if any rank finds a
    problem, every rank moves on to the next older one, so all load the same
    step.  Each skipped checkpoint is reported with its path and the reason, and
    its step file is renamed ``*.unreadable`` (kept, out of the history).  A
    checkpoint of another configuration stops the run (:class:`ResumeError`).
    """
    steps = broadcast_object(engine.checkpoint_steps(ckpt_dir))
    if not steps:
        log.info("resume requested but %s has no checkpoint; starting from scratch", ckpt_dir)
        return None
    skipped = []
    for step in steps:
        problems = [p for p in gather_objects(_verify(engine, ckpt_dir, step, ctx)) if p]
        if problems:
            skipped.append((step, problems[0]))
            older = f"trying the previous one (step {steps[len(skipped)]})" if len(skipped) < len(steps) else "no older one"
            log.warning("cannot resume from the checkpoint of step %s: %s; %s",
                        step, problems[0], older)
            continue
        try:
            meta = engine.load(ckpt_dir, step=step,
                               check=lambda m: check_resumable(m["config"], cfg, engine.checkpoint_path(ckpt_dir, step)))
        except ValueError as exc:  # refused (another config), or read but not loadable into this model
            raise ResumeError(str(exc)) from None
        if skipped and ctx.is_main:
            for bad, _ in skipped:
                f = step_file(ckpt_dir, bad)
                if f.exists():
                    os.replace(f, f.with_name(f.name + ".unreadable"))
                    log.warning("set aside %s as %s.unreadable", f, f.name)
            point_last(ckpt_dir, step)
        barrier()
        if skipped:
            log.warning("resumed from the checkpoint of step %d instead of step %s (see above)", int(meta["step"]),
                        skipped[0][0])
        return meta
    raise ResumeError(f"no readable checkpoint in '{ckpt_dir}': " + "; ".join(p for _, p in skipped))


def _launch_world_size() -> int:
    """The world size of this launch (torchrun's or srun's variables), before the process group exists."""
    import os

    from poa_hpc.distributed.env import slurm_launch_env

    return int(os.environ.get("WORLD_SIZE") or (slurm_launch_env() or {}).get("WORLD_SIZE", 1))


def train(cfg: POAConfig, resume: bool = False, stop: Optional[StopRequest] = None,
          on_stop: Optional[OnStop] = None, on_step: Optional[StepHook] = None) -> Dict[str, object]:
    """Train POA in this process (one rank of a torchrun/Slurm job, or alone); returns a summary.

    With ``stop`` (see :mod:`poa_hpc.train.stop`), a stop signal received by any
    rank ends the run after the current step with a checkpoint of that step;
    the summary's ``interrupted`` is then the signal's name (else ``None``).
    ``on_stop(step, signal_name, rank)`` then runs on every rank after the
    checkpoint and before the ranks leave together (rank 0 requeues there, so no
    rank exits before the requeue is done).
    ``on_step(step, model, record)`` (main rank, one process engines only: the model is
    whole there) is called after each step's optimizer and teacher updates with the
    step's record, for measurements during training (``poa bench demo``); it must not
    change the model.
    """
    check_train_keys(cfg)
    # The user's data is checked before the process group exists: a bad root, index or shard ends every rank
    # with the same one-line error (exit code 2, not requeued), not one rank crashing while the others wait.
    dataset = check_train_data(cfg, world_size=_launch_world_size())
    check_loggers(cfg)  # a missing logger package stops every rank here, with one line
    ctx = init_distributed(cfg.train.device, cfg.dist.timeout_s, Path(cfg.train.output_dir) / "status")
    try:
        summary = _train(cfg, resume, ctx, stop, on_stop, on_step, dataset)
    except BaseException:
        if ctx.distributed:  # no barrier: the other ranks may be gone
            torch.distributed.destroy_process_group()
        raise
    if ctx.distributed:
        shutdown()
    return summary


def _train(cfg: POAConfig, resume: bool, ctx, stop: Optional[StopRequest] = None,
           on_stop: Optional[OnStop] = None,
           on_step: Optional[StepHook] = None, dataset=None) -> Dict[str, object]:
    device, rank, world_size = ctx.device, ctx.rank, ctx.world_size
    out_dir = Path(cfg.train.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    keep = {"keep_last": cfg.train.keep_checkpoints, "keep_every": cfg.train.keep_every}
    if ctx.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(to_yaml(cfg))
        except OSError as exc:
            raise OutputWriteError(f"the run folder '{out_dir}' could not be written: {exc}") from None

    model = build_model(cfg).to(device)
    engine = build_engine(cfg.dist, ctx, cfg.train.amp, cfg.optim.clip_grad, cfg.optim.batch_size)
    # Resume wins over init: a requeued run continues from its own checkpoint and never re-reads init_from.
    if cfg.model.init_from and not (resume and broadcast_object(engine.checkpoint_steps(ckpt_dir))):
        init_from_file(model, cfg, out_dir if ctx.is_main else None)
    optimizer = engine.setup(model, lambda named: build_optimizer(named, cfg))
    start_step = 0
    saved_watchdog = None
    if resume:
        meta = resume_newest(engine, ckpt_dir, cfg, ctx)
        if meta is not None:
            start_step = int(meta["step"])
            saved_watchdog = meta.get("watchdog")
            log.info("resumed from %s at step %d (%s engine, %d ranks)", ckpt_dir, start_step, engine.name, world_size)
    else:
        moved = set_aside(ckpt_dir) if ctx.is_main else None  # a fresh run never mixes with an older history
        if moved is not None:
            log.warning("starting from scratch: the checkpoints already in %s were moved to %s (use --resume to "
                        "continue a run)", ckpt_dir, moved)
        barrier()

    loader, iters_per_epoch = build_train_loader(cfg, rank=rank, world_size=world_size, start_step=start_step,
                                                 dataset=dataset)
    total = cfg.optim.epochs * iters_per_epoch
    end = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
    sched = build_schedules(cfg, iters_per_epoch, world_size)
    sampler = SubnetSampler(model.space, cfg.train.seed, rank, cfg.model.rank_sampling)
    watchdog = CollapseWatchdog(cfg.head.prototypes, cfg.train.collapse_tolerance, cfg.train.collapse_patience)
    watchdog.load_state_dict(saved_watchdog)  # warn once per run, resumed or not
    ibot_start = phase_steps(cfg, iters_per_epoch).ibot_start
    autocast = autocast_factory(cfg.train.amp, device)
    global_batch = cfg.optim.batch_size * world_size
    # jsonl, tensorboard, wandb, mlflow (train.loggers): main rank only, one logger run across attempts
    metrics = build_loggers(cfg, out_dir, start_step, resume) if ctx.is_main else None
    knn = None  # train.eval_every: the in-run k-NN needs the whole teacher on every rank
    if cfg.train.eval_every > 0 and cfg.dist.engine in ("none", "ddp"):
        knn = InRunKnn(cfg, rank, world_size, device)
    elif cfg.train.eval_every > 0 and ctx.is_main:
        log.warning("train.eval_every=%d is off with dist.engine=%s (the teacher is sharded): evaluate the "
                    "checkpoints with poa eval knn (train.keep_every keeps them)", cfg.train.eval_every, cfg.dist.engine)
    meta = {"config": to_dict(cfg), "sampler": sampler.state_dict(), "iters_per_epoch": iters_per_epoch,
            "engine": engine.name, "world_size": world_size}

    # Per-phase times (CUDA events read at logged steps), achieved TFLOP/s and MFU (analytic FLOPs of this rank's step).
    timer = StepTimer(device)
    peak = cfg.train.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    flops_since_log = 0.0
    bar = None
    # A bar on a terminal; in a log file (sbatch, submitit) one line per logged step instead.
    log_lines = cfg.train.progress and rank == 0 and not sys.stderr.isatty()
    if cfg.train.progress and rank == 0 and not log_lines:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=start_step, desc="poa train", dynamic_ncols=True, leave=True)
    model.train()
    model.teacher.eval()
    last_record: Dict[str, float] = {}
    skipped = 0
    skipped_at_epoch_start = 0
    interrupted: Optional[str] = None
    it = iter(loader)
    if stop is not None:
        stop.arm()  # from here on a SIGTERM checkpoints the finished step (see train/stop.py)
    t_last = time.perf_counter()
    clock = StepClock(start_step, end, now=t_last)
    irregular = False  # the previous step also checkpointed or evaluated: its time is left out of the smoothing
    try:
        for step in range(start_step, end):
            torch.manual_seed(step_seed(cfg.train.seed, rank, step))
            with timer.host("data"):
                batch = next(it)
            assert int(batch.get("step", step)) == step, f"loader out of step: batch {batch.get('step')} at step {step}"
            s = sched.at(step)
            apply_schedules(optimizer, s["lr"], s["wd"], s["last_layer_lr"])
            sub = sampler.sample(step)
            logged = step % cfg.train.log_every == 0 or step == end - 1
            ibot = step >= ibot_start
            terms = model.forward_backward(batch, sub, s["teacher_temp"], ibot=ibot, backward=engine.backward,
                                           autocast=autocast, stats=logged, phase=timer.phase)
            flops = sum(analytic_step_flops(cfg, sub, batch["mask_indices"].numel(), ibot).values())
            # Decide on all-reduced values: a rank stopping alone would deadlock the others.  This is the step's
            # one host synchronisation: the loss terms stay on the device until here.
            got = stop is not None and stop.signal is not None
            terms = all_reduce_mean({**terms, "n_skipped": float(batch.get("n_skipped", 0)), "flops": flops,
                                     "stop_ranks": float(got), "stop_signal": float(stop.signal) if got else 0.0},
                                    device)
            flops_since_log += terms.pop("flops")
            skipped += int(round(terms.pop("n_skipped") * world_size))
            stop_ranks, stop_signal = terms.pop("stop_ranks") * world_size, terms.pop("stop_signal") * world_size
            if not math.isfinite(terms["loss"]):
                bad = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                raise NonFiniteLossError(
                    f"loss is not finite at step {step} (sub-network {sub}; {bad}); the run stopped before the "
                    f"optimizer step and the last good checkpoint in {ckpt_dir} was left untouched. "
                    f"Lower optim.base_lr or raise optim.warmup_epochs (or optim.warmup_steps), then resume "
                    f"with --resume."
                )
            with timer.phase("optimizer"):  # clipping, AdamW and the EMA
                grad_norm = engine.clip_and_step(cfg.optim.clip_grad)
                engine.update_teacher(s["momentum"])
            timer.step_done()

            now = time.perf_counter()
            clock.tick(now - t_last, regular=not irregular)
            irregular = False
            t_last = now
            step_s = clock.step_s or (now - clock.t0)
            ips = global_batch / max(step_s, 1e-9)  # smoothed
            if logged:  # every rank feeds the same all-reduced record; the main rank warns
                record = {"step": step, "epoch": step // iters_per_epoch, "width": sub.width, "depth": sub.depth,
                          "lr": s["lr"], "wd": s["wd"], "momentum": s["momentum"], "teacher_temp": s["teacher_temp"],
                          "grad_norm": float(grad_norm), "img_per_s": ips, "step_s": step_s,
                          "eta_s": clock.eta_s(step + 1), "elapsed_s": clock.elapsed_s(now), "skipped_images": skipped,
                          **terms}
                n_steps, times = timer.collect()
                record.update(times)
                # achieved per device: this rank's step FLOPs (mean over ranks) over the measured step time
                record["tflops"] = flops_since_log / n_steps / max(times["time/step_ms"] / 1e3, 1e-12) / 1e12
                if peak:
                    record["mfu"] = record["tflops"] / peak
                flops_since_log = 0.0
                warning = watchdog.update(record)
                if warning is not None and ctx.is_main:
                    log.warning(warning)
                record["collapsed"] = int(watchdog.collapsed)
                last_record = record
            evaluated: Dict[str, float] = {}
            if knn is not None and ((step + 1) % cfg.train.eval_every == 0 or step + 1 == end):
                t_eval = time.perf_counter()
                evaluated = knn(model.teacher_backbone())  # every rank: features in shards, gathered
                evaluated["time/knn_s"] = time.perf_counter() - t_eval
                irregular = True
                if ctx.is_main:
                    log.info("k-NN after step %d: %s", step + 1,
                             "  ".join(f"{k[4:]} {v:.2f}%" for k, v in evaluated.items() if k.startswith("knn/")))
                if logged:
                    record.update(evaluated)
            if on_step is not None and ctx.is_main:
                on_step(step, model, record if logged else {"step": step, "lr": s["lr"], "teacher_temp": s["teacher_temp"],
                                                            **terms})
            if metrics is not None and logged:
                metrics.log(record)
            elif metrics is not None and evaluated:
                metrics.log({"step": step, **evaluated})
            if log_lines and logged:
                log.info(log_line(step, end, clock.elapsed_s(now), clock.eta_s(step + 1), terms["loss"], s["lr"],
                                  str(sub), ips, record.get("mfu")))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{s['lr']:.2e}", sub=str(sub), ips=f"{ips:.0f}")
            if (step + 1) % iters_per_epoch == 0 or step + 1 == end:
                if skipped > skipped_at_epoch_start and ctx.is_main:
                    log.warning("epoch %d: %d unreadable images skipped and replaced (%d in this run)",
                                step // iters_per_epoch, skipped - skipped_at_epoch_start, skipped)
                skipped_at_epoch_start = skipped
            if stop_ranks > 0.5:  # some rank got a stop signal: all checkpoint this step and return
                interrupted = _signal_name(stop, stop_signal / round(stop_ranks))
                with timer.host("checkpoint"):
                    engine.save(ckpt_dir, step + 1, {**meta, "watchdog": watchdog.state_dict()}, **keep)
                end = step + 1
                log.warning("stopped by %s after step %d; checkpoint saved in %s", interrupted, step, ckpt_dir)
                if on_stop is not None:
                    on_stop(end, interrupted, rank)
                break
            done = step + 1
            if (done % cfg.train.checkpoint_every == 0 or done == end
                    or (cfg.train.keep_every > 0 and done % cfg.train.keep_every == 0)):
                with timer.host("checkpoint"):
                    engine.save(ckpt_dir, done, {**meta, "watchdog": watchdog.state_dict()}, **keep)
                irregular = True
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    if skipped and ctx.is_main:
        log.warning("%d unreadable images were skipped and replaced during training", skipped)
    return {"step": end, "checkpoint": str(ckpt_dir / LAST), "metrics": last_record, "skipped_images": skipped,
            "rank": rank, "world_size": world_size, "interrupted": interrupted}


def init_from_file(model: POA, cfg: POAConfig, out_dir: Optional[Path]) -> Dict[str, object]:
    """``model.init_from`` (a file, or a poa_hpc run folder / its ``checkpoints/``: the newest checkpoint): the
    dense checkpoint into the intact student and the teacher (every rank, before
    the engine wraps the model); the report is logged and written to ``init_report.json`` (main rank)."""
    m = cfg.model
    path = resolve(m.init_from)  # a run folder or its checkpoints/ folder: its last.pt
    report = init_backbones(path, m.init_from_format, m.arch, m.section,
                            [model.student.backbone, model.teacher.backbone],
                            [model.student.heads, model.teacher.heads], m.init_heads)
    if out_dir is not None:
        log.info(report.summary())
        try:
            atomic_write_text(out_dir / "init_report.json", json.dumps(report.to_dict(), indent=2) + "\n")
        except OSError as exc:
            raise OutputWriteError(f"the run folder '{out_dir}' could not be written: {exc}") from None
    return report.to_dict()


def _signal_name(stop: Optional[StopRequest], mean_signal: float) -> str:
    """This rank's own stop signal, else the one the ranks that got one received (Slurm signals them all alike)."""
    if stop is not None and stop.name is not None:
        return stop.name
    try:
        return signal.Signals(int(round(mean_signal))).name
    except ValueError:
        return "signal"
