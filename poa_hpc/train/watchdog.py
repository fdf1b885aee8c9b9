"""Collapse watchdog: per-head statistics at logged steps and a one-time warning.

A collapsed DINO-style run has every head's logits ~constant across prototypes:
the teacher's Sinkhorn-Knopp targets and the student's predictions are uniform,
their entropies sit at ln K and every DINO term equals ln K.  At logged steps the
step returns, per head i (K_i prototypes), from tensors it already has:

* ``collapse/teacher_entropy_h{i}``: mean over rows of the entropy (nats) of the
  teacher's [CLS] targets (both global crops);
* ``collapse/student_entropy_h{i}``: mean entropy of the intact student's
  ``softmax(global [CLS] logits / student_temp)``;
* ``collapse/logit_spread_h{i}``: mean over rows of max - min of those logits.

:class:`CollapseWatchdog` is fed each logged record and fires once when both
entropies of every head have been within ``tolerance`` of ln K (relative) for
``patience`` consecutive logged records.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

PREFIX = "collapse/"


def stat_key(name: str, head: int) -> str:
    return f"{PREFIX}{name}_h{head}"


@torch.no_grad()
def collapse_stats(teacher_cls: Sequence[torch.Tensor], student_cls_logits: Sequence[torch.Tensor],
                   student_temp: float) -> Dict[str, torch.Tensor]:
    """Per-head statistics (0-d tensors, no host sync) from the step's teacher targets and intact logits.

    Args:
        teacher_cls: per head, (R, K) teacher target probabilities of the global [CLS] rows.
        student_cls_logits: per head, (R, K) intact student logits of the same rows.
        student_temp: the student temperature of the DINO loss.
    """
    out: Dict[str, torch.Tensor] = {}
    for i, (p, s) in enumerate(zip(teacher_cls, student_cls_logits)):
        p = p.float() if p.dtype not in (torch.float32, torch.float64) else p
        s = s.float() if s.dtype not in (torch.float32, torch.float64) else s
        out[stat_key("teacher_entropy", i)] = -torch.special.xlogy(p, p).sum(-1).mean()
        logq = F.log_softmax(s / student_temp, dim=-1)
        out[stat_key("student_entropy", i)] = -(logq.exp() * logq).sum(-1).mean()
        out[stat_key("logit_spread", i)] = (s.amax(-1) - s.amin(-1)).mean()
    return out


CAUSES = (
    "teacher temperature too high or its warm-up too short (loss.teacher_temp, loss.warmup_teacher_temp, "
    "loss.warmup_teacher_temp_epochs or _steps); last head layer frozen too briefly or too long for the number of "
    "steps (optim.freeze_last_layer_epochs or _steps); too many prototypes for a small dataset (head.prototypes); "
    "a LayerScale init that keeps the early [CLS] image-independent for a short run (model.vit.layerscale_init); "
    "learning rate too high or warm-up too short (optim.base_lr, optim.warmup_epochs or _steps); crops too small "
    "for the images to be told apart from one another (data.local_scale_min/max, data.global_scale_min)"
)


class CollapseWatchdog:
    """Counts consecutive logged records in which every head looks collapsed; warns once.

    A record looks collapsed when, for every head i, both ``teacher_entropy_h{i}``
    and ``student_entropy_h{i}`` are at least ``(1 - tolerance) * ln K_i``.  Any
    other record resets the count.  ``patience = 0`` disables the watchdog.
    """

    def __init__(self, prototypes: Sequence[int], tolerance: float = 0.01, patience: int = 20):
        self.prototypes: List[int] = [int(k) for k in prototypes]
        self.tolerance = float(tolerance)
        self.patience = int(patience)
        self.streak = 0  # consecutive collapsed-looking logged records
        self.fired_step: Optional[int] = None  # the step the warning was given at

    @property
    def collapsed(self) -> bool:
        return self.fired_step is not None

    def looks_collapsed(self, record: Mapping[str, float]) -> bool:
        for i, k in enumerate(self.prototypes):
            floor = (1.0 - self.tolerance) * math.log(k)
            if not (record[stat_key("teacher_entropy", i)] >= floor and record[stat_key("student_entropy", i)] >= floor):
                return False
        return True

    def update(self, record: Mapping[str, float]) -> Optional[str]:
        """Feed one logged record (with ``step`` and the per-head statistics); the warning, the one time it fires."""
        if self.patience <= 0:
            return None
        self.streak = self.streak + 1 if self.looks_collapsed(record) else 0
        if self.collapsed or self.streak < self.patience:
            return None
        self.fired_step = int(record["step"])
        heads = "; ".join(
            f"head {i} (K={k}): teacher {record[stat_key('teacher_entropy', i)]:.4f}, "
            f"student {record[stat_key('student_entropy', i)]:.4f} vs ln K {math.log(k):.4f}"
            for i, k in enumerate(self.prototypes)
        )
        return (f"training looks collapsed at step {self.fired_step}: for {self.streak} consecutive logged steps every "
                f"head's teacher targets and student predictions were within {self.tolerance:g} of uniform "
                f"(entropy >= {1 - self.tolerance:g} ln K) [{heads}]. Likely causes: {CAUSES}. "
                f"This warning is given once per run (train.collapse_patience=0 disables it).")

    def state_dict(self) -> Dict[str, Optional[int]]:
        return {"streak": self.streak, "fired_step": self.fired_step}

    def load_state_dict(self, state: Optional[Mapping[str, Optional[int]]]) -> None:
        if state:
            self.streak = int(state.get("streak", 0))
            fired = state.get("fired_step")
            self.fired_step = None if fired is None else int(fired)
