"""``poa estimate flops|memory|comm`` and ``poa profile``: what a POA step costs, computed without a GPU.

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
from typing import Dict, Optional

from poa_hpc.commands import register_command
from poa_hpc.config import POAConfig, load_config
from poa_hpc.distributed.registry import engine_names, get_engine
from poa_hpc.errors import ConfigError
from poa_hpc.models.subnets import Subnet
from poa_hpc.results import write_result

__all__ = ["add_common_arguments", "config_of", "subnet_arg", "peak_arg"]

# The paper's ViT-L run (Table 20): 32 A100, global batch 1600, 346 epochs x 800 iterations, 2752 GPU-hours.
PAPER = {"gpus": 32, "steps": 276_800, "device": "A100", "gpu_hours": 2752}


def config_of(args) -> POAConfig:
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "batch", None):
        cfg.optim.batch_size = args.batch
    return cfg


def subnet_arg(text: Optional[str], cfg: POAConfig) -> Optional[Subnet]:
    if text is None:
        return None
    from poa_hpc.models.registry import get_backbone

    spec = get_backbone(cfg.model.arch)
    try:
        subs = spec.space(cfg.model.section).resolve(text, spec.named_sizes(cfg.model.section))
    except ValueError as exc:
        raise ConfigError(f"--sub: {exc}") from None
    if len(subs) != 1:
        raise ConfigError(f"--sub {text!r}: expected one sub-network")
    return subs[0]


def peak_arg(text: str) -> tuple:
    from poa_hpc.perf.flops import PEAK_TFLOPS, peak_tflops

    try:
        return f"{float(text):g} TFLOP/s", float(text)
    except ValueError:
        value = peak_tflops(text)
        if value is None:
            raise ConfigError(f"--peak: {text!r} is neither a number (TFLOP/s) nor one of {list(PEAK_TFLOPS)}") from None
        return text, value


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (configs/vit_l_poa.yaml)")
    p.add_argument("--batch", type=int, help="images per rank (default: optim.batch_size)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.batch_size=64")


# ---------------------------------------------------------------------------- flops
def add_flops_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--sub", help="elastic sub-network of the table, WxD or a named size (default: the smallest)")
    p.add_argument("--world-size", type=int, default=PAPER["gpus"], help="ranks for per_rank sampling (default 32)")
    p.add_argument("--masked", type=int, help="masked patches per rank (default: the mean of DINOv2's plan)")
    p.add_argument("--no-ibot", action="store_true", help="a step before iBOT starts")
    p.add_argument("--no-expectation", action="store_true", help="skip the eq. 14 expectation (one count only)")
    p.add_argument("--peak", default=PAPER["device"], help="device name (A100, H100, H200) or TFLOP/s")
    p.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.4, 0.5], help="MFUs for the time estimates")
    p.add_argument("--gpus", type=int, default=PAPER["gpus"], help="GPUs of the run for the GPU-hours")
    p.add_argument("--steps", type=int, help="steps of the run (default: optim.epochs x iterations per epoch)")


def estimate_flops(args: argparse.Namespace) -> int:
    from poa_hpc.models.registry import get_backbone
    from poa_hpc.perf.fake import masked_tokens
    from poa_hpc.perf.flops import analytic_step_flops, count_step, expected_step, gpu_hours

    if args.world_size < 1 or args.gpus < 1:
        raise ConfigError("--world-size and --gpus must be >= 1")
    if any(not 0 < m <= 1 for m in args.mfu):
        raise ConfigError(f"--mfu: {args.mfu} must be in (0, 1]")
    cfg = config_of(args)
    sub = subnet_arg(args.sub, cfg)
    peak_name, peak = peak_arg(args.peak)
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
          f"{len(cfg.head.prototypes)} heads of {', '.join(map(str, cfg.head.prototypes))} prototypes, "
          f"students' stochastic depth: {cfg.model.drop_path_mode} at rate {cfg.model.section.drop_path_rate})")
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


# ---------------------------------------------------------------------------- memory
def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--engine", choices=[n for n in engine_names() if get_engine(n).memory],
                   help="default: fsdp (none for world size 1)")
    p.add_argument("--sub", help="elastic sub-network WxD or a named size (default: the largest eq. 14 draws)")
    p.add_argument("--masked", type=int, help="masked patches on this rank (default: mean + 4 sigma of DINOv2's plan)")
    p.add_argument("--target", choices=("cuda", "cpu"), default="cuda", help="device semantics (default: cuda)")
    p.add_argument("--no-ibot", action="store_true", help="a step before iBOT starts")


def estimate_memory_cmd(args: argparse.Namespace) -> int:
    from poa_hpc.perf.memory import estimate_memory

    cfg = config_of(args)
    sub = subnet_arg(args.sub, cfg)
    t0 = time.perf_counter()
    rep = estimate_memory(cfg, args.world_size, engine=args.engine, sub=sub, n_masked=args.masked,
                          target=args.target, ibot=not args.no_ibot)
    i = rep.info
    print(f"Predicted peak memory per rank ({i['target']} semantics; a prediction on fake tensors): {cfg.model.arch}, "
          f"{i['engine']} on {i['world_size']} ranks, batch {i['batch_per_rank']}/rank, elastic {i['sub']}, "
          f"{i['n_masked']} masked patches, {'bf16' if i['bf16'] else 'fp32'}, attention: {i['attention_kernel']}, "
          f"activation checkpointing {'on' if i['activation_checkpointing'] else 'off'}")
    print(rep.table())
    print(f"peak in: {rep.peak_phase}  ({time.perf_counter() - t0:.0f} s)")
    write_result("memory", [{"part": k, "bytes": v} for k, v in rep.breakdown.items()], args.out,
                 {"config": args.config, "overrides": args.overrides, **rep.to_dict()},
                 device=f"none (fake tensors, {args.target} semantics)")
    return 0


# ---------------------------------------------------------------------------- comm
def add_comm_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--engine", choices=[n for n in engine_names() if get_engine(n).distributed and get_engine(n).comm],
                   default="fsdp")
    p.add_argument("--world-size", type=int, default=32, help="world size of the per-phase table (default 32)")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--link-gbps", type=float, default=200.0, help="link bandwidth per GPU, Gb/s (200: HDR InfiniBand)")
    p.add_argument("--hop-latency-us", type=float, default=5.0, help="latency per ring hop and collective, us")
    p.add_argument("--peak", default="H100", help="device name or TFLOP/s for the compute time")
    p.add_argument("--mfu", type=float, default=0.4, help="MFU of the compute time")
    p.add_argument("--masked", type=int, help="masked patches per rank (default: the mean of DINOv2's plan)")


def estimate_comm_cmd(args: argparse.Namespace) -> int:
    from collections import defaultdict

    from poa_hpc.models.registry import get_backbone
    from poa_hpc.perf.comm import per_rank_bytes, scaling_table, step_collectives
    from poa_hpc.perf.flops import expected_max, expected_step
    if args.link_gbps <= 0 or not 0 < args.mfu <= 1 or args.world_size < 2 or min(args.world_sizes) < 2:
        raise ConfigError("--link-gbps must be > 0, --mfu in (0, 1], world sizes >= 2")
    cfg = config_of(args)
    peak_name, peak = peak_arg(args.peak)
    t0 = time.perf_counter()
    say = (lambda s: None)
    calls = step_collectives(cfg, args.world_size, args.engine, n_masked=args.masked)
    N = args.world_size
    by = per_rank_bytes(calls, N)
    counts: Dict[str, int] = defaultdict(int)
    for c in calls:
        counts[f"{c.phase}/{c.kind}"] += 1
    print(f"Communication per step and rank (predicted from the collectives of a fake step): {cfg.model.arch}, "
          f"{args.engine}, {N} ranks, ring algorithms")
    print(f"{'part / collective':<44}{'calls':>7}{'MB sent':>11}")
    for k in sorted(by):
        print(f"{k:<44}{counts[k]:>7}{by[k] / 1e6:>11.1f}")
    total = sum(by.values())
    print(f"{'step':<44}{len(calls):>7}{total / 1e6:>11.1f}")
    space = get_backbone(cfg.model.arch).space(cfg.model.section)
    exp = expected_step(cfg, 1, n_masked=args.masked, progress=say)
    probs = space.probabilities()
    ranks = (lambda n: n if cfg.model.rank_sampling == "per_rank" else 1)
    compute = {n: (exp["fixed"] + expected_max(exp["elastic"], probs, ranks(n))) / (args.mfu * peak * 1e12)
               for n in args.world_sizes}
    rows = scaling_table(calls, compute, args.link_gbps, args.hop_latency_us, cfg.optim.batch_size)
    print(f"\nStep-time floor per world size: {args.link_gbps:g} Gb/s per GPU, {args.hop_latency_us:g} us per ring hop; "
          f"compute = critical-path FLOPs at MFU {args.mfu:g} of {peak_name} ({peak:g} TFLOP/s)")
    print(f"{'GPUs':>6}{'GB/rank':>9}{'comm s':>9}{'compute s':>11}{'step s (overlap)':>18}{'(serial)':>10}"
          f"{'img/s':>10}{'efficiency':>12}")
    for r in rows:
        print(f"{r['world_size']:>6}{r['comm_bytes_per_rank'] / 1e9:>9.2f}{r['comm_s']:>9.3f}{r['compute_s']:>11.3f}"
              f"{r['step_s_overlap']:>18.3f}{r['step_s_serial']:>10.3f}{r['img_per_s']:>10.0f}"
              f"{100 * r['efficiency']:>11.0f}%")
    print(f"({time.perf_counter() - t0:.0f} s)")
    write_result("comm", rows, args.out, {
        "config": args.config, "overrides": args.overrides, "engine": args.engine, "world_size": N,
        "per_rank_bytes": by, "calls": dict(counts), "link_gbps": args.link_gbps,
        "hop_latency_us": args.hop_latency_us, "mfu": args.mfu, "peak_tflops": peak},
        device="none (fake tensors)")
    return 0


# ---------------------------------------------------------------------------- commands
@register_command("estimate flops")
class EstimateFlopsCommand:
    """flops: FLOPs per part, eq. 14 expectation, GPU-hours at an MFU

    FLOPs of one POA step per rank, counted with FlopCounterMode on meta tensors; eq. 14 expectation;
    GPU-hours at an MFU."""

    add_arguments = staticmethod(add_flops_arguments)
    run = staticmethod(estimate_flops)


@register_command("estimate memory")
class EstimateMemoryCommand:
    """memory: peak device memory per rank (fake tensors, fake process group)

    Peak device memory per rank of one POA step (fake tensors, fake process group, the real engine), with
    its breakdown."""

    add_arguments = staticmethod(add_memory_arguments)
    run = staticmethod(estimate_memory_cmd)


@register_command("estimate comm")
class EstimateCommCommand:
    """comm: bytes per rank and engine, scaling floor

    Communication per step and rank (from the collectives of a fake step) and the step-time floor per
    world size."""

    add_arguments = staticmethod(add_comm_arguments)
    run = staticmethod(estimate_comm_cmd)


@register_command("profile")
class ProfileCommand:
    """a few steps under torch.profiler: Chrome trace, memory snapshot (CUDA), top operators, per-phase times"""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        from poa_hpc.perf.profile import add_arguments

        add_arguments(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from poa_hpc.perf.profile import profile

        return profile(args)
