"""``poa estimate flops|memory|comm``: what a POA step costs, computed without a GPU.

    poa estimate flops  --config configs/vit_l_poa.yaml [--sub 384x12] [--world-size 32] [--mfu 0.3 0.4 0.5]
    poa estimate memory --config configs/vit_l_poa.yaml --world-size 32 [--engine fsdp|deepspeed] [--sub WxD]
    poa estimate comm   --config configs/vit_l_poa.yaml [--link-gbps 200] [--world-sizes 8 16 ... 512]

Each prints a table and writes JSON under ``benchmarks/results/`` (device, versions, commit).
Every number is a prediction from shapes (FLOPs, bytes), labelled as such.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from poa_hpc.bench.common import write_result
from poa_hpc.config import POAConfig, load_config
from poa_hpc.errors import ConfigError
from poa_hpc.models.subnets import Subnet

__all__ = ["estimate"]

# The paper's ViT-L run (Table 20): 32 A100, global batch 1600, 346 epochs x 800 iterations, 2752 GPU-hours.
PAPER = {"gpus": 32, "steps": 276_800, "device": "A100", "gpu_hours": 2752}


def _config(args) -> POAConfig:
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "batch", None):
        cfg.optim.batch_size = args.batch
    return cfg


def _sub(text: Optional[str], cfg: POAConfig) -> Optional[Subnet]:
    if text is None:
        return None
    from poa_hpc.models.registry import get_backbone

    spec = get_backbone(cfg.model.arch)
    named = spec.named_sizes(cfg.model.section)
    try:
        sub = named[text] if text in named else Subnet.parse(text)
        return spec.space(cfg.model.section).check(sub)
    except ValueError as exc:
        raise ConfigError(f"--sub: {exc}") from None


def _peak(text: str) -> tuple:
    from poa_hpc.perf.flops import PEAK_TFLOPS, peak_tflops

    try:
        return f"{float(text):g} TFLOP/s", float(text)
    except ValueError:
        value = peak_tflops(text)
        if value is None:
            raise ConfigError(f"--peak: {text!r} is neither a number (TFLOP/s) nor one of {list(PEAK_TFLOPS)}") from None
        return text, value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (configs/vit_l_poa.yaml)")
    p.add_argument("--batch", type=int, help="images per rank (default: optim.batch_size)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.batch_size=64")


# ---------------------------------------------------------------------------- flops
def estimate_flops(argv: List[str]) -> int:
    from poa_hpc.models.registry import get_backbone
    from poa_hpc.perf.fake import masked_tokens
    from poa_hpc.perf.flops import analytic_step_flops, count_step, expected_step, gpu_hours

    p = argparse.ArgumentParser(prog="poa estimate flops", description="FLOPs of one POA step per rank, counted "
                                "with FlopCounterMode on meta tensors; eq. 14 expectation; GPU-hours at an MFU.")
    _common(p)
    p.add_argument("--sub", help="elastic sub-network of the table, WxD or a named size (default: the smallest)")
    p.add_argument("--world-size", type=int, default=PAPER["gpus"], help="ranks for per_rank sampling (default 32)")
    p.add_argument("--masked", type=int, help="masked patches per rank (default: the mean of DINOv2's plan)")
    p.add_argument("--no-ibot", action="store_true", help="a step before iBOT starts")
    p.add_argument("--no-expectation", action="store_true", help="skip the eq. 14 expectation (one count only)")
    p.add_argument("--peak", default=PAPER["device"], help="device name (A100, H100, H200) or TFLOP/s")
    p.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.4, 0.5], help="MFUs for the time estimates")
    p.add_argument("--gpus", type=int, default=PAPER["gpus"], help="GPUs of the run for the GPU-hours")
    p.add_argument("--steps", type=int, help="steps of the run (default: optim.epochs x iterations per epoch)")
    args = p.parse_args(argv)
    if args.world_size < 1 or args.gpus < 1:
        raise ConfigError("--world-size and --gpus must be >= 1")
    if any(not 0 < m <= 1 for m in args.mfu):
        raise ConfigError(f"--mfu: {args.mfu} must be in (0, 1]")
    cfg = _config(args)
    sub = _sub(args.sub, cfg)
    peak_name, peak = _peak(args.peak)
    spec, arch = get_backbone(cfg.model.arch), cfg.model.section
    space = spec.space(arch)
    sub = sub or type(space.intact)(space.widths[0], space.depths[0])
    ibot = not args.no_ibot
    M = args.masked if args.masked is not None else masked_tokens(cfg)
    B = cfg.optim.batch_size
    t0 = time.perf_counter()
    say = (lambda s: print(f"  ... {s}", file=sys.stderr, flush=True))
    if args.no_expectation:
        sf = count_step(cfg, sub, n_masked=M, ibot=ibot)
        exp = None
    else:
        exp = expected_step(cfg, args.world_size, n_masked=M, ibot=ibot, progress=say)
        sf = exp["base"] if exp["base"].sub == sub else count_step(cfg, sub, n_masked=M, ibot=ibot)
    an = analytic_step_flops(cfg, sub, M, ibot)
    step = sf.step
    names = {"teacher/backbone": "teacher backbone fwd (global crops)", "teacher/heads": "teacher heads fwd",
             "teacher/sinkhorn": "teacher Sinkhorn-Knopp (all passes)",
             "intact/backbone": "intact backbone fwd+bwd (all crops)",
             "intact/heads_losses": "intact heads + losses fwd+bwd",
             "elastic/backbone": f"elastic {sub} backbone fwd+bwd", "elastic/heads_losses": "elastic heads + losses fwd+bwd",
             "optimizer/clip_adamw": "grad clip + AdamW", "ema/update": "teacher EMA"}
    print(f"POA step on one rank, counted with FlopCounterMode on meta tensors ({cfg.model.arch}, batch {B}/rank: "
          f"{2 * B} global + {cfg.data.n_local * B} local crops, {M if ibot else 0} masked patches, "
          f"{len(cfg.head.prototypes)} heads of {', '.join(map(str, cfg.head.prototypes))} prototypes)")
    print(f"{'part':<42}{'TFLOP':>10}{'share':>8}{'analytic':>10}{'G elem-ops':>12}")
    rows = []
    for r in sf.rows():
        share = r["matmul_flops"] / step if step else 0.0
        a = an.get(r["part"])
        print(f"{names.get(r['part'], r['part']):<42}{r['matmul_flops'] / 1e12:>10.3f}{100 * share:>7.1f}%"
              f"{(a / 1e12 if a is not None else 0.0):>10.3f}{r['elementwise_ops'] / 1e9:>12.1f}")
        rows.append({**r, "label": names.get(r["part"], r["part"]), "analytic_matmul_flops": a})
    print(f"{'step (matmul FLOPs, what MFU counts)':<42}{step / 1e12:>10.3f}{'':>8}{sum(an.values()) / 1e12:>10.3f}"
          f"{sf.total('elementwise') / 1e9:>12.1f}")
    extra = {"config": args.config, "overrides": args.overrides, "sub": str(sub), "batch_per_rank": B,
             "n_masked": M if ibot else 0, "ibot": ibot, "step_matmul_flops": step, "peak_tflops": peak,
             "peak_device": peak_name, "counted_with": "torch.utils.flop_counter.FlopCounterMode on meta tensors",
             "attention_kernel": "flash (backward counted as 5 matmuls: the scores are recomputed)"}
    if exp is not None:
        n = len(space.probabilities())
        mean, crit = exp["step_mean"], exp["step_critical"]
        print(f"\nUnder eq. 14 ({n} elastic sub-networks; elastic branch counted per width at the smallest and largest "
              f"depth, interpolated in depth): elastic branch {exp['elastic_mean'] / 1e12:.2f} TFLOP on average, "
              f"step {mean / 1e12:.2f} TFLOP per rank on average.")
        if exp["ranks"] > 1:
            print(f"model.rank_sampling=per_rank over {exp['ranks']} ranks: every step waits for the largest elastic "
                  f"sub-network drawn, E[max] = {exp['elastic_expected_max'] / 1e12:.2f} TFLOP, so the step's critical "
                  f"path is {crit / 1e12:.2f} TFLOP and the average rank works {100 * mean / crit:.0f}% of it.")
        extra.update({"elastic_mean_flops": exp["elastic_mean"], "elastic_expected_max_flops": exp["elastic_expected_max"],
                      "step_mean_flops": mean, "step_critical_flops": crit, "ranks": exp["ranks"],
                      "elastic_flops": {str(k): v for k, v in exp["elastic"].items()}})
        # The run: steps before iBOT starts lack the masked-patch rows (heads, Sinkhorn-Knopp, losses).
        per_epoch = cfg.optim.iters_per_epoch or 0
        steps = args.steps or (cfg.optim.epochs * per_epoch if per_epoch else 0)
        if steps:
            no_ibot_steps = min(steps, cfg.loss.ibot_start_epoch * per_epoch) if per_epoch else 0
            delta = sum(analytic_step_flops(cfg, sub, M, True).values()) - sum(
                analytic_step_flops(cfg, sub, M, False).values())
            total = steps * crit - no_ibot_steps * delta
            print(f"\nThe run: {steps:,} steps ({no_ibot_steps:,} before iBOT starts) on {args.gpus} GPUs of "
                  f"{peak_name} ({peak:g} TFLOP/s dense bf16): {total / 1e18:.1f} EFLOP per GPU on the critical path.")
            print(f"{'MFU':>6}{'s/step':>9}{'img/s/GPU':>11}{'GPU-hours':>11}")
            runs = []
            for m in args.mfu:
                t = crit / (m * peak * 1e12)
                gh = gpu_hours(total / steps, steps, args.gpus, peak, m)
                print(f"{m:>6.2f}{t:>9.3f}{B / t:>11.1f}{gh:>11,.0f}")
                runs.append({"mfu": m, "step_s": t, "img_per_s_per_gpu": B / t, "gpu_hours": gh})
            if (steps, args.gpus, peak_name) == (PAPER["steps"], PAPER["gpus"], PAPER["device"]):
                implied = total * args.gpus / (PAPER["gpu_hours"] * 3600 * peak * 1e12)
                print(f"The paper's {PAPER['gpu_hours']} GPU-hours for this run imply an MFU of {implied:.2f} "
                      f"(on the critical path; {implied * mean / crit:.2f} counting the average rank's FLOPs).")
                extra["paper_implied_mfu"] = implied
            extra.update({"steps": steps, "steps_before_ibot": no_ibot_steps, "gpus": args.gpus,
                          "run_flops_per_gpu": total, "at_mfu": runs})
    print(f"({time.perf_counter() - t0:.0f} s)")
    write_result("flops", rows, args.out, extra, device="none (meta tensors)")
    return 0


# ---------------------------------------------------------------------------- entry
def estimate(what: str, argv: List[str]) -> int:
    if what == "flops":
        return estimate_flops(argv)
    if what == "memory":
        from poa_hpc.perf.memory import estimate_memory_cli

        return estimate_memory_cli(argv)
    if what == "comm":
        from poa_hpc.perf.comm import estimate_comm_cli

        return estimate_comm_cli(argv)
    raise ConfigError(f"poa estimate: unknown {what!r}, expected flops, memory or comm")
