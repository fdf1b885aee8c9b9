"""The POA training step on one device: img/s, achieved TFLOP/s and MFU, per-phase times, peak memory next to
``poa estimate memory``'s prediction for the same step.

    poa bench step                                   # ViT-L POA at batch 50, 30 steps (GPU)
    poa bench step --preset vit_tiny --steps 2       # a CPU smoke run of the same code

One process (``dist.engine=none``), a synthetic batch of the config's shapes (so the loader is not
measured), elastic sub-networks drawn by eq. 14 as in training.  Times come from CUDA events
(``perf_counter`` on CPU), FLOPs from the analytic model checked against FlopCounterMode
(:mod:`poa_hpc.perf.flops`), the peak from ``torch.cuda.max_memory_allocated``; the prediction is
made for the largest sub-network the run drew and the same masked-token count.  Prints a table and
writes JSON under ``benchmarks/results/``.

``--drop-path-mode mask subset`` runs the same steps (same sub-networks, same batch, a freshly built model
each) once per stochastic-depth form (``model.drop_path_mode``) and prints each part's ms/step next to the
first mode's, with the analytic FLOPs per step of each.
"""

from __future__ import annotations

import argparse
import time

from poa_hpc.commands import register_command
from poa_hpc.results import write_result

__all__ = ["run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from poa_hpc.bench.engines import models

    presets = models()
    p.add_argument("--preset", default="vit_l", choices=sorted(presets), help="model preset (default vit_l)")
    p.add_argument("--batch", type=int, default=50, help="images per step (default 50)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak", type=float, default=0.0, help="peak TFLOP/s for the MFU (default: the GPU's table value)")
    p.add_argument("--no-estimate", action="store_true", help="skip the memory prediction")
    p.add_argument("--drop-path-mode", nargs="+", choices=("auto", "mask", "subset"), default=None,
                   help="one run per model.drop_path_mode, compared part by part (default: the config's)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("overrides", nargs="*")


def run(args: argparse.Namespace) -> int:
    import torch

    from poa_hpc.bench.engines import models
    from poa_hpc.config import load_config, packaged_config

    presets = models()
    base, preset = presets[args.preset]
    rows = []
    for mode in args.drop_path_mode or [None]:
        extra = [] if mode is None else [f"model.drop_path_mode={mode}"]
        cfg = load_config(packaged_config(base), preset + [f"optim.batch_size={args.batch}", "dist.engine=none",
                                                           "train.progress=false", *args.overrides, *extra])
        rows.append(_bench(cfg, args))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if len(rows) > 1:
        first = rows[0]
        print(f"drop path mode vs {first['drop_path_mode']} (ms/step per part; analytic TFLOP/step):")
        parts = [k for k in first if k.startswith("time/")] + ["step_ms"]
        for row in rows:
            cells = ", ".join(f"{k.removeprefix('time/').removesuffix('_ms')} {row[k]:.1f} ({row[k] / first[k]:.2f}x)"
                              for k in parts if first.get(k))
            print(f"  {row['drop_path_mode']:>6}: {cells}; {row['step_tflop']:.4g} TFLOP "
                  f"({row['step_tflop'] / first['step_tflop']:.2f}x)")
    write_result("step", rows, args.out, {"config": base, "overrides": preset + args.overrides,
                                          "drop_path_modes": args.drop_path_mode},
                 device=rows[0]["device"])
    return 0


def _bench(cfg, args: argparse.Namespace) -> dict:
    """One run of ``args.warmup + args.steps`` steps of ``cfg``: its result row (printed too)."""
    import torch

    from poa_hpc.distributed.engines import build_engine
    from poa_hpc.distributed.env import DistContext
    from poa_hpc.models.subnets import SubnetSampler
    from poa_hpc.perf.fake import masked_tokens, synthetic_batch
    from poa_hpc.perf.flops import analytic_step_flops, peak_tflops
    from poa_hpc.perf.timing import StepTimer
    from poa_hpc.train.optim import apply_schedules, build_optimizer
    from poa_hpc.train.trainer import autocast_factory, build_model

    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    ctx = DistContext(device=device)
    model = build_model(cfg).to(device)
    engine = build_engine(cfg.dist, ctx, cfg.train.amp, cfg.optim.clip_grad, cfg.optim.batch_size)
    optimizer = engine.setup(model, lambda named: build_optimizer(named, cfg))
    n_masked = masked_tokens(cfg)
    batch = synthetic_batch(cfg, None, n_masked, device=device, generator=torch.Generator().manual_seed(0))
    sampler = SubnetSampler(model.space, cfg.train.seed, 0, cfg.model.rank_sampling)
    autocast = autocast_factory(cfg.train.amp, device)
    timer = StepTimer(device)
    flops, drawn = 0.0, []
    model.train()
    model.teacher.eval()
    torch.manual_seed(cfg.train.seed)  # the same drop-path draws in every run of the same config
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            timer.collect()
            flops = 0.0
        sub = sampler.sample(step)
        drawn.append(sub)
        apply_schedules(optimizer, 1e-4, 0.04, 1e-4)
        model.forward_backward(batch, sub, cfg.loss.warmup_teacher_temp, ibot=True, backward=engine.backward,
                               autocast=autocast, phase=timer.phase)
        with timer.phase("optimizer"):
            engine.clip_and_step(cfg.optim.clip_grad)
            engine.update_teacher(0.999)
        timer.step_done()
        flops += sum(analytic_step_flops(cfg, sub, n_masked, True).values())
    steps, times = timer.collect()
    step_s = times["time/step_ms"] / 1e3
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak or (peak_tflops(name) if cuda else None)
    row = {"preset": args.preset, "device": name, "drop_path_mode": cfg.model.drop_path_mode, "batch": args.batch,
           "steps": steps, "n_masked": n_masked, "img_per_s": args.batch / step_s, "step_ms": 1e3 * step_s,
           "step_tflop": flops / steps / 1e12, "tflops": flops / steps / step_s / 1e12,
           **{k: v for k, v in times.items() if k != "time/step_ms"}}
    if peak:
        row["mfu"] = row["tflops"] / peak
    largest = max(drawn, key=lambda s: (s.width, s.depth if isinstance(s.depth, int) else sum(s.depth)))
    row["largest_sub"] = str(largest)
    if cuda:
        row["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        row["max_memory_reserved"] = torch.cuda.max_memory_reserved()
    if not args.no_estimate:
        from poa_hpc.perf.memory import estimate_memory

        t0 = time.perf_counter()
        rep = estimate_memory(cfg, 1, engine="none", sub=largest, n_masked=n_masked, target="cuda" if cuda else "cpu")
        row.update({"predicted_peak": rep.peak, "predicted_peak_phase": rep.peak_phase,
                    "estimate_s": time.perf_counter() - t0})
        if cuda:
            row["measured_over_predicted"] = row["max_memory_allocated"] / rep.peak
    print(f"{args.preset} (drop path {cfg.model.drop_path_mode}): batch {args.batch}, {steps} steps on {name}: "
          f"{row['img_per_s']:.1f} img/s, "
          f"{row['step_ms']:.1f} ms/step, {row['tflops']:.2f} TFLOP/s" + (f", MFU {row['mfu']:.3f}" if peak else ""))
    print("  per step: " + ", ".join(f"{k[5:-3]} {v:.1f} ms" for k, v in times.items() if k != "time/step_ms"))
    if cuda:
        print(f"  max_memory_allocated {row['max_memory_allocated'] / 2**30:.2f} GiB"
              + (f", predicted {row['predicted_peak'] / 2**30:.2f} GiB (x{row['measured_over_predicted']:.3f})"
                 if "predicted_peak" in row else ""))
    elif "predicted_peak" in row:
        print(f"  predicted peak (CPU semantics) {row['predicted_peak'] / 2**30:.3f} GiB")
    return row


@register_command("bench step")
class BenchStepCommand:
    """one device's POA step (img/s, MFU, phase times, peak memory vs poa estimate memory)"""

    add_arguments = staticmethod(add_arguments)
    run = staticmethod(run)
