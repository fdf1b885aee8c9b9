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

Heads and losses run head by head and in chunks of rows (:mod:`poa_hpc.losses.chunked`):
a branch returns, per head, the normalised bottleneck features and the prototype
matrix, and the teacher's Sinkhorn-Knopp targets, the students' cross-entropies
and their gradients are formed ``loss.chunk_elements`` logits at a time, so no
(tokens x prototypes) matrix of every head is alive at once.  The step's loss
terms stay on the device (no host synchronisation inside the step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from poa_hpc.config import POAConfig
from poa_hpc.losses import koleo_loss
from poa_hpc.losses.chunked import Group, Logits, SinkhornTargets, Term, head_loss
from poa_hpc.losses.dino import upcast
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
        """Backbone [CLS] of the global crops and, per head, the pair ``(z, W)`` over the rows: global
        [CLS], local [CLS], then the patch tokens at ``mask_indices`` (flat indices into the global crops'
        patches); ``F.linear(z, W)`` are that head's logits (:func:`branch_logits`).  ``rows`` gives the
        row counts ``(global, local, patch)``."""
        g = self.backbone(global_crops, width, depth, masks=masks, features=True)
        tokens = [g["x_norm_clstoken"]]
        if local_crops is not None:
            tokens.append(self.backbone(local_crops, width, depth))
        if mask_indices is not None:
            tokens.append(g["x_norm_patchtokens"].flatten(0, 1)[mask_indices])
        x = torch.cat(tokens)
        rows = (tokens[0].shape[0], tokens[1].shape[0] if local_crops is not None else 0,
                tokens[-1].shape[0] if mask_indices is not None else 0)
        return {"cls_global": g["x_norm_clstoken"], "heads": [head(x, project=False) for head in self.heads],
                "rows": rows}


def branch_logits(out: Dict[str, object]) -> List[Dict[str, Optional[torch.Tensor]]]:
    """Per head, the full logits of a branch output split into ``global`` / ``local`` / ``patch`` (None where
    the branch had no such rows): what the step never materialises, for tests and inspection."""
    n_global, n_local, n_patch = out["rows"]
    logits = []
    for z, w in out["heads"]:
        lg = Logits(z, w)()
        logits.append({"global": lg[:n_global], "local": lg[n_global:n_global + n_local] if n_local else None,
                       "patch": lg[n_global + n_local:] if n_patch else None})
    return logits


def build_branch(cfg: POAConfig, drop_path_rate: float) -> Branch:
    """Backbone of the family ``model.arch`` (its ``model.<arch>`` section) plus the MPH heads, whose
    input is the intact network's feature width."""
    m, h = cfg.model, cfg.head
    spec, arch = get_backbone(m.arch), m.section
    backbone = spec.build(arch, drop_path_rate=drop_path_rate, linear_backend=m.elastic_linear,
                          attn_backend=m.attention)
    backbone.set_drop_path_mode(m.drop_path_mode)
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
    def from_batch(cls, batch: Dict[str, torch.Tensor], device: torch.device) -> StepInputs:
        local = batch.get("local_crops")
        return cls(
            global_crops=batch["global_crops"].to(device, non_blocking=True),
            local_crops=None if local is None or local.numel() == 0 else local.to(device, non_blocking=True),
            masks=batch["masks"].to(device, non_blocking=True),
            mask_indices=batch["mask_indices"].to(device, non_blocking=True),
            masks_weight=batch["masks_weight"].to(device, non_blocking=True),
        )


def _no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


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
    def teacher_targets(self, inp: StepInputs, teacher_temp: float, ibot: bool) -> List[Dict[str, object]]:
        """Per head: ``cls`` (2B, K) Sinkhorn-Knopp targets of the global [CLS] tokens and, with iBOT, ``patch``
        (a :class:`~poa_hpc.losses.chunked.SinkhornTargets` over the masked patches, formed chunk by chunk)."""
        lc = self.cfg.loss
        out = (self.teacher_call or self.teacher)(inp.global_crops, mask_indices=inp.mask_indices if ibot else None)
        n_global = out["rows"][0]
        targets = []
        for z, w in out["heads"]:
            cls = SinkhornTargets(Logits(z[:n_global], w), teacher_temp, lc.sinkhorn_iters, lc.chunk_elements)
            target = {"cls": cls()}
            if ibot:
                target["patch"] = SinkhornTargets(Logits(z[n_global:], w), teacher_temp, lc.sinkhorn_iters,
                                                  lc.chunk_elements)
            targets.append(target)
        return targets

    # ---------------------------------------------------------------- students
    def student_outputs(self, inp: StepInputs, sub: Subnet, ibot: bool) -> Dict[str, object]:
        """Backbone [CLS] features and per-head ``(z, W)`` of the student at ``sub``."""
        return (self.student_call or self.student)(inp.global_crops, inp.local_crops, inp.masks if ibot else None,
                                                   inp.mask_indices if ibot else None, sub.width, sub.depth)

    def branch_loss(self, out: Dict[str, object], targets, inp: StepInputs, ibot: bool, lam: float,
                    same_view: Optional[List[Logits]] = None):
        """``(loss, terms)`` of one student branch: the differentiable branch loss (DINO and iBOT weighted by
        ``lam``, same-view when ``same_view`` holds the intact logits per head, KoLeo) and its terms
        averaged over heads (unweighted), as 0-d tensors."""
        lc = self.cfg.loss
        n_heads = len(targets)
        n_global, n_local, n_patch = out["rows"]
        B = n_global // 2
        n_terms = 2 + 2 * (n_local // B if n_local else 0)
        dev = out["cls_global"].device
        local_sample = (lambda p: torch.arange(p.start, p.stop, device=dev) % B)
        loss = 0.0
        values = None
        for i, ((z, w), tg) in enumerate(zip(out["heads"], targets)):
            t = tg["cls"]
            swapped = torch.cat([t[B:], t[:B]])  # teacher view A supervises student view B and vice versa
            glob = Group(0, n_global, [Term(0, lambda p, s=swapped: s[p], 1.0 / (n_terms * B), lc.student_temp,
                                            lam / n_heads)])
            groups = [glob]
            loc = None
            if n_local:
                both = t[:B] + t[B:]  # a local crop is supervised by both global views of its image
                loc = Group(n_global, n_local, [Term(0, lambda p, s=both: s[local_sample(p)], 1.0 / (n_terms * B),
                                                     lc.student_temp, lam / n_heads)])
                groups.append(loc)
            if ibot:
                patch = tg["patch"]
                groups.append(Group(n_global + n_local, n_patch, [Term(
                    1, lambda p, s=patch: s(p), inp.masks_weight / inp.masks.shape[0], lc.student_temp,
                    lam * lc.ibot_weight / n_heads)]))
            if same_view is not None:
                src, T = same_view[i], lc.same_view_temp
                coef = lc.same_view_weight / n_heads
                glob.terms.append(Term(2, lambda p, s=src: F.softmax(upcast(s(p)) / T, dim=-1), 1.0 / n_global, T,
                                       coef))
                if loc is not None:
                    loc.terms.append(Term(2, lambda p, s=src: F.softmax(upcast(s(slice(n_global + p.start,
                                                                                       n_global + p.stop))) / T,
                                                                        dim=-1), 1.0 / n_local, T, coef))
            head_l, head_v = head_loss(z, w, groups, 3, lc.chunk_elements)
            loss = loss + head_l
            values = head_v / n_heads if values is None else values + head_v / n_heads
        koleo = sum(koleo_loss(c) for c in out["cls_global"].chunk(2))
        loss = loss + lc.koleo_weight * koleo / 2
        terms = {"dino": values[0], "koleo": koleo.detach()}
        if ibot:
            terms["ibot"] = values[1]
        if same_view is not None:
            terms["same_view"] = values[2]
        return loss, terms

    def forward_backward(
        self,
        batch: Dict[str, torch.Tensor],
        sub: Subnet,
        teacher_temp: float,
        ibot: bool,
        backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
        autocast: Callable[[], object] | None = None,
        stats: bool = False,
        phase: Callable[[str], ContextManager] = _no_phase,
    ) -> Dict[str, torch.Tensor]:
        """One POA step's forward and backward; returns the detached loss terms as 0-d tensors on the
        device (reading them is the caller's one host synchronisation).

        ``backward`` is the engine's backward (plain ``loss.backward()`` here),
        ``autocast`` a context factory for mixed precision, ``phase(name)`` a context
        around each part of the step (``teacher``, ``intact``, ``elastic``: forward and
        backward; timers and FLOP counters hook in there).  With ``stats`` (the
        trainer's logged steps) the per-head collapse statistics of
        :mod:`poa_hpc.train.watchdog` are added, computed from the teacher targets
        and intact logits this step already has.
        """
        ctx = autocast or contextlib.nullcontext
        lc = self.cfg.loss
        device = next(self.student.parameters()).device
        inp = StepInputs.from_batch(batch, device)
        # iBOT is on or off for all ranks alike (a rank may hold no masked patch this step;
        # Sinkhorn-Knopp's all-reduces still have to run there).
        lam = lc.lam
        with phase("teacher"), ctx():
            targets = self.teacher_targets(inp, teacher_temp, ibot)
        with phase("intact"):
            with ctx():
                intact = self.student_outputs(inp, self.intact, ibot)
                loss_i, ti = self.branch_loss(intact, targets, inp, ibot, lam)
                # The elastic branch's same-view targets: the intact [CLS] logits, detached, kept as (z, W).
                n_cls = intact["rows"][0] + intact["rows"][1]
                same_view = [Logits(z[:n_cls], w) for z, w in intact["heads"]]
            backward(loss_i)
            del intact
        with phase("elastic"):
            with ctx():
                elastic = self.student_outputs(inp, sub, ibot)
                loss_e, te = self.branch_loss(elastic, targets, inp, ibot, 1 - lam, same_view)
            backward(loss_e)
            del elastic
        out = {"loss": loss_i.detach() + loss_e.detach()}
        out.update({f"intact/{k}": v.detach() for k, v in ti.items()})
        out.update({f"elastic/{k}": v.detach() for k, v in te.items()})
        if stats:
            n_global = len(targets[0]["cls"])
            out.update(collapse_stats([t["cls"] for t in targets], [s(slice(0, n_global)) for s in same_view],
                                      lc.student_temp))
        return out

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student, with fused foreach ops."""
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def teacher_backbone(self) -> ElasticBackbone:
        return self.teacher.backbone
