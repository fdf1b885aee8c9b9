"""``poa select``: the best sub-network of a sweep under a budget, and its export.

The candidates are the rows of ``sweep.json`` (``poa eval sweep``, with the ``latency`` protocol for a
latency or throughput budget).  The choice is the most accurate sub-network (``--metric``) within
the budget; it lies on the Pareto front of (budget figure, accuracy): no other sub-network is both
cheaper -- or faster -- and at least as accurate.  Ties in accuracy go to the cheaper one."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from poa_hpc.commands import register_command
from poa_hpc.errors import UsageError

__all__ = ["select_subnet", "budget_of"]

# option -> (column, unit, higher is better)
_BUDGETS = {"max_latency_ms": ("latency_ms_{rt}", "ms", False), "min_throughput": ("throughput_{rt}", "img/s", True),
            "max_gflops": ("gflops", "GFLOPs", False), "max_params": ("params_m", "M params", False)}


def _num(v: Any) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def select_subnet(rows: Sequence[Dict[str, Any]], metric: str, key: str, limit: float,
                  higher_is_better: bool = False) -> Tuple[Optional[int], List[int]]:
    """``(index of the choice or None, indices of the Pareto front sorted by cost)``: the most accurate row
    whose ``key`` is within ``limit`` (``<=``, or ``>=`` with ``higher_is_better``)."""
    from poa_hpc.eval.pareto import pareto_front

    idx = [i for i, r in enumerate(rows) if _num(r.get(metric)) is not None and _num(r.get(key)) is not None]
    cost = [(-1 if higher_is_better else 1) * _num(rows[i][key]) for i in idx]
    front = [idx[j] for j in pareto_front(cost, [_num(rows[i][metric]) for i in idx])]
    ok = [i for i in front if (_num(rows[i][key]) >= limit if higher_is_better else _num(rows[i][key]) <= limit)]
    # along the front accuracy rises with cost: the choice is the last feasible point (the first of equal ones)
    best = None
    for i in ok:
        if best is None or _num(rows[i][metric]) > _num(rows[best][metric]):
            best = i
    return best, front


def budget_of(args: argparse.Namespace, prov: Dict[str, Any]) -> Tuple[str, str, float, str, bool]:
    """(option, column, limit, unit, higher_is_better) of the one budget given."""
    given = [(o, getattr(args, o)) for o in _BUDGETS if getattr(args, o) is not None]
    if len(given) != 1:
        raise UsageError("give one budget: --max-latency-ms, --min-throughput, --max-gflops or --max-params")
    opt, limit = given[0]
    col, unit, higher = _BUDGETS[opt]
    if "{rt}" in col:
        lat = prov.get("latency") or {}
        if not lat:
            raise UsageError(f"--{opt.replace('_', '-')}: the sweep has no measured latency; run poa eval sweep "
                             "RUN --protocols knn,linear,latency first")
        rt = args.runtime or lat["runtimes"][0]
        if rt not in lat["runtimes"]:
            raise UsageError(f"--runtime {rt}: the sweep measured {', '.join(lat['runtimes'])}")
        if args.device and not str(lat.get("device", "")).startswith(args.device):
            raise UsageError(f"--device {args.device}: the sweep's latency was measured on {lat.get('device')}; "
                             f"measure on {args.device} with poa eval sweep --protocols ...,latency --device {args.device}")
        col = col.format(rt=rt)
        unit = f"{unit} ({rt}, {lat.get('device')})"
    return opt, col, float(limit), unit, higher


@register_command("select")
class SelectCommand:
    """Pick the best sub-network of a run's sweep under a latency / throughput / GFLOPs / params budget, and export it.

    Reads <run>/eval/sweep.json (poa eval sweep; with --protocols ...,latency for the latency budgets)."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("run", help="run folder (or training checkpoint) the sweep was made from")
        p.add_argument("--sweep", help="sweep.json (default: <run>/eval/sweep.json)")
        p.add_argument("--max-latency-ms", type=float, help="budget: batch-1 latency at most this (ms)")
        p.add_argument("--min-throughput", type=float, help="budget: throughput at least this (img/s)")
        p.add_argument("--max-gflops", type=float, help="budget: GFLOPs per image at most this")
        p.add_argument("--max-params", type=float, help="budget: parameters at most this (millions)")
        p.add_argument("--metric", default="linear", help="accuracy to maximise: knn, linear (or any *_top1 column)")
        p.add_argument("--runtime", help="for a latency budget: the runtime measured (default: the sweep's first)")
        p.add_argument("--device", help="for a latency budget: the device it must have been measured on (cpu, cuda)")
        p.add_argument("--export", choices=("onnx", "timm", "safetensors"), help="export the choice in this format")
        p.add_argument("-o", "--output", help="export folder")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from poa_hpc.eval.source import run_folder

        path = Path(args.sweep) if args.sweep else run_folder(args.run) / "eval" / "sweep.json"
        if not path.is_file():
            raise UsageError(f"{path}: no sweep; run poa eval sweep {args.run} first (or give --sweep)")
        if args.export and not args.output:
            raise UsageError("--export needs -o FOLDER")
        doc = json.loads(path.read_text())
        rows, prov = doc["rows"], doc.get("provenance", {})
        opt, col, limit, unit, higher = budget_of(args, prov)
        metric = args.metric if args.metric.endswith("_top1") else f"{args.metric}_top1"
        if not any(_num(r.get(metric)) is not None for r in rows):
            raise UsageError(f"--metric {args.metric}: the sweep has no {metric} column "
                             f"(protocols: {', '.join(prov.get('protocols', ['knn', 'linear']))})")
        best, front = select_subnet(rows, metric, col, limit, higher)
        flag = f"--{opt.replace('_', '-')} {limit:g}"
        if best is None:
            have = [r for r in rows if _num(r.get(col)) is not None]
            ext = (max if higher else min)(have, key=lambda r: r[col])
            raise UsageError(f"no sub-network fits {flag}: the {'fastest' if higher else 'smallest'}, {ext['name']}, "
                             f"has {ext[col]:.4g} {unit}")
        print(f"budget {flag} {unit.split(' ', 1)[1] if unit.startswith(('ms ', 'img/s ')) else ''}".rstrip())
        print(f"Pareto front of {metric} vs {col} ({len(front)} of {len(rows)} sub-networks):")
        for i in front:
            r = rows[i]
            ok = (r[col] >= limit) if higher else (r[col] <= limit)
            mark = ">>" if i == best else ("  " if ok else " x")
            print(f" {mark} {r['name']:<22}{r.get('named', ''):<8}{r[col]:>12.4g} {unit.split(' ')[0]:<7}"
                  f"{r[metric]:>8.2f}%  GFLOPs {r['gflops']:.4g}  params {r['params_m']:.3f} M")
        r = rows[best]
        pos = front.index(best)
        nxt = front[pos + 1] if pos + 1 < len(front) else None
        why = (f"chosen: {r['name']} ({metric} {r[metric]:.2f}%, {r[col]:.4g} {unit.split(' ')[0]}): the most "
               f"accurate within the budget")
        if nxt is not None:
            why += (f"; the next on the front, {rows[nxt]['name']} ({rows[nxt][metric]:.2f}%), needs "
                    f"{rows[nxt][col]:.4g}")
        print(why)
        if args.export:
            print(export_choice(args.run, r["name"], args.export, Path(args.output), prov))
        return 0


