"""Peak device memory per rank of a POA step, predicted on fake tensors (no GPU, no memory).

``estimate_memory`` builds the real model (any registered family) as fake tensors, joins a fake
process group of the requested world size, wraps the model with the real engine (FSDP2: the
same ``fully_shard`` units, mixed-precision policy and activation checkpointing as training),
builds the optimizer, creates its state, and runs one full step: teacher, intact forward +
backward, elastic forward + backward, gradient clipping + AdamW, EMA.  A dispatch mode
(:class:`MemoryTracker`) sees every tensor the step creates and when its storage is freed (and
FSDP2's storage resizes of unsharded parameters), labels it with the part of the step that made
it and, once the step is over, with what it turned out to be (parameters, gradients, optimizer
state); the peak is the largest sum of live bytes, and its breakdown what was alive then.

CUDA semantics on a machine without a GPU.  Fake CUDA tensors can be created here, and a
forward pass runs on them, but autograd's engine cannot run a backward on a CUDA device that
does not exist (``hasPrimaryContext expects a valid device index``).  So the step runs on fake
*CPU* tensors with what differs on a GPU made explicit:

* bf16 autocast with CUDA's policy: CPU autocast in bf16, with the ops CUDA's autocast runs in
  fp32 and CPU's does not (LayerNorm, whose fp32 input copy CUDA saves for backward; norms,
  softmaxes, ...) given CUDA's treatment (:func:`cuda_autocast_policy`).  A forward pass does
  run on fake CUDA tensors, and the tests check that the stand-in's forward makes the same ops
  with the same dtypes and sizes as the fake-CUDA forward;
* FSDP2's CUDA mixed-precision policy (bf16 parameters, fp32 gradient reduction);
* attention through the kernel the GPU runs (:func:`poa_hpc.models.ops.attention_kernel`:
  flash for bf16, memory-efficient for fp32), which saves the output and log-sum-exp, never
  the N x N matrix, and the meta kernels return the GPU kernels' output layout;
* AdamW with ``foreach`` (what CUDA picks), and sizes rounded up to the CUDA caching
  allocator's 512-byte blocks.

What it predicts is ``torch.cuda.max_memory_allocated``: it does not include the CUDA context,
NCCL's buffers, allocator fragmentation (``max_memory_reserved``), cuBLAS workspaces or
kernels' internal scratch (flash-attention backward's fp32 dq accumulator, a layer's worth).
``--engine deepspeed`` is analytic for the ZeRO states (DeepSpeed does not run on fake
tensors) around the step's activations measured with whole parameters.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch.utils._pytree import tree_flatten

from poa_hpc.config import POAConfig
from poa_hpc.distributed.registry import engine_names, get_engine
from poa_hpc.errors import ConfigError
from poa_hpc.models.subnets import Subnet
from poa_hpc.perf.fake import PhasedDispatchMode, fake_process_group

__all__ = ["MemoryTracker", "estimate_memory", "MemoryReport", "fake_step"]

GiB = 2 ** 30


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (FSDP2's sharded parameters, gradients and optimizer state)."""
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) else t


