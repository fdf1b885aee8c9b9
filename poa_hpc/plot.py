"""``poa plot RUN``: the training curves of a run folder in one figure, ``RUN/plots/training.png`` (and .svg).

Read from ``RUN/metrics.jsonl`` (every logged step), ``RUN/config.yaml`` (the heads' K for ln K) and
``RUN/attempts.jsonl`` (where each requeue/restart resumed, drawn as dashed vertical lines).  Panels:
the loss and its terms; lr and weight decay; the teacher's EMA momentum and temperature; smoothed img/s
and MFU (MFU on GPUs); the collapse watchdog's teacher/student entropies per head against ln K; the
in-run k-NN top-1 per sub-network (``train.eval_every``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from poa_hpc.commands import register_command
from poa_hpc.errors import DataError, OutputWriteError, UsageError

__all__ = ["read_metrics", "resume_steps", "plot_run", "PlotCommand"]


def read_metrics(run: Path) -> List[Dict[str, float]]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"'{run}' is not a run folder: {path} does not exist")
    rows = []
    for ln in path.read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except ValueError:  # a line torn by a kill
            continue
    if not rows:
        raise DataError(f"{path} holds no logged step yet")
    return rows


def resume_steps(run: Path) -> List[int]:
    """Steps at which a later attempt (requeue, restart) resumed the run."""
    path = Path(run) / "attempts.jsonl"
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            a = json.loads(ln)
        except ValueError:
            continue
        if a.get("resumed") and a.get("start_step", 0) > 0:
            out.append(int(a["start_step"]))
    return sorted(set(out))


def _prototypes(run: Path) -> List[int]:
    try:
        import yaml

        return list(yaml.safe_load((Path(run) / "config.yaml").read_text())["head"]["prototypes"])
    except Exception:
        return []


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(float(r[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run: Path, out: Optional[Path] = None) -> List[Path]:
    """Write ``training.png`` and ``training.svg`` (default folder: ``RUN/plots``); returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("poa plot needs matplotlib: pip install 'poa_hpc[plot]'") from None
    run = Path(run)
    rows = read_metrics(run)
    resumes = resume_steps(run)
    ks = _prototypes(run)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), sharex=True)
    ax = axes.ravel()

    terms = sorted({k for r in rows for k in r if k.startswith(("intact/", "elastic/"))})
    ax[0].plot(*_series(rows, "loss"), color="black", lw=1.6, label="loss")
    for k in terms:
        ax[0].plot(*_series(rows, k), lw=0.9, label=k)
    ax[0].set_title("loss and its terms")
    ax[0].legend(fontsize=7, ncol=2)

    ax[1].plot(*_series(rows, "lr"), color="tab:blue", label="lr")
    ax[1].set_ylabel("lr", color="tab:blue")
    twin = ax[1].twinx()
    twin.plot(*_series(rows, "wd"), color="tab:orange", label="weight decay")
    twin.set_ylabel("weight decay", color="tab:orange")
    ax[1].set_title("learning rate and weight decay")

    ax[2].plot(*_series(rows, "momentum"), color="tab:green")
    ax[2].set_ylabel("teacher EMA momentum", color="tab:green")
    twin = ax[2].twinx()
    twin.plot(*_series(rows, "teacher_temp"), color="tab:red")
    twin.set_ylabel("teacher temperature", color="tab:red")
    ax[2].set_title("teacher momentum and temperature")
    ax[2].ticklabel_format(axis="y", useOffset=False)
    twin.ticklabel_format(axis="y", useOffset=False)

    ax[3].plot(*_series(rows, "img_per_s"), color="tab:purple")
    ax[3].set_ylabel("img/s (smoothed, all ranks)", color="tab:purple")
    steps, mfu = _series(rows, "mfu")
    if mfu:
        twin = ax[3].twinx()
        twin.plot(steps, [100 * m for m in mfu], color="tab:gray")
        twin.set_ylabel("MFU (%)", color="tab:gray")
        ax[3].set_title("throughput and MFU")
    else:
        ax[3].set_title("throughput (no MFU: not on a GPU with a known peak)")

    for h, k in enumerate(ks):
        color = f"C{h}"
        ax[4].plot(*_series(rows, f"collapse/teacher_entropy_h{h}"), color=color, lw=1.2, label=f"teacher, K={k}")
        ax[4].plot(*_series(rows, f"collapse/student_entropy_h{h}"), color=color, lw=1.0, ls=":",
                   label=f"student, K={k}")
        ax[4].axhline(math.log(k), color=color, lw=0.8, ls="--")
        ax[4].annotate(f"ln {k}", (rows[0]["step"], math.log(k)), fontsize=7, color=color, va="bottom", ha="left")
    if ks:
        lo, hi = ax[4].get_ylim()
        ax[4].set_ylim(lo, max(hi, math.log(max(ks)) + 0.2))
    ax[4].set_title("collapse watchdog: entropies of the [CLS] targets vs ln K")
    ax[4].set_ylabel("entropy (nats)")
    ax[4].legend(fontsize=7, loc="lower right")

    knn = sorted({k for r in rows for k in r if k.startswith("knn/")},
                 key=lambda k: [int(x) if x.isdigit() else x for x in k[4:].split("x")])
    for k in knn:
        ax[5].plot(*_series(rows, k), marker="o", ms=3, label=k[4:])
    if knn:
        ax[5].set_ylabel("k-NN top-1 (%)")
        ax[5].legend(fontsize=7, title="sub-network")
        ax[5].set_title("in-run k-NN of the teacher's sub-networks")
    else:
        ax[5].text(0.5, 0.5, "no in-run k-NN\n(train.eval_every: 0)", ha="center", va="center",
                   transform=ax[5].transAxes, color="gray")
        ax[5].set_title("in-run k-NN")

    for a in ax:
        a.tick_params(labelbottom=True)
        a.set_xlabel("step")
        for i, s in enumerate(resumes):
            a.axvline(s, color="k", ls="--", lw=0.8, alpha=0.6, label="resumed" if i == 0 and a is ax[0] else None)
    if resumes:
        ax[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{run.resolve().name}: steps {rows[0]['step']}..{rows[-1]['step']}"
                 + (f", resumed at step {', '.join(map(str, resumes))} (dashed)" if resumes else ""))
    fig.tight_layout()
    folder = Path(out) if out is not None else run / "plots"
    paths = [folder / "training.png", folder / "training.svg"]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for p in paths:
            fig.savefig(p, dpi=110)
    except OSError as exc:
        raise OutputWriteError(f"the plot could not be written in '{folder}': {exc}") from None
    finally:
        plt.close(fig)
    return paths


@register_command("plot")
class PlotCommand:
    """Plot a run's training curves: RUN/plots/training.png and .svg.

    Loss terms, lr / weight decay, teacher momentum / temperature, img/s and MFU, the collapse
    watchdog's entropies against ln K, the in-run k-NN per sub-network; requeue/restart
    boundaries are dashed lines.  Reads RUN/metrics.jsonl, RUN/config.yaml, RUN/attempts.jsonl."""

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("run", help="run folder (train.output_dir)")
        parser.add_argument("-o", "--output", help="folder for training.png/.svg (default: RUN/plots)")

    @staticmethod
    def run(args) -> int:
        for p in plot_run(Path(args.run), Path(args.output) if args.output else None):
            print(p)
        return 0
