"""FLOPs of a POA step, counted with ``torch.utils.flop_counter.FlopCounterMode`` on meta tensors.

The real model (any registered backbone family), the real step
(:meth:`~poa_hpc.train.meta_arch.POA.forward_backward`, the optimizer, the EMA) run on
the meta device: shapes only, no arithmetic.  Attention runs the kernel a GPU runs
(``flash``, see :func:`poa_hpc.models.ops.attention_kernel`), whose backward
FlopCounterMode counts as 5 matmuls (it recomputes the scores).  Per rank and step:

* ``matmul``: FLOPs of matmuls, convolutions and attention (2 per multiply-add), the
  work tensor cores do and what MFU is measured against;
* ``elementwise``: one per output element of every pointwise op (one per input
  element of reductions): a rough bandwidth-bound indicator (Sinkhorn-Knopp,
  softmaxes, LayerNorm, AdamW, EMA), not part of MFU.

Parts of the step:

* ``teacher``: backbone forward on the 2 global crops, heads forward ([CLS] and masked
  patches), Sinkhorn-Knopp (every pass over the rows: the prototype max, the
  normalisation rounds, the [CLS] targets);
* ``intact`` / ``elastic``: backbone forward + backward on all crops, and heads + losses
  forward + backward (the head MLPs, the prototype layer formed chunk by chunk, the
  cross-entropies and their gradients, the masked-patch targets formed again from the
  teacher's features, same-view targets in the elastic branch, KoLeo);
* ``optimizer``: gradient clipping and AdamW; ``ema``: the teacher update.

Backbone and heads are told apart by counting the backbone alone on the same inputs
(forward, and backward from its outputs: matmul FLOPs of a backward do not depend on
the incoming gradient), since module-level attribution of backward ops is unreliable
for a module called twice per step (global and local crops).

The expectation under eq. 14 counts the elastic branch of every width at the smallest
and largest depth and interpolates in depth along the family's analytic cost
(``spec.gflops``): exact when every block of a width costs the same (ViT; checked in a
test), and never more than the two counts apart otherwise.  With
``model.rank_sampling=per_rank`` each rank draws its own sub-network and a synchronous
step waits for the largest: the expected maximum over ``world_size`` draws is reported
next to the mean.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from poa_hpc.config import POAConfig
from poa_hpc.models.elastic import subset_size, uses_subset
from poa_hpc.models.ops import attention_kernel
from poa_hpc.models.registry import get_backbone
from poa_hpc.models.subnets import Subnet
from poa_hpc.perf.fake import MetaMemo, masked_tokens, meta_model, synthetic_batch

__all__ = ["count_step", "analytic_step_flops", "expected_step", "expected_max", "PEAK_TFLOPS", "peak_tflops", "StepFlops",
           "gpu_hours"]

aten = torch.ops.aten

#: Dense bf16 tensor-core peaks (TFLOP/s) by device name fragment (without sparsity).
PEAK_TFLOPS: Dict[str, float] = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0}


def peak_tflops(device_name: str) -> Optional[float]:
    """The table's dense bf16 peak for a device name (``torch.cuda.get_device_name()``), or None."""
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


# ---------------------------------------------------------------------------- counting
_MATMUL_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution", "aten.convolution_backward",
               "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_flash_attention_backward",
               "aten._scaled_dot_product_efficient_attention",
               "aten._scaled_dot_product_efficient_attention_backward",
               "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_cudnn_attention_backward",
               "aten._scaled_mm"}


def _numel(shape) -> int:
    if shape is None:
        return 0
    if isinstance(shape, torch.Size):
        n = 1
        for s in shape:
            n *= int(s)
        return n
    if isinstance(shape, (list, tuple)):
        if shape and all(isinstance(s, int) for s in shape):  # a plain shape
            n = 1
            for s in shape:
                n *= int(s)
            return n
        return sum(_numel(s) for s in shape)
    return 0


def _per_output(*args, out_shape=None, **kwargs) -> int:
    return _numel(out_shape if out_shape is not None and _numel(out_shape) else args[0])


def _per_input(*args, out_shape=None, **kwargs) -> int:
    return _numel(args[0])