def _storage(t: torch.Tensor):
    try:
        return _local(t).untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class MemoryTracker(PhasedDispatchMode):
    """Live bytes of every storage the dispatched ops create, with the step part current at creation.

    ``phase(name)`` sets the part; ``register(tensors, kind)`` adds tensors made before tracking
    began (parameters, the batch); ``relabel(tensors, kind)`` names what storages turned out to be
    (gradients, optimizer state) once the step is over.  FSDP2 frees and re-allocates unsharded
    parameters by resizing storages, outside the dispatcher: ``UntypedStorage.resize_`` is watched
    while the tracker is active.  ``round_to``: allocation granularity (512 bytes: CUDA's caching
    allocator; 1: exact bytes)."""

    def __init__(self, round_to: int = 512):
        super().__init__()
        self.round_to = max(int(round_to), 1)
        self.live: Dict[int, tuple] = {}  # storage key -> (allocation id, bytes)
        self.label: Dict[int, str] = {}  # allocation id -> part of the step that made it
        self.kind: Dict[int, str] = {}  # allocation id -> what it turned out to be
        self.events: List[tuple] = []  # (allocation id, +bytes / -bytes, phase)
        self._next = 0
        self._patched = None
        self.module_label: Optional[str] = None  # set by module hooks (see watch_modules)

    # ------------------------------------------------------------------ bookkeeping
    def _bytes(self, n: int) -> int:
        return 0 if n <= 0 else int(math.ceil(n / self.round_to) * self.round_to)

    def _add(self, st, kind: Optional[str] = None) -> None:
        if st is None:
            return
        key = st._cdata
        n = self._bytes(st.nbytes())
        if key in self.live:
            return
        aid = self._next
        self._next += 1
        self.live[key] = (aid, n)
        self.label[aid] = self._where()
        if kind is not None:
            self.kind[aid] = kind
        self.events.append((aid, n, self.phase_name))
        weakref.finalize(st, self._free, key, aid)

    def _free(self, key: int, aid: int) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[0] == aid:
            del self.live[key]
            self.events.append((aid, -entry[1], self.phase_name))

    def _resized(self, st, before: int) -> None:
        key = st._cdata
        after = self._bytes(st.nbytes())
        entry = self.live.get(key)
        if entry is None:
            self._add(st, "unsharded parameters (FSDP2)")
            return
        aid, n = entry
        if after != n:
            self.live[key] = (aid, after)
            self.events.append((aid, after - n, self.phase_name))
            self.kind.setdefault(aid, "unsharded parameters (FSDP2)")

    def _where(self) -> str:
        """The part of the step an allocation belongs to: the phase, and within a branch, backward or the module
        whose forward is running (backbone, heads) or else the loss computation."""
        if self.phase_name in ("teacher", "intact", "elastic"):
            if torch._C._current_autograd_node() is not None:
                return f"{self.phase_name}: backward"
            what = self.module_label or ("Sinkhorn-Knopp, targets" if self.phase_name == "teacher" else "losses")
            return f"{self.phase_name}: {what}"
        return self.phase_name

    def watch_modules(self, modules: List[tuple]) -> List:
        """Label allocations made inside the forward passes of these ``(name, module)`` with the name; returns the
        hook handles."""
        handles = []
        for name, module in modules:
            def pre(mod, args, name=name):
                self.module_label = name

            def post(mod, args, out):
                self.module_label = None

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        return handles

    def register(self, tensors: Iterable[torch.Tensor], kind: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(_storage(t), kind)

    def relabel(self, tensors: Iterable[torch.Tensor], kind: str) -> None:
        for t in tensors:
            st = _storage(t) if isinstance(t, torch.Tensor) else None
            if st is not None and st._cdata in self.live:
                self.kind[self.live[st._cdata][0]] = kind

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self._add(_storage(t))
        return out

    def __enter__(self):
        tracker = self
        original = torch.UntypedStorage.resize_

        def resize_(st, size):
            before = st.nbytes()
            result = original(st, size)
            tracker._resized(st, before)
            return result

        self._patched = original
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._patched
        return super().__exit__(*exc)

    # ------------------------------------------------------------------ results
    def category(self, aid: int) -> str:
        return self.kind.get(aid) or f"activations/temporaries, {self.label[aid]}"

    def replay(self, start: int = 0) -> MemoryReport:
        """Peak and its breakdown over the events from ``start`` (with the labels known now)."""
        by: Dict[str, int] = {}
        total = peak = 0
        peak_at, peak_by = -1, {}
        phase_peak: Dict[str, int] = {}
        for i, (aid, delta, phase) in enumerate(self.events):
            cat = self.category(aid)
            by[cat] = by.get(cat, 0) + delta
            total += delta
            if i < start:
                continue
            phase_peak[phase] = max(phase_peak.get(phase, 0), total)
            if total > peak:
                peak, peak_at, peak_by = total, i, dict(by)
        return MemoryReport(peak=peak, peak_phase=self.events[peak_at][2] if peak_at >= 0 else "",
                            breakdown={k: v for k, v in sorted(peak_by.items(), key=lambda kv: -kv[1]) if v > 0},
                            phase_peaks=phase_peak, end=total)


@dataclass
class MemoryReport:
    """``peak`` bytes per rank, the part of the step it happened in, what was alive then, the peak of each part."""

    peak: int
    peak_phase: str
    breakdown: Dict[str, int]
    phase_peaks: Dict[str, int]
    end: int = 0
    info: Dict[str, object] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{'alive at the peak':<58}{'GiB':>9}"]
        for k, v in self.breakdown.items():
            lines.append(f"  {k:<56}{v / GiB:>9.2f}")
        lines.append(f"  {'peak (predicted max_memory_allocated per rank)':<56}{self.peak / GiB:>9.2f}")
        lines.append(f"{'peak during each part of the step':<58}{'GiB':>9}")
        for k, v in self.phase_peaks.items():
            lines.append(f"  {k:<56}{v / GiB:>9.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak, "peak_gib": self.peak / GiB, "peak_phase": self.peak_phase,
                "breakdown_bytes": self.breakdown, "phase_peak_bytes": self.phase_peaks, **self.info}


# ---------------------------------------------------------------------------- CUDA's autocast policy on the CPU
# Ops CUDA's autocast runs in fp32 (its "fp32" list, aten/src/ATen/autocast_mode.cpp) that CPU autocast leaves in
# bf16; among them what the step uses on bf16 tensors: LayerNorm (CUDA saves an fp32 copy of its input), norms.
CUDA_FP32_OPS = ("layer_norm", "group_norm", "linalg_vector_norm", "norm.Scalar", "norm.ScalarOpt_dim",
                 "softmax.int", "log_softmax.int", "exp", "log", "rsqrt", "logsumexp", "cumsum", "cosine_similarity",
                 "pdist", "cdist", "pow.Tensor_Scalar", "sum.dim_IntList", "sum.default", "prod", "mse_loss", "l1_loss")


# CUDA passes dtype=float32 to these instead of casting their input ("fp32_set_opt_dtype"): no fp32 copy is made.
_OPT_DTYPE = ("softmax", "log_softmax", "cumsum", "prod", "sum", "linalg_vector_norm")


def _fp32_kernel(op, name: str):
    low = (torch.float16, torch.bfloat16)
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    names = [a.name for a in op._schema.arguments]
    opt_dtype = name.partition(".")[0] in _OPT_DTYPE and "dtype" in names
    dtype_pos = names.index("dtype") if opt_dtype else 0

    def up(a):
        return a.float() if isinstance(a, torch.Tensor) and a.dtype in low else a

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(keys):
            if opt_dtype:
                if (isinstance(args[0], torch.Tensor) and args[0].dtype in low and kwargs.get("dtype") is None
                        and len(args) <= dtype_pos):
                    kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
            args = [up(a) if not isinstance(a, (list, tuple)) else type(a)(up(x) for x in a) for a in args]
            return op(*args, **{k: up(v) for k, v in kwargs.items()})

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy():
    """Within this context CPU autocast follows CUDA's policy for :data:`CUDA_FP32_OPS` (inputs cast to fp32, as
    CUDA's autocast does), so a CPU stand-in step saves what the CUDA step saves."""
    import warnings

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name in CUDA_FP32_OPS:
            packet_name, _, overload = name.partition(".")
            packet = getattr(torch.ops.aten, packet_name, None)
            op = getattr(packet, overload or "default", None) if packet is not None else None
            if op is None:
                continue
            try:
                lib.impl(name, _fp32_kernel(op, name), "AutocastCPU")
            except RuntimeError:
                pass
    try:
        yield
    finally:
        lib._destroy()


# ---------------------------------------------------------------------------- the fake step
def estimate_memory(cfg: POAConfig, world_size: int = 1, *, engine: Optional[str] = None,
                    sub: Optional[Subnet] = None, n_masked: Optional[int] = None, target: str = "cuda",
                    ibot: bool = True, batch_size: Optional[int] = None) -> MemoryReport:
    """Predicted peak memory per rank of one POA step of ``cfg`` on ``world_size`` ranks.

    ``engine``: ``fsdp`` (default for world size > 1), ``none`` (one process) or ``deepspeed``;
    ``target``: ``cuda`` (bf16 autocast and FSDP2's bf16 policy when ``train.amp`` is auto/bf16,
    flash attention, CUDA allocator rounding) or ``cpu`` (what a CPU run does: fp32 unless
    ``train.amp=bf16``, torch's CPU attention, exact bytes); ``sub``: the elastic sub-network
    (default: the intact width at the smallest depth... no: the largest sub-network eq. 14 can
    draw, which bounds every step); ``n_masked``: masked patches on this rank (default: the
    mean of DINOv2's plan plus 4 standard deviations of a rank's count)."""
    from poa_hpc.perf.fake import masked_tokens

    cfg = copy.deepcopy(cfg)
    if batch_size:
        cfg.optim.batch_size = batch_size
    engine = engine or ("fsdp" if world_size > 1 else "none")
    if engine not in memory_engines():
        others = [n for n in engine_names() if n not in memory_engines()]
        raise ConfigError(f"--engine: {engine!r}, expected one of {list(memory_engines())}"
                          + (f" (no memory estimate for {', '.join(others)}: use fsdp's numbers without sharding, "
                             "or none)" if others else ""))
    spec = get_engine(engine)
    if not spec.distributed and world_size > 1:
        raise ConfigError(f"--engine {engine} runs one process: use --world-size 1")
    if target not in ("cuda", "cpu"):
        raise ConfigError(f"--target: {target!r}, expected cuda or cpu")
    if world_size < 1:
        raise ConfigError("--world-size must be >= 1")
    M = masked_tokens(cfg, sigmas=4.0) if n_masked is None else int(n_masked)
    if spec.memory == "analytic":
        return _analytic_states(cfg, spec, world_size, sub, M, target, ibot)
    with fake_process_group(world_size) if spec.distributed else contextlib.nullcontext():
        return fake_step(cfg, world_size, engine, sub, M, target, ibot)


def memory_engines() -> tuple:
    """The registered engines ``poa estimate memory`` can estimate."""
    return tuple(n for n in engine_names() if get_engine(n).memory)


def _largest_drawn(space) -> Subnet:
    """The largest sub-network eq. 14 draws (the intact pair is trained by the intact branch)."""
    return max(space.weights(), key=lambda s: (s.width, s.depth if isinstance(s.depth, int) else sum(s.depth)))


def fake_step(cfg: POAConfig, world_size: int, engine_name: str, sub: Optional[Subnet], n_masked: int,
               target: str, ibot: bool, modes: tuple = ()) -> MemoryReport:
    """One step on fake tensors under a :class:`MemoryTracker`; ``modes``: more dispatch modes to run the step's
    ops through (e.g. :class:`poa_hpc.perf.comm.CommCounter`), entered inside the tracker."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from poa_hpc.distributed.env import DistContext
    from poa_hpc.distributed.registry import engine_class
    from poa_hpc.models.ops import attention_kernel
    from poa_hpc.perf.fake import meta_model, synthetic_batch
    from poa_hpc.train.optim import apply_schedules, build_optimizer

    cuda = target == "cuda"
    amp = cfg.train.amp
    bf16 = amp == "bf16" or (amp == "auto" and cuda)
    model = meta_model(cfg)
    space = model.space
    sub = sub or _largest_drawn(space)
    batch = synthetic_batch(cfg, None, n_masked if ibot else 0, device="cpu")
    dcfg = copy.deepcopy(cfg.dist)
    dcfg.engine = engine_name
    ctx = DistContext(0, world_size, 0, torch.device("cuda" if cuda else "cpu"))
    engine = engine_class(engine_name)(dcfg, ctx, amp, cfg.optim.clip_grad, cfg.optim.batch_size)
    if get_engine(engine_name).distributed and hasattr(engine, "mesh"):  # an engine that shards over a mesh
        from torch.distributed.device_mesh import init_device_mesh

        engine.mesh = init_device_mesh("cpu", (world_size,))
    tracker = MemoryTracker(round_to=512 if cuda else 1)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else None
    kernel = ("flash" if bf16 else "efficient") if cuda else None
    fm = FakeTensorMode(allow_non_fake_inputs=True)
    with fm:
        model.to_empty(device="cpu")
        fake_batch = {k: fm.from_tensor(v) for k, v in batch.items()}
    policy = cuda_autocast_policy() if (cuda and bf16) else contextlib.nullcontext()
    with fm, tracker, policy:
        tracker.register(model.student.parameters(), "parameters: student")
        tracker.register(model.teacher.parameters(), "parameters: teacher")
        optimizer = engine.setup(model, lambda named: build_optimizer(named, cfg))
        # after sharding: the parameters as the engine holds them
        tracker.register(model.student.parameters(), "parameters: student")
        tracker.register(model.teacher.parameters(), "parameters: teacher")
        tracker.register(fake_batch.values(), "batch")
        if cuda:
            for g in optimizer.param_groups:  # what AdamW picks on CUDA
                g["foreach"] = True
        apply_schedules(optimizer, 1e-4, 0.04, 1e-4)
        with tracker.phase("optimizer state init"):  # steady state: AdamW's moments exist before the step
            for p in model.student.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _relabel_states(tracker, model, optimizer)
        gc.collect()
        start = len(tracker.events)
        tracker.phase_name = "step (between its parts)"
        branches = (model.student, model.teacher)
        hooks = tracker.watch_modules([("backbone forward", b.backbone) for b in branches]
                                      + [("heads forward", h) for b in branches for h in b.heads])
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            phase = _both(tracker.phase, *[m.phase for m in modes if hasattr(m, "phase")])
            with attention_kernel(kernel):
                model.forward_backward(fake_batch, sub, cfg.loss.warmup_teacher_temp, ibot=ibot,
                                       backward=engine.backward, autocast=autocast, phase=phase)
            for h in hooks:
                h.remove()
            tracker.relabel([p.grad for p in model.student.parameters() if p.grad is not None], "gradients")
            with phase("optimizer (clip + AdamW)"):
                engine.clip_and_step(cfg.optim.clip_grad)
            with phase("EMA"):
                engine.update_teacher(0.999)
        _relabel_states(tracker, model, optimizer)
        report = tracker.replay(start)
    sizes = {"student_params": sum(p.numel() for p in model.student.parameters()),
             "teacher_params": sum(p.numel() for p in model.teacher.parameters())}
    report.info.update({"world_size": world_size, "engine": engine_name, "target": target, "sub": str(sub),
                        "n_masked": n_masked if ibot else 0, "ibot": ibot, "batch_per_rank": cfg.optim.batch_size,
                        "bf16": bf16, "attention_kernel": kernel or "torch SDPA (CPU)",
                        "activation_checkpointing": bool(cfg.dist.activation_checkpointing),
                        "chunk_elements": cfg.loss.chunk_elements, **sizes})
    return report


def _both(*phases: Callable[[str], contextlib.AbstractContextManager]) -> Callable[[str], contextlib.ExitStack]:
    """One ``phase(name)`` hook that enters every given one."""
    @contextlib.contextmanager
    def phase(name: str):
        with contextlib.ExitStack() as stack:
            for p in phases:
                stack.enter_context(p(name))
            yield

    return phase


def _relabel_states(tracker: MemoryTracker, model, optimizer) -> None:
    tracker.relabel(model.student.parameters(), "parameters: student")
    tracker.relabel(model.teacher.parameters(), "parameters: teacher")
    states = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    tracker.relabel(states, "optimizer state")


def _analytic_states(cfg: POAConfig, spec, world_size: int, sub: Optional[Subnet], n_masked: int, target: str,
                     ibot: bool) -> MemoryReport:
    """An engine whose states follow its :class:`~poa_hpc.distributed.registry.Sharding` (DeepSpeed ZeRO stage
    ``dist.zero_stage``, Rajbhandari et al. 2020): the step's activations and temporaries measured on fake tensors
    with whole fp32 parameters (``engine none``), with the states replaced: fp32 parameters (sharded, ZeRO-3: 1/N of
    them plus one gathered block), fp32 gradients (sharded, ZeRO >= 2: 1/N plus DeepSpeed's reduce bucket), AdamW's
    moments and fp32 partition (1/N), the teacher (parameters sharded: 1/N)."""
    stage = int(cfg.dist.zero_stage)
    shard = spec.sharding(cfg.dist)
    base = fake_step(cfg, 1, "none", sub, n_masked, target, ibot)
    n, t = base.info["student_params"], base.info["teacher_params"]
    N = world_size
    ds = dict(cfg.dist.deepspeed.get("zero_optimization", {})) if isinstance(cfg.dist.deepspeed, dict) else {}
    bucket = int(float(ds.get("reduce_bucket_size", 5e8)))
    states = {
        "parameters: student": 4 * n / (N if shard.params else 1),
        "parameters: teacher": 4 * t / (N if shard.params else 1),
        "gradients": 4 * n / N + 4 * min(bucket, n) if shard.grads else 4 * n,
        "optimizer state": (8 + 4) * n / (N if shard.optimizer else 1),  # moments + ZeRO's fp32 partition
    }
    measured_states = sum(v for k, v in base.breakdown.items() if not k.startswith("activations") and k != "batch")
    activations = base.peak - measured_states
    report = MemoryReport(peak=int(activations + sum(states.values())), peak_phase=base.peak_phase,
                          breakdown={**{k: int(v) for k, v in states.items()},
                                     **{k: v for k, v in base.breakdown.items()
                                        if k.startswith("activations") or k == "batch"}},
                          phase_peaks={}, info=dict(base.info))
    report.info.update({"engine": f"{spec.name} (ZeRO-{stage}, states analytic)", "world_size": N,
                        "reduce_bucket_elements": bucket})
    return report
