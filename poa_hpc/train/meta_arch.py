"""The POA tri-branch meta-architecture: EMA teacher, intact student, elastic student.

Per step (one sampled elastic sub-network ``(w, d)``):

* the teacher (EMA of the student, intact, no drop-path, no grad) sees the 2
  global crops; Sinkhorn-Knopp centring gives its [CLS] targets and, when iBOT
  is active, its masked-patch targets;
* the intact student sees all crops (global crops masked when iBOT is active);
* the elastic student is the same modules run at ``(w, d)`` on the same inputs.

Per head (then averaged over the heads, authors' code):
``lam * (DINO_intact + ibot_w * iBOT_intact) + (1 - lam) * (DINO_elastic + ibot_w * iBOT_elastic)
+ sv_w * (same_view_global + same_view_local)``, plus
``koleo_w * (KoLeo_intact + KoLeo_elastic) / 2`` on the backbone's global [CLS].

The intact branch is back-propagated before the elastic branch is built, so
only one branch's activations are alive at a time; the elastic branch's
same-view target is the intact logits, detached.  Gradients of both branches
accumulate into the shared parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from poa_hpc.config import POAConfig
from poa_hpc.losses import dino_cross_view_loss, ibot_patch_loss, koleo_loss, same_view_loss, sinkhorn_knopp
from poa_hpc.models.elastic import ElasticBackbone
from poa_hpc.models.heads import build_heads
from poa_hpc.models.registry import BackboneSpec, get_backbone
from poa_hpc.models.subnets import Subnet
from poa_hpc.train.watchdog import collapse_stats


class Branch(nn.Module):
    """A backbone plus its projection heads: the layout of both student and teacher.

    ``forward`` is the whole branch (backbone on global and local crops, every
    head on [CLS] tokens and masked patch tokens), so wrappers that need one
    forward per module (DDP, DeepSpeed, an FSDP root) can wrap a branch.
    """

    def __init__(self, backbone: ElasticBackbone, heads: nn.ModuleList):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
        mask_indices: Optional[torch.Tensor] = None,
        width: Optional[int] = None,
        depth: Optional[int] = None,
    ) -> Dict[str, object]:
        """Backbone [CLS] of the global crops and, per head, logits of global/local [CLS] and of
        the patch tokens at ``mask_indices`` (flat indices into the global crops' patches)."""
        g = self.backbone(global_crops, width, depth, masks=masks, features=True)
        tokens = [g["x_norm_clstoken"]]
        if local_crops is not None:
            tokens.append(self.backbone(local_crops, width, depth))
        if mask_indices is not None:
            tokens.append(g["x_norm_patchtokens"].flatten(0, 1)[mask_indices])
        x = torch.cat(tokens)
        sizes = [t.shape[0] for t in tokens]
        logits = []
        for head in self.heads:
            parts = _split(head(x), sizes)
            logits.append({
                "global": parts[0],
                "local": parts[1] if local_crops is not None else None,
                "patch": parts[-1] if mask_indices is not None else None,
            })
        return {"cls_global": g["x_norm_clstoken"], "logits": logits}


def build_branch(cfg: POAConfig, drop_path_rate: float) -> Branch:
    """Backbone of the family ``model.arch`` (its ``model.<arch>`` section) plus the MPH heads, whose
    input is the intact network's feature width."""
    m, h = cfg.model, cfg.head
    spec, arch = get_backbone(m.arch), m.section
    backbone = spec.build(arch, drop_path_rate=drop_path_rate, linear_backend=m.elastic_linear,
                          attn_backend=m.attention)
    in_dim = spec.feature_dim(arch, spec.space(arch).intact.width)
    heads = build_heads(in_dim, h.prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers, m.elastic_linear)
    return Branch(backbone, heads)


@dataclass
class StepInputs:
    global_crops: torch.Tensor  # (2B, C, H, W), view-major
    local_crops: Optional[torch.Tensor]  # (n_local * B, C, h, w), view-major
    masks: torch.Tensor  # (2B, N) bool
    mask_indices: torch.Tensor  # flat indices of masked patches in masks.flatten()
    masks_weight: torch.Tensor  # (M,)

    @classmethod
    def from_batch(cls, batch: Dict[str, torch.Tensor], device: torch.device) -> "StepInputs":
        local = batch.get("local_crops")
        return cls(
            global_crops=batch["global_crops"].to(device, non_blocking=True),
            local_crops=None if local is None or local.numel() == 0 else local.to(device, non_blocking=True),
            masks=batch["masks"].to(device, non_blocking=True),
            mask_indices=batch["mask_indices"].to(device, non_blocking=True),
            masks_weight=batch["masks_weight"].to(device, non_blocking=True),
        )


def _split(x: torch.Tensor, sizes: List[int]) -> List[torch.Tensor]:
    return list(torch.split(x, sizes, dim=0))


class POA(nn.Module):
    def __init__(self, cfg: POAConfig):
        super().__init__()
        self.cfg = cfg
        self.spec: BackboneSpec = get_backbone(cfg.model.arch)
        self.student = build_branch(cfg, cfg.model.section.drop_path_rate)
        self.teacher = build_branch(cfg, 0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.space = self.spec.space(cfg.model.section)
        # Engines that must see every branch forward (DeepSpeed) put their wrappers here.
        self.student_call: Optional[Callable[..., Dict[str, object]]] = None
        self.teacher_call: Optional[Callable[..., Dict[str, object]]] = None

    @property
    def intact(self) -> Subnet:
        return self.space.intact

    # ---------------------------------------------------------------- teacher
    @torch.no_grad()
    def teacher_targets(self, inp: StepInputs, teacher_temp: float, ibot: bool) -> List[Dict[str, torch.Tensor]]:
        lc = self.cfg.loss
        out = (self.teacher_call or self.teacher)(inp.global_crops, mask_indices=inp.mask_indices if ibot else None)
        targets = []
        for lg in out["logits"]:
            target = {"cls": sinkhorn_knopp(lg["global"], teacher_temp, lc.sinkhorn_iters)}
            if ibot:
                target["patch"] = sinkhorn_knopp(lg["patch"], teacher_temp, lc.sinkhorn_iters)
            targets.append(target)
        return targets

    # ---------------------------------------------------------------- students
    def student_outputs(self, inp: StepInputs, sub: Subnet, ibot: bool) -> Dict[str, object]:
        """Backbone [CLS] features and per-head logits of the student at ``sub``."""
        return (self.student_call or self.student)(inp.global_crops, inp.local_crops, inp.masks if ibot else None,
                                                   inp.mask_indices if ibot else None, sub.width, sub.depth)

    def _branch_loss(self, out: Dict[str, object], targets, inp: StepInputs, ibot: bool,
                     intact_logits: Optional[list] = None) -> Dict[str, torch.Tensor]:
        """Loss terms of one student branch, averaged over heads (unweighted by lambda)."""
        lc = self.cfg.loss
        n_heads = len(targets)
        dino = ib = sv = 0.0
        for i, (lg, tg) in enumerate(zip(out["logits"], targets)):
            dino = dino + dino_cross_view_loss(lg["global"], lg["local"], tg["cls"], lc.student_temp) / n_heads
            if ibot:
                ib = ib + ibot_patch_loss(lg["patch"], tg["patch"], inp.masks_weight, inp.masks.shape[0],
                                          lc.student_temp) / n_heads
            if intact_logits is not None:
                il = intact_logits[i]
                term = same_view_loss(il["global"], lg["global"], lc.same_view_temp)
                if lg["local"] is not None:
                    term = term + same_view_loss(il["local"], lg["local"], lc.same_view_temp)
                sv = sv + term / n_heads
        koleo = sum(koleo_loss(c) for c in out["cls_global"].chunk(2))
        terms = {"dino": dino, "koleo": koleo}
        if ibot:
            terms["ibot"] = ib
        if intact_logits is not None:
            terms["same_view"] = sv
        return terms

    def forward_backward(
        self,
        batch: Dict[str, torch.Tensor],
        sub: Subnet,
        teacher_temp: float,
        ibot: bool,
        backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
        autocast: Callable[[], object] | None = None,
        stats: bool = False,
    ) -> Dict[str, float]:
        """One POA step's forward and backward; returns the detached loss terms.

        ``backward`` is the engine's backward (plain ``loss.backward()`` here),
        ``autocast`` a context factory for mixed precision.  With ``stats`` (the
        trainer's logged steps) the per-head collapse statistics of
        :mod:`poa_hpc.train.watchdog` are added, computed from the teacher targets
        and intact logits this step already has.
        """
        import contextlib

        ctx = autocast or contextlib.nullcontext
        lc = self.cfg.loss
        device = next(self.student.parameters()).device
        inp = StepInputs.from_batch(batch, device)
        # iBOT is on or off for all ranks alike (a rank may hold no masked patch this step;
        # Sinkhorn-Knopp's all-reduces still have to run there).
        lam = lc.lam
        with ctx():
            targets = self.teacher_targets(inp, teacher_temp, ibot)
            intact = self.student_outputs(inp, self.intact, ibot)
            ti = self._branch_loss(intact, targets, inp, ibot)
            loss_i = lam * (ti["dino"] + lc.ibot_weight * ti.get("ibot", 0.0)) + lc.koleo_weight * ti["koleo"] / 2
        backward(loss_i)
        intact_logits = [{k: (v.detach() if v is not None else None) for k, v in lg.items()} for lg in intact["logits"]]
        del intact
        with ctx():
            elastic = self.student_outputs(inp, sub, ibot)
            te = self._branch_loss(elastic, targets, inp, ibot, intact_logits)
            loss_e = ((1 - lam) * (te["dino"] + lc.ibot_weight * te.get("ibot", 0.0))
                      + lc.same_view_weight * te["same_view"] + lc.koleo_weight * te["koleo"] / 2)
        backward(loss_e)
        out = {"loss": loss_i.detach() + loss_e.detach()}
        out.update({f"intact/{k}": torch.as_tensor(v).detach() for k, v in ti.items()})
        out.update({f"elastic/{k}": torch.as_tensor(v).detach() for k, v in te.items()})
        if stats:
            out.update(collapse_stats([t["cls"] for t in targets], [lg["global"] for lg in intact_logits],
                                      lc.student_temp))
        return {k: float(v) for k, v in out.items()}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student, with fused foreach ops."""
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def teacher_backbone(self) -> ElasticBackbone:
        return self.teacher.backbone