_POINTWISE = ("add", "sub", "mul", "div", "exp", "log", "neg", "sqrt", "rsqrt", "pow", "maximum", "minimum", "where",
              "clamp", "clamp_min", "clamp_max", "lerp", "addcmul", "addcdiv", "gelu", "gelu_backward", "sigmoid",
              "tanh", "abs", "reciprocal", "remainder", "eq", "ne", "gt", "lt", "ge", "le", "bitwise_and",
              "bitwise_or", "logical_not", "isinf", "isnan", "isfinite", "masked_fill", "xlogy", "erf", "exp2",
              "log1p", "expm1", "sign", "_softmax", "_log_softmax", "_softmax_backward_data",
              "_log_softmax_backward_data", "native_layer_norm", "native_layer_norm_backward", "_foreach_mul",
              "_foreach_add", "_foreach_div", "_foreach_lerp", "_foreach_addcmul", "_foreach_addcdiv",
              "_foreach_sqrt", "_foreach_sub", "_foreach_maximum", "_foreach_neg", "_foreach_pow",
              "_foreach_reciprocal", "_foreach_exp", "bernoulli", "uniform", "normal", "fill", "_to_copy")
_REDUCTIONS = ("sum", "mean", "amax", "amin", "max", "min", "logsumexp", "linalg_vector_norm", "norm", "argmax",
               "_foreach_norm", "prod", "var_mean", "var", "std")


def _custom_mapping() -> Dict:
    mapping = {}
    for names, formula in ((_POINTWISE, _per_output), (_REDUCTIONS, _per_input)):
        for name in names:
            for variant in (name, name + "_"):
                packet = getattr(aten, variant, None)
                if packet is not None:
                    mapping[packet] = formula
    return mapping


def _split(counts: Dict[str, Dict[object, int]]) -> Tuple[int, int]:
    """(matmul, elementwise) FLOPs of FlopCounterMode's global per-op counts."""
    mm = el = 0
    for op, n in counts.get("Global", {}).items():
        if str(op) in _MATMUL_OPS:
            mm += n
        else:
            el += n
    return int(mm), int(el)


def _module_matmul(counts: Dict[str, Dict[object, int]], pattern: str) -> int:
    """Matmul FLOPs inside the modules whose name matches ``pattern`` (counts are inclusive of children)."""
    import re

    rx = re.compile(pattern)
    return int(sum(n for name, ops in counts.items() if rx.search(name)
                   for op, n in ops.items() if str(op) in _MATMUL_OPS))


class _Counter:
    """A FlopCounterMode per named phase of the step (the ``phase`` hook of ``forward_backward``)."""

    def __init__(self):
        self.counts: Dict[str, Dict[str, Dict[object, int]]] = {}
        self.mapping = _custom_mapping()

    @contextlib.contextmanager
    def __call__(self, name: str):
        fc = FlopCounterMode(display=False, custom_mapping=self.mapping)
        with fc:
            yield
        self.counts[name] = fc.get_flop_counts()


def _count(fn: Callable[[], object]) -> Dict[str, Dict[object, int]]:
    fc = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with fc:
        fn()
    return fc.get_flop_counts()


