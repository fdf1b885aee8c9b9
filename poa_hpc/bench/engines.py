"""Throughput and memory of the POA step per distributed engine.

    poa bench engines --nproc 8 --models vit_b vit_l --engines ddp fsdp deepspeed:2 deepspeed:3

For every (model, engine) pair the driver launches ``torchrun`` with a worker that
builds the POA model of a preset registered by its backbone family (``vit_l``:
``configs/vit_l_poa.yaml``; ``vit_b``: the same recipe at width 768, depth 12; a
``*_tiny`` preset per family for CPU smoke runs), wraps it with the engine and times full training steps
(teacher, intact and elastic branches, both backward passes, optimizer step,
EMA) on synthetic multi-crop batches, so the loader is not measured.  It prints a
table and writes JSON under ``benchmarks/results/`` with device, versions and
commit.  Peak memory is ``torch.cuda.max_memory_allocated`` per GPU (max over
ranks); on CPU it is the peak resident set size of a rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import List

from poa_hpc.commands import register_command
from poa_hpc.results import write_result


def models() -> dict:
    """Benchmark presets of every registered backbone family: name -> (packaged config, overrides)."""
    from poa_hpc.models.registry import backbone_names, get_backbone

    return {name: preset for fam in backbone_names() for name, preset in get_backbone(fam).bench_presets.items()}


def _engine_overrides(engine: str) -> List[str]:
    from poa_hpc.distributed.registry import get_engine

    name, _, suffix = engine.partition(":")
    return [f"dist.engine={name}", *get_engine(name).variant_overrides(suffix)]


# ---------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    import torch

    from poa_hpc.config import load_config
    from poa_hpc.data.collate import mask_plan
    from poa_hpc.distributed.engines import build_engine
    from poa_hpc.distributed.env import init_distributed, shutdown
    from poa_hpc.models.subnets import SubnetSampler
    from poa_hpc.train.optim import apply_schedules, build_optimizer
    from poa_hpc.train.trainer import autocast_factory, build_model

    cfg = load_config(args.config, args.overrides)
    ctx = init_distributed(cfg.train.device)
    dev = ctx.device
    model = build_model(cfg).to(dev)
    engine = build_engine(cfg.dist, ctx, cfg.train.amp, cfg.optim.clip_grad, cfg.optim.batch_size)
    opt = engine.setup(model, lambda named: build_optimizer(named, cfg))
    sampler = SubnetSampler(model.space, 0, ctx.rank, cfg.model.rank_sampling)
    B, d = cfg.optim.batch_size, cfg.data
    grid = model.spec.mask_grid(cfg.model.section, d.global_size)
    g = torch.Generator().manual_seed(ctx.rank)
    import random

    plan = mask_plan(2 * B, cfg.loss.mask_sample_probability, (cfg.loss.mask_ratio_min, cfg.loss.mask_ratio_max),
                     random.Random(0))
    masks = torch.zeros(2 * B, grid * grid, dtype=torch.bool)
    for slot, (lo, hi) in plan.items():
        masks[slot, torch.randperm(grid * grid, generator=g)[: int(grid * grid * (lo + hi) / 2)]] = True
    batch = {
        "global_crops": torch.randn(2 * B, 3, d.global_size, d.global_size, generator=g),
        "local_crops": torch.randn(d.n_local * B, 3, d.local_size, d.local_size, generator=g),
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().flatten(),
        "masks_weight": (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks],
    }
    autocast = autocast_factory(cfg.train.amp, dev)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for step in range(args.warmup + args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        apply_schedules(opt, 1e-4, 0.04, 1e-4)
        model.forward_backward(batch, sampler.sample(step), 0.07, ibot=True, backward=engine.backward,
                               autocast=autocast)
        engine.clip_and_step(cfg.optim.clip_grad)
        engine.update_teacher(0.999)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    import torch.distributed as dist

    stats = torch.tensor([peak, sum(times) / len(times)], dtype=torch.float64, device=dev)
    if ctx.distributed:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if ctx.is_main:
        step_s = float(stats[1])
        print("BENCH " + json.dumps({
            "peak_mem_gib": round(float(stats[0]), 3), "step_s": round(step_s, 5),
            "img_per_s": round(B * ctx.world_size / step_s, 2), "world_size": ctx.world_size,
            "batch_per_rank": B,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        }), flush=True)
    if ctx.distributed:
        shutdown()


# ---------------------------------------------------------------------------- driver
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["vit_b", "vit_l"], choices=sorted(models()))
    from poa_hpc.distributed.registry import engine_names, get_engine

    p.add_argument("--engines", nargs="+", default=[v for n in engine_names() for v in get_engine(n).variants],
                   help="registered engines, NAME or NAME:VARIANT (deepspeed:3: ZeRO stage 3)")
    p.add_argument("--nproc", type=int, default=None, help="processes (default: GPUs, or 2 on CPU)")
    p.add_argument("--batch", type=int, default=32, help="images per rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--config", default=None, help="base config (default: each preset's packaged config)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.worker:
        worker(args)
        return 0
    import torch

    from poa_hpc.config import packaged_config

    presets = models()
    nproc = args.nproc or (torch.cuda.device_count() or 2)
    rows = []
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")}
    for model in args.models:
        for engine in args.engines:
            base, preset = presets[model]
            config = args.config or str(packaged_config(base))
            overrides = preset + _engine_overrides(engine) + [f"optim.batch_size={args.batch}",
                                                                     "train.progress=false", *args.overrides]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "poa_hpc", "bench", "engines", "--worker", "--config", config, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), *overrides]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")), None)
            row = {"model": model, "engine": engine}
            if r.returncode != 0 or line is None:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
                row["error"] = tail[0][:300]
            else:
                row.update(json.loads(line[len("BENCH "):]))
            rows.append(row)
            print(_fmt(row), flush=True)
    device = next((r["device"] for r in rows if "device" in r), "unknown")
    write_result("engines", rows, args.out, {"nproc": nproc, "batch_per_rank": args.batch, "steps": args.steps},
                 device=device)
    return 0 if all("error" not in r for r in rows) else 1


def _fmt(row: dict) -> str:
    if "error" in row:
        return f"{row['model']:<10}{row['engine']:<13} ERROR {row['error']}"
    return (f"{row['model']:<10}{row['engine']:<13}{row['world_size']:>3} ranks  {row['img_per_s']:>9.1f} img/s  "
            f"{row['step_s'] * 1e3:>9.1f} ms/step  peak {row['peak_mem_gib']:>7.2f} GiB/rank")


@register_command("bench engines")
class BenchEnginesCommand:
    """POA step img/s and peak memory per engine"""

    add_arguments = staticmethod(add_arguments)
    run = staticmethod(run)
