"""Models and batches without data: the real POA model on the meta device (or as fake tensors), a synthetic
multi-crop batch of the config's shapes, and the masked-token counts iBOT gives per rank."""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from poa_hpc.config import POAConfig
from poa_hpc.errors import ConfigError
from poa_hpc.models.registry import get_backbone

__all__ = ["meta_model", "synthetic_batch", "masked_tokens", "tokens_per_crop", "MetaMemo", "fake_process_group"]


def meta_model(cfg: POAConfig):
    """The POA model (student, teacher, heads) on the meta device: shapes and dtypes, no storage."""
    from poa_hpc.train.meta_arch import POA

    with torch.device("meta"):
        return POA(cfg)


def tokens_per_crop(cfg: POAConfig) -> int:
    """Patch tokens of one global crop on the family's iBOT mask grid."""
    grid = get_backbone(cfg.model.arch).mask_grid(cfg.model.section, cfg.data.global_size)
    return grid * grid


def masked_tokens(cfg: POAConfig, batch_size: Optional[int] = None, sigmas: float = 0.0) -> int:
    """Masked patch tokens on one rank's ``2 * batch`` global crops: the mean of DINOv2's plan (a share
    ``loss.mask_sample_probability`` of the crops, ratios spread over ``[mask_ratio_min, mask_ratio_max]``)
    plus ``sigmas`` standard deviations of a rank's count (crops drawn independently), at most every
    crop at the largest ratio."""
    lc = cfg.loss
    B = batch_size or cfg.optim.batch_size
    n = tokens_per_crop(cfg)
    p, lo, hi = lc.mask_sample_probability, lc.mask_ratio_min, lc.mask_ratio_max
    mean_ratio = (lo + hi) / 2
    second = (hi ** 3 - lo ** 3) / (3 * (hi - lo)) if hi > lo else lo * lo  # E[ratio^2], ratio ~ U(lo, hi)
    per_crop_mean = p * n * mean_ratio
    per_crop_var = p * n * n * second - per_crop_mean ** 2
    crops = 2 * B
    value = crops * per_crop_mean + sigmas * math.sqrt(max(crops * per_crop_var, 0.0))
    return int(min(round(value), crops * int(n * hi)))


def synthetic_batch(cfg: POAConfig, batch_size: Optional[int] = None, n_masked: Optional[int] = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """A training batch of the config's shapes: ``2B`` global crops, ``n_local * B`` local crops and iBOT
    masks with ``n_masked`` masked patches (default: :func:`masked_tokens`) spread over the crops.

    On the meta device the tensors have shapes only; elsewhere the crops are random normal."""
    B = batch_size or cfg.optim.batch_size
    d = cfg.data
    n_tok = tokens_per_crop(cfg)
    M = masked_tokens(cfg, B) if n_masked is None else int(n_masked)
    crops = 2 * B
    if M > crops * n_tok:
        raise ValueError(f"{M} masked tokens do not fit in {crops} crops of {n_tok} patches")
    # The first M patch slots in crop-interleaved order: every crop gets about M / crops masked patches.
    order = torch.arange(crops * n_tok).view(n_tok, crops).t().flatten()
    masks = torch.zeros(crops * n_tok, dtype=torch.bool)
    masks[order[:M]] = True
    masks = masks.view(crops, n_tok)
    mask_indices = masks.flatten().nonzero().flatten()
    masks_weight = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]

    def crops_of(n: int, size: int) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(n, 3, size, size, device=device, dtype=dtype)
        return torch.randn(n, 3, size, size, generator=generator, dtype=dtype).to(device)

    return {
        "global_crops": crops_of(crops, d.global_size),
        "local_crops": crops_of(d.n_local * B, d.local_size),
        "masks": masks.to(device),
        "mask_indices": mask_indices.to(device),
        "masks_weight": masks_weight.float().to(device),
    }


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


class PhasedDispatchMode(TorchDispatchMode):
    """A dispatch mode that knows which part of the step is running: ``with mode.phase("backward"): ...``
    sets :attr:`phase_name` for the ops dispatched inside (``"setup"`` outside any phase)."""

    phase_name = "setup"

    @contextlib.contextmanager
    def phase(self, name: str):
        saved, self.phase_name = self.phase_name, name
        try:
            yield
        finally:
            self.phase_name = saved


class MetaMemo(TorchDispatchMode):
    """Meta-tensor outputs of functional ops, memoised by the ops' inputs' metadata.

    Meta kernels of pointwise ops run through Python reference implementations (a few hundred
    microseconds each); a step repeats the same ops on the same shapes block after block.  Ops that
    mutate, alias or return non-tensors run as usual; the others return fresh meta tensors of the
    remembered shapes, strides and dtypes.  Put it below a counting mode (enter it first)."""

    def __init__(self):
        super().__init__()
        self.cache: Dict[tuple, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if schema.is_mutable or not schema.returns or any(r.alias_info is not None for r in schema.returns):
            return func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        key = [func]
        for a in flat:
            if isinstance(a, torch.Tensor):
                if a.device.type != "meta":
                    return func(*args, **kwargs)
                key.append((tuple(a.shape), a.stride(), a.dtype, a.storage_offset()))
            elif isinstance(a, _PLAIN):
                key.append(a)
            else:
                return func(*args, **kwargs)
        key = tuple(key)
        hit = self.cache.get(key)
        if hit is not None:
            spec, metas = hit
            return tree_unflatten([torch.empty_strided(s, st, dtype=dt, device="meta") for s, st, dt in metas], spec)
        out = func(*args, **kwargs)
        flat_out, spec = tree_flatten(out)
        if all(isinstance(o, torch.Tensor) for o in flat_out):
            self.cache[key] = (spec, [(tuple(o.shape), o.stride(), o.dtype) for o in flat_out])
        return out


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A fake process group of ``world_size`` ranks (this process is rank 0; collectives do nothing)."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise ConfigError("poa estimate memory runs its own fake process group; call it outside a distributed run")
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
