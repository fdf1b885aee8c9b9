"""The sweep's figure: accuracy against GFLOPs, one point per sub-network, the Pareto front, named
sizes labelled and optional reference points (e.g. the paper's numbers) as a second series.

matplotlib is an optional dependency (``pip install 'poa_hpc[plot]'``); it is imported when a plot
is drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from poa_hpc.eval.pareto import pareto_front
from poa_hpc.models.subnets import depth_str

__all__ = ["read_reference", "plot_sweep", "METRICS"]

#: (row attribute, panel title, accepted spellings of the reference CSV's ``metric`` column)
METRICS = (("knn_top1", "weighted k-NN", ("knn", "k-nn")), ("linear_top1", "linear probe", ("linear", "lin")))


def read_reference(path: str | Path) -> List[Dict[str, Any]]:
    """Reference points from a CSV with columns ``name,gflops,accuracy[,metric]`` (``metric``: ``knn``
    or ``linear``; empty or absent: drawn on every panel).  Lines starting with ``#`` are comments.
    Raises ``ValueError`` (one line, naming the file and the row) on anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reference file '{path}' does not exist or is not a file")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    missing = [c for c in ("name", "gflops", "accuracy") if c not in cols]
    if missing:
        raise ValueError(f"reference file '{path}': missing column(s) {missing}; expected name,gflops,accuracy[,metric]")
    out = []
    for n, raw in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
        metric = row.get("metric", "").lower()
        known = {m for _, _, names in METRICS for m in names}
        if metric and metric not in known:
            raise ValueError(f"reference file '{path}', data row {n - 1}: metric {row['metric']!r}; expected knn or linear")
        try:
            gflops, acc = float(row["gflops"]), float(row["accuracy"])
        except ValueError:
            raise ValueError(f"reference file '{path}', data row {n - 1}: gflops and accuracy must be numbers "
                             f"(got {row['gflops']!r}, {row['accuracy']!r})") from None
        if not (gflops > 0 and math.isfinite(acc)):
            raise ValueError(f"reference file '{path}', data row {n - 1}: gflops must be > 0 and accuracy finite")
        out.append({"name": row["name"], "gflops": gflops, "accuracy": acc, "metric": metric})
    if not out:
        raise ValueError(f"reference file '{path}' has no data rows")
    return out


_BOX = dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75)


def _metric_of(row: Dict[str, Any]) -> Optional[str]:
    for attr, _, names in METRICS:
        if row["metric"] in names:
            return attr
    return None