def export_choice(run: str, name: str, fmt: str, out: Path, prov: Dict[str, Any]) -> str:
    """Extract sub-network ``name`` (``<family>_<WxD>``) of ``run``'s teacher and write it as ``fmt``."""
    from poa_hpc.config import to_dict
    from poa_hpc.models.extract import export_timm, extract_state_dict, save_subnet
    from poa_hpc.models.registry import get_backbone
    from poa_hpc.models.subnets import Subnet
    from poa_hpc.train.load import load_teacher

    cfg, backbone, step = load_teacher(run, "teacher")
    family, text = name.split("_", 1)
    sub = Subnet.parse(text)
    arch, state = extract_state_dict(backbone, sub)
    stem = out / name
    size = (prov.get("dataset") or {}).get("image_size") or getattr(arch, "img_size", None)
    if fmt == "safetensors":
        return str(save_subnet(stem.with_suffix(".safetensors"), family, arch, state, width=sub.width,
                               depth=sub.depth, step=step, source=f"{run}:teacher", config=to_dict(cfg)))
    if fmt == "timm":
        try:
            w, info = export_timm(stem, family, arch, state, img_size=size, run=str(run), step=step,
                                  width=sub.width, depth=sub.depth)
        except (NotImplementedError, ValueError) as exc:
            raise UsageError(f"--export timm: {exc}") from None
        return f"{w}  {info}"
    from poa_hpc.models.onnx_export import export_onnx

    dense = get_backbone(family).build_dense(arch)
    dense.load_state_dict(state)
    diff = export_onnx(dense, size, stem.with_suffix(".onnx"))
    return f"{stem.with_suffix('.onnx')}  (input {size} px, onnxruntime vs PyTorch max abs diff {diff:.2e})"
