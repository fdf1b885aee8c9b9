"""``poa profile``: a few training steps under ``torch.profiler``.

    poa profile --config configs/demo_cpu.yaml [--steps 3] [--warmup 1] [--synthetic] [key=value ...]

Runs the training step exactly as ``poa train`` does (the config's engine, autocast, loader; or a
synthetic batch of the config's shapes with ``--synthetic``), with the step's parts marked
(``record_function``: data, teacher, intact, elastic, optimizer), and writes under
``<train.output_dir>/profile/``: ``trace.json`` (Chrome trace: chrome://tracing or
https://ui.perfetto.dev), on CUDA ``memory_snapshot.pickle`` (``torch.cuda.memory._dump_snapshot``;
drop it on https://pytorch.org/memory_viz) and ``summary.json``.  Prints the top operators by self
time and the per-phase time of the profiled steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from poa_hpc.errors import ConfigError

__all__ = ["add_arguments", "profile"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="steps before profiling (default 1)")
    p.add_argument("--synthetic", action="store_true", help="a synthetic batch instead of the config's loader")
    p.add_argument("--rows", type=int, default=15, help="operators in the printed table")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.output_dir=runs/prof")


def profile(args: argparse.Namespace) -> int:
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    from poa_hpc.config import load_config
    from poa_hpc.data.loader import build_train_loader
    from poa_hpc.distributed.engines import build_engine
    from poa_hpc.distributed.env import init_distributed, shutdown
    from poa_hpc.models.subnets import SubnetSampler
    from poa_hpc.perf.fake import synthetic_batch
    from poa_hpc.perf.timing import StepTimer
    from poa_hpc.train.optim import apply_schedules, build_optimizer
    from poa_hpc.train.schedules import build_schedules
    from poa_hpc.train.trainer import autocast_factory, build_model, step_seed

    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be >= 1 and --warmup >= 0")
    cfg = load_config(args.config, args.overrides)
    ctx = init_distributed(cfg.train.device)
    device = ctx.device
    out = Path(cfg.train.output_dir) / "profile"
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg).to(device)
    engine = build_engine(cfg.dist, ctx, cfg.train.amp, cfg.optim.clip_grad, cfg.optim.batch_size)
    optimizer = engine.setup(model, lambda named: build_optimizer(named, cfg))
    total = args.warmup + args.steps
    if args.synthetic:
        batch = synthetic_batch(cfg, generator=torch.Generator().manual_seed(ctx.rank))
        batches = (batch for _ in range(total))
        iters_per_epoch = max(total, 1)
    else:
        batches, iters_per_epoch = build_train_loader(cfg, rank=ctx.rank, world_size=ctx.world_size)
        batches = iter(batches)
    sched = build_schedules(cfg, iters_per_epoch, ctx.world_size)
    sampler = SubnetSampler(model.space, cfg.train.seed, ctx.rank, cfg.model.rank_sampling)
    autocast = autocast_factory(cfg.train.amp, device)
    timer = StepTimer(device)
    cuda = device.type == "cuda"

    @contextlib.contextmanager
    def phase(name: str):
        with record_function(f"poa/{name}"), timer.phase(name):
            yield

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    model.train()
    model.teacher.eval()

    def one_step(step: int) -> None:
        torch.manual_seed(step_seed(cfg.train.seed, ctx.rank, step))
        with record_function("poa/data"), timer.host("data"):
            batch = next(batches)
        s = sched.at(step)
        apply_schedules(optimizer, s["lr"], s["wd"], s["last_layer_lr"])
        ibot = args.synthetic or step >= cfg.loss.ibot_start_epoch * iters_per_epoch
        model.forward_backward(batch, sampler.sample(step), s["teacher_temp"], ibot=ibot,
                               backward=engine.backward, autocast=autocast, phase=phase)
        with phase("optimizer"):
            engine.clip_and_step(cfg.optim.clip_grad)
            engine.update_teacher(s["momentum"])
        timer.step_done()

    for step in range(args.warmup):  # not profiled: first-call costs, optimizer state
        one_step(step)
    timer.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    prof = torch_profile(activities=activities, profile_memory=True, record_shapes=False)
    with prof:
        for step in range(args.warmup, total):
            one_step(step)
        if cuda:
            torch.cuda.synchronize()
    _, times = timer.collect()
    trace = out / (f"trace_rank{ctx.rank}.json" if ctx.world_size > 1 else "trace.json")
    prof.export_chrome_trace(str(trace))
    summary = {"steps": args.steps, "device": str(device), "trace": str(trace), "phase_ms": times}
    if cuda:
        snap = out / "memory_snapshot.pickle"
        torch.cuda.memory._dump_snapshot(str(snap))
        torch.cuda.memory._record_memory_history(enabled=None)
        summary.update({"memory_snapshot": str(snap), "max_memory_allocated": torch.cuda.max_memory_allocated()})
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    if ctx.is_main:
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
        print(f"per step over {args.steps} profiled steps ({'CUDA events' if cuda else 'perf_counter'}):")
        for k, v in times.items():
            print(f"  {k[len('time/'):-len('_ms')]:<12}{v:>10.1f} ms")
        print(f"Chrome trace: {trace}" + (f"\nmemory snapshot: {summary['memory_snapshot']}" if cuda else ""))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if ctx.distributed:
        shutdown()
    return 0