def _val(r: Any, key: str) -> Optional[float]:
    v = r.get(key) if hasattr(r, "get") else getattr(r, key, None)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def plot_sweep(rows: Sequence[Any], path: str | Path, *, title: str = "",
               reference: Optional[List[Dict[str, Any]]] = None, reference_label: str = "reference",
               img_size: Optional[int] = None, knn: Optional[Dict[str, Any]] = None,
               metrics: Optional[Sequence[Any]] = None, x_axes: Sequence[str] = ("gflops",),
               cost_labels: Optional[Dict[str, str]] = None) -> Path:
    """One panel per metric present in ``rows`` (``metrics``: protocol :class:`~poa_hpc.eval.protocols.Metric`
    objects, default k-NN and linear) and per x-axis (``x_axes``: ``gflops``, ``params_m`` or a measured
    cost column such as ``latency_ms_eager`` or ``throughput_eager``; one row of panels each): every
    sub-network as a point coloured by width, the Pareto front (lower cost -- higher throughput --
    and higher accuracy) as a step line, the named sizes labelled (or, where the space has none, the
    smallest and the largest sub-network), and ``reference`` points (on the GFLOPs axis) as a second
    series.  Log-scaled x when it spans 10x or more."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    mets = [(m.key, m.label) for m in metrics] if metrics is not None else [(a, lab) for a, lab, _ in METRICS]
    panels = [(attr, label) for attr, label in mets if any(_val(r, attr) is not None for r in rows)]
    if not panels:
        raise ValueError("plot_sweep: no accuracy to plot")
    xs = [x for x in x_axes if any(_val(r, x) is not None for r in rows)] or ["gflops"]
    fig, axes = plt.subplots(len(xs), len(panels), figsize=(6.4 * len(panels), 5.2 * len(xs)), squeeze=False)
    widths = [r.width for r in rows]
    norm = matplotlib.colors.Normalize(min(widths), max(widths) if max(widths) > min(widths) else min(widths) + 1)
    cmap = plt.get_cmap("viridis")
    labelled = [i for i, r in enumerate(rows) if r.named]
    if not labelled:
        order = sorted(range(len(rows)), key=lambda i: rows[i].gflops)
        labelled = sorted({order[0], order[-1]})
    for xi, xkey in enumerate(xs):
        higher = xkey.startswith("throughput")
        refs_all = (reference or []) if xkey == "gflops" else []
        all_x = [v for v in (_val(r, xkey) for r in rows) if v is not None] + [p["gflops"] for p in refs_all]
        log_x = max(all_x) / min(all_x) >= 10 if min(all_x) > 0 else False
        for ax, (attr, label) in zip(axes[xi], panels):
            idx = [i for i, r in enumerate(rows) if _val(r, attr) is not None and _val(r, xkey) is not None]
            x = [_val(rows[i], xkey) for i in idx]
            y = [_val(rows[i], attr) for i in idx]
            sc = ax.scatter(x, y, c=[rows[i].width for i in idx], cmap=cmap, norm=norm, s=36, alpha=0.85,
                            edgecolors="none", zorder=3, label=f"sub-networks ({len(idx)})")
            front = [idx[j] for j in pareto_front([-v if higher else v for v in x], y)]
            fx = [_val(rows[i], xkey) for i in front]
            fy = [_val(rows[i], attr) for i in front]
            ax.step(fx, fy, where="pre" if higher else "post", color="crimson", lw=1.6, zorder=2,
                    label=f"Pareto front ({len(front)})")
            ax.scatter(fx, fy, s=70, facecolors="none", edgecolors="crimson", lw=1.2, zorder=4)
            right = _right_half(all_x, log_x)
            upper = _right_half(y + [p["accuracy"] for p in refs_all], False)
            for i in labelled:
                if i in idx:
                    r = rows[i]
                    px, py = _val(r, xkey), _val(r, attr)
                    text = f"{r.named} ({r.width}x{depth_str(r.depth)})" if r.named else f"{r.width}x{depth_str(r.depth)}"
                    flip = right(px)  # labels of points in the right half go to their left, inside the axes
                    ax.scatter([px], [py], s=120, facecolors="none", edgecolors="black", lw=1.4, zorder=5)
                    up = upper(py)  # ...and those in the upper half below them
                    ax.annotate(text, (px, py), xytext=(-14 if flip else 14, -22 if up else 22),
                                textcoords="offset points", ha="right" if flip else "left",
                                va="top" if up else "bottom", fontsize=9,
                                fontweight="bold" if r.named else "normal", zorder=7, bbox=_BOX,
                                arrowprops=dict(arrowstyle="-", lw=0.7, color="0.25", shrinkB=6))
            refs = [p for p in refs_all if _metric_of(p) in (None, attr)]
            if refs:
                ax.scatter([p["gflops"] for p in refs], [p["accuracy"] for p in refs], marker="*", s=180,
                           color="darkorange", edgecolors="black", lw=0.6, zorder=6, label=reference_label)
                for p in refs:
                    flip = right(p["gflops"])
                    ax.annotate(p["name"], (p["gflops"], p["accuracy"]), xytext=(-10 if flip else 10, 0),
                                textcoords="offset points", ha="right" if flip else "left", va="center", fontsize=9,
                                color="darkorange", fontweight="bold", zorder=7, bbox=_BOX)
            if log_x:
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            if xkey == "gflops":
                ax.set_xlabel(f"GFLOPs per image{f' at {img_size} px' if img_size else ''} (multiply-accumulates)")
            elif xkey == "params_m":
                ax.set_xlabel("parameters (M)")
            else:
                ax.set_xlabel((cost_labels or {}).get(xkey, xkey) + (" (measured)"))
            ax.set_ylabel(f"{label} top-1 (%)")
            sub = f" (k={knn['k']}, T={knn['temperature']:g})" if attr == "knn_top1" and knn else ""
            ax.set_title(label + sub)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(loc="lower left" if higher else "lower right", fontsize=9)
            distinct = sorted(set(widths))
            fig.colorbar(sc, ax=ax, label="width", pad=0.01, ticks=distinct if len(distinct) <= 12 else None)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _right_half(values: Sequence[float], log_x: bool):
    """``v -> True`` for v in the upper half of the range of ``values`` (on a log scale if ``log_x``)."""
    f = math.log if log_x else float
    lo, hi = f(min(values)), f(max(values))
    return lambda x: hi > lo and f(x) > (lo + hi) / 2
