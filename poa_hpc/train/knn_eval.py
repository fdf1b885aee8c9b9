"""k-NN along the run (``train.eval_every``): the teacher's smallest, a middle and the intact
sub-network, by weighted k-NN on the labelled evaluation set (``build_eval_datasets``: the digits'
split, or ``data.root``'s train/ and val/), logged as ``knn/<sub-network>``.

Each rank computes the features of every ``world_size``-th image (its shard) with the dense extracted
sub-network, the shards are gathered onto every rank and put back in dataset order, and the k-NN is
the one of ``poa eval knn`` (:func:`poa_hpc.eval.knn.weighted_knn` with ``eval.knn_k``,
``eval.knn_temperature``) on the same extracted weights, so the numbers equal ``poa eval knn`` on
that step's checkpoint.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch.utils.data import DataLoader, Subset

from poa_hpc.data.loader import build_eval_datasets
from poa_hpc.distributed.env import gather_objects
from poa_hpc.eval.knn import extract_features, weighted_knn
from poa_hpc.models.extract import extract_state_dict
from poa_hpc.models.registry import get_backbone
from poa_hpc.models.subnets import probe_subnets

__all__ = ["InRunKnn"]


class InRunKnn:
    """Built once per attempt (the evaluation images are loaded once); called at the evaluation steps."""

    def __init__(self, cfg, rank: int, world_size: int, device, batch_size: int = 256):
        self.cfg, self.rank, self.world, self.device, self.batch = cfg, rank, world_size, device, batch_size
        self.train_ds, self.val_ds, self.num_classes = build_eval_datasets(cfg)
        self.spec = get_backbone(cfg.model.arch)
        self.subs = probe_subnets(self.spec.space(cfg.model.section))

    def _features(self, model, ds):
        idx = list(range(self.rank, len(ds), self.world))
        loader = DataLoader(Subset(ds, idx), batch_size=self.batch, shuffle=False, num_workers=0)
        f, y = extract_features(model, loader, self.device)
        parts = gather_objects((idx, f.cpu(), y.cpu()))
        order = torch.tensor([i for p in parts for i in p[0]])
        feats = torch.cat([p[1] for p in parts])[order.argsort()]
        labels = torch.cat([p[2] for p in parts])[order.argsort()]
        return feats.to(self.device), labels.to(self.device)

    @torch.no_grad()
    def __call__(self, teacher_backbone) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for sub in self.subs:
            arch, state = extract_state_dict(teacher_backbone, sub)
            model = self.spec.build_dense(arch, attn_backend=self.cfg.model.attention)
            model.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()})
            model = model.to(self.device).eval()
            tr_f, tr_y = self._features(model, self.train_ds)
            va_f, va_y = self._features(model, self.val_ds)
            out[f"knn/{sub}"] = weighted_knn(tr_f, tr_y, va_f, va_y, self.cfg.eval.knn_k,
                                             self.cfg.eval.knn_temperature, self.num_classes)
        return out


def subnet_names(cfg) -> List[str]:
    return [str(s) for s in probe_subnets(get_backbone(cfg.model.arch).space(cfg.model.section))]