@dataclass
class StepFlops:
    """FLOPs of one step on one rank (``parts``: part -> {"matmul", "elementwise"}) and what they were counted for."""

    sub: Subnet
    n_masked: int
    ibot: bool
    batch_size: int
    parts: Dict[str, Dict[str, int]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        """Matmul FLOPs of the whole step."""
        return self.total()

    def total(self, kind: str = "matmul", prefix: str = "") -> int:
        return sum(v[kind] for k, v in self.parts.items() if k.startswith(prefix))

    def branch(self, name: str, kind: str = "matmul") -> int:
        return self.total(kind, name + "/")

    def rows(self) -> List[dict]:
        return [{"part": k, "matmul_flops": v["matmul"], "elementwise_ops": v["elementwise"]}
                for k, v in self.parts.items()]


def _backbone_flops(backbone, batch: Dict[str, torch.Tensor], sub: Optional[Subnet], masks: bool,
                    local: bool, backward: bool) -> Tuple[int, int]:
    """(matmul, elementwise) of the backbone alone on the step's crops (forward, and backward from its outputs)."""
    width, depth = (sub.width, sub.depth) if sub is not None else (None, None)

    def run():
        ctx = contextlib.nullcontext() if backward else torch.no_grad()
        with ctx:
            g = backbone(batch["global_crops"], width, depth, masks=batch["masks"] if masks else None, features=True)
            outs = [g["x_norm_clstoken"], g["x_norm_patchtokens"]]
            if local:
                outs.append(backbone(batch["local_crops"], width, depth))
            if backward:
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    counts = _count(run)
    return _split(counts)


def count_step(cfg: POAConfig, sub: Optional[Subnet] = None, *, n_masked: Optional[int] = None, ibot: bool = True,
               batch_size: Optional[int] = None, model=None, optimizer: bool = True,
               attention: str = "flash") -> StepFlops:
    """FLOPs of one POA step of ``cfg`` on one rank, elastic sub-network ``sub`` (default: the smallest),
    ``n_masked`` masked patches (default: the mean of DINOv2's plan), by part; on meta tensors."""
    from poa_hpc.train.optim import build_optimizer

    cfg = _unchunked(cfg)
    model = model or meta_model(cfg)
    space = model.space
    sub = sub or Subnet(space.widths[0], space.depths[0])
    B = batch_size or cfg.optim.batch_size
    M = masked_tokens(cfg, B) if n_masked is None else int(n_masked)
    batch = synthetic_batch(cfg, B, M if ibot else 0, device="meta")
    has_local = cfg.data.n_local > 0
    counter = _Counter()
    out = StepFlops(sub, M if ibot else 0, ibot, B)
    with MetaMemo(), attention_kernel(attention):
        model.forward_backward(batch, sub, cfg.loss.warmup_teacher_temp, ibot=ibot, phase=counter)
        c = counter.counts
        t_mm, t_el = _split(c["teacher"])
        tb_mm, tb_el = _backbone_flops(model.teacher.backbone, batch, None, False, False, False)
        th_mm = _module_matmul(c["teacher"], r"\.heads\.\d+$")  # forward only: module attribution is exact here
        out.parts["teacher/backbone"] = {"matmul": tb_mm, "elementwise": tb_el}
        out.parts["teacher/heads"] = {"matmul": th_mm, "elementwise": 0}
        out.parts["teacher/sinkhorn"] = {"matmul": t_mm - tb_mm - th_mm, "elementwise": t_el - tb_el}
        for name, s in (("intact", model.intact), ("elastic", sub)):
            b_mm, b_el = _backbone_flops(model.student.backbone, batch, s, ibot, has_local, True)
            mm, el = _split(c[name])
            out.parts[f"{name}/backbone"] = {"matmul": b_mm, "elementwise": b_el}
            out.parts[f"{name}/heads_losses"] = {"matmul": mm - b_mm, "elementwise": el - b_el}
        model.student.zero_grad(set_to_none=False)
        if optimizer:
            opt = build_optimizer(model.student.named_parameters(), cfg)
            from poa_hpc.distributed.engines import clip_grad_norm_tensor

            counts = _count(lambda: (clip_grad_norm_tensor(model.student.parameters(), cfg.optim.clip_grad),
                                     opt.step()))
            mm, el = _split(counts)
            out.parts["optimizer/clip_adamw"] = {"matmul": mm, "elementwise": el}
            mm, el = _split(_count(lambda: model.update_teacher(0.999)))
            out.parts["ema/update"] = {"matmul": mm, "elementwise": el}
    return out


def _unchunked(cfg: POAConfig) -> POAConfig:
    """The same config with heads and losses in one chunk per head: FLOPs do not depend on the chunking
    (matmuls split by rows), and fewer ops count faster."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.loss.chunk_elements = 0
    return cfg


# ---------------------------------------------------------------------------- analytic
def student_gflops(spec, arch, sub: Optional[Subnet], img_size: Optional[int], batch: int, mode: str) -> float:
    """Multiply-accumulates (G) per crop of a student forward on ``batch`` crops of ``img_size``: ``spec.gflops``
    less, in each block whose stochastic depth runs on a sample subset (``model.drop_path_mode``), the
    share ``1 - subset_size(batch, rate) / batch`` of its residual branches that is never computed."""
    g = spec.gflops(arch, sub, img_size)
    if batch > 0:
        for branch, rate in spec.residual_gflops(arch, sub, img_size):
            if uses_subset(mode, rate):
                g -= branch * (1.0 - subset_size(batch, rate) / batch)
    return g


def analytic_step_flops(cfg: POAConfig, sub: Subnet, n_masked: int, ibot: bool = True,
                        batch_size: Optional[int] = None) -> Dict[str, float]:
    """Matmul FLOPs of one step per rank from the family's analytic forward cost (``spec.gflops``, multiply-adds)
    and the heads' shapes: backward = 2 x forward, Sinkhorn-Knopp and the chunked losses as the passes they
    make over the prototype layer; the students' backbones without the residual-branch work that subset
    stochastic depth skips (:func:`student_gflops`).  Cheap enough for every logged step (the trainer's ``tflops``); within
    2 % of :func:`count_step` (tests)."""
    spec, arch = get_backbone(cfg.model.arch), cfg.model.section
    d, h, lc = cfg.data, cfg.head, cfg.loss
    B = batch_size or cfg.optim.batch_size
    M = n_masked if ibot else 0
    space = spec.space(arch)
    n_g, n_l = 2 * B, d.n_local * B

    def backbone(s: Subnet, local: bool = True, student: bool = False) -> float:
        mode = cfg.model.drop_path_mode if student else "mask"  # the teacher never drops
        f = 2e9 * n_g * student_gflops(spec, arch, s, d.global_size, n_g, mode)
        if n_l and local:
            f += 2e9 * n_l * student_gflops(spec, arch, s, d.local_size, n_l, mode)
        return f

    def mlp(in_dim: int) -> float:  # multiply-adds of one row through a head's MLP
        dims = [in_dim] + [h.hidden_dim] * (max(h.nlayers, 1) - 1) + [h.bottleneck_dim]
        return float(sum(a * b for a, b in zip(dims[:-1], dims[1:])))

    proto = float(sum(h.bottleneck_dim * k for k in h.prototypes))  # multiply-adds of one row, all heads
    n_heads = len(h.prototypes)
    intact_dim = spec.feature_dim(arch, space.intact.width)
    it = lc.sinkhorn_iters
    teacher_rows, student_rows = n_g + M, n_g + n_l + M
    out = {
        "teacher/backbone": backbone(space.intact, local=False),
        "teacher/heads": 2 * teacher_rows * n_heads * mlp(intact_dim),
        # [CLS]: shift, rounds, targets; patches: shift and rounds (targets are formed in the students' losses)
        "teacher/sinkhorn": 2 * proto * (n_g * (2 + it) + M * (1 + it)),
    }
    for name, s, extra_rows in (("intact", space.intact, 0), ("elastic", sub, n_g + n_l)):
        dim = spec.feature_dim(arch, s.width)
        out[f"{name}/backbone"] = 3 * backbone(s, student=True)
        # MLP and prototype layer forward + backward, the masked-patch targets again, same-view sources
        out[f"{name}/heads_losses"] = (3 * 2 * student_rows * n_heads * mlp(dim) + 3 * 2 * student_rows * proto
                                       + 2 * proto * (M + extra_rows))
    return out


# ---------------------------------------------------------------------------- expectation
def elastic_counter(cfg: POAConfig, *, n_masked: Optional[int] = None, ibot: bool = True, model=None,
                    attention: str = "flash") -> Callable[[Subnet], int]:
    """``f(sub)``: matmul FLOPs of the elastic branch (forward + backward, heads and losses) at ``sub``, counted on
    meta tensors; the teacher targets and intact same-view sources are made once."""
    from poa_hpc.train.meta_arch import StepInputs

    cfg = _unchunked(cfg)
    model = model or meta_model(cfg)
    M = masked_tokens(cfg) if n_masked is None else int(n_masked)
    batch = synthetic_batch(cfg, None, M if ibot else 0, device="meta")
    memo = MetaMemo()
    with memo, attention_kernel(attention):
        inp = StepInputs.from_batch(batch, torch.device("meta"))
        targets = model.teacher_targets(inp, cfg.loss.warmup_teacher_temp, ibot)
        with torch.no_grad():
            intact = model.student_outputs(inp, model.intact, ibot)
        n_cls = intact["rows"][0] + intact["rows"][1]
        from poa_hpc.losses.chunked import Logits

        same_view = [Logits(z[:n_cls], w) for z, w in intact["heads"]]
        del intact

    def count(sub: Subnet) -> int:
        def run():
            out = model.student_outputs(inp, sub, ibot)
            loss, _ = model.branch_loss(out, targets, inp, ibot, 1 - cfg.loss.lam, same_view)
            loss.backward()

        with memo, attention_kernel(attention):
            counts = _count(run)
        model.student.zero_grad(set_to_none=True)
        return _split(counts)[0]

    return count


def expected_step(cfg: POAConfig, world_size: int = 1, *, n_masked: Optional[int] = None, ibot: bool = True,
                  progress: Callable[[str], None] = lambda s: None) -> Dict[str, object]:
    """Step FLOPs under eq. 14: the teacher, intact branch, optimizer and EMA (fixed), the elastic branch per
    sub-network (counted per width at the smallest and largest depth, interpolated in depth along
    ``spec.gflops``), their mean under eq. 14 and, for ``per_rank`` sampling, the expected maximum over
    ``world_size`` ranks (a synchronous step waits for the largest sub-network drawn)."""
    spec, arch = get_backbone(cfg.model.arch), cfg.model.section
    space = spec.space(arch)
    M = masked_tokens(cfg) if n_masked is None else int(n_masked)
    progress("counting a whole step")
    base = count_step(cfg, Subnet(space.widths[0], space.depths[0]), n_masked=M, ibot=ibot)
    fixed = base.step - base.branch("elastic")
    count = elastic_counter(cfg, n_masked=M, ibot=ibot)
    elastic: Dict[Subnet, int] = {}
    ends = [space.depths[0], space.depths[-1]] if len(space.depths) > 1 else [space.depths[0]]
    for w in space.widths:
        counted = {}
        for dep in ends:
            s = Subnet(w, dep)
            progress(f"counting the elastic branch at {s}")
            counted[dep] = count(s)
        g = {dep: spec.gflops(arch, Subnet(w, dep)) for dep in space.depths}
        lo, hi = ends[0], ends[-1]
        for dep in space.depths:
            if dep in counted:
                elastic[Subnet(w, dep)] = counted[dep]
            else:
                frac = (g[dep] - g[lo]) / (g[hi] - g[lo]) if g[hi] != g[lo] else 0.0
                elastic[Subnet(w, dep)] = int(round(counted[lo] + frac * (counted[hi] - counted[lo])))
    probs = space.probabilities()
    mean_e = sum(p * elastic[s] for s, p in probs.items())
    ranks = world_size if cfg.model.rank_sampling == "per_rank" else 1
    e_max = expected_max(elastic, probs, ranks)
    return {"fixed": fixed, "elastic": elastic, "elastic_mean": mean_e, "elastic_expected_max": e_max,
            "ranks": ranks, "step_mean": fixed + mean_e, "step_critical": fixed + e_max, "base": base,
            "n_masked": M}


def expected_max(values: Dict[Subnet, float], probs: Dict[Subnet, float], ranks: int) -> float:
    """E[max of ``values[s]`` over ``ranks`` independent draws of s ~ ``probs``]:
    the sum over the sorted values of f * (F(f)^R - F(f-)^R)."""
    cdf, out = 0.0, 0.0
    for s, f in sorted(((s, values[s]) for s in probs), key=lambda x: x[1]):
        prev, cdf = cdf, min(cdf + probs[s], 1.0)
        out += f * (cdf ** ranks - prev ** ranks)
    return out


def gpu_hours(step_flops: float, steps: int, gpus: int, peak: float, mfu: float) -> float:
    """GPU-hours of ``steps`` steps of ``step_flops`` matmul FLOPs per GPU at ``mfu`` of ``peak`` TFLOP/s."""
    return steps * step_flops / (mfu * peak * 1e12) * gpus / 3600.0
