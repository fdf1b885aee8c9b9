"""One typed configuration schema for poa_hpc.

The schema is a tree of dataclasses.  YAML files in ``configs/`` are merged onto
the defaults with OmegaConf in struct mode, then dotted command-line overrides
(``optim.lr=1e-3``) are merged on top.  Unknown keys and ill-typed values are
reported as :class:`ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


@dataclass
class ElasticConfig:
    """The elastic sub-network space of the intact model (spec §1, §0)."""

    min_width: int = 384  # smallest elastic width D_0
    width_step: int = 64  # D_i = min_width + i * width_step (one head per step)
    min_depth: int = 12  # elastic depths min_depth..depth
    sampling_s: float = 3.0  # eq. 14 exponent-like parameter (3 ViT, 2 Swin/ResNet)
    rank_sampling: str = "per_rank"  # per_rank (paper) | shared (same sub-network on all ranks)


@dataclass
class ModelConfig:
    arch: str = "vit"
    img_size: int = 224  # size the position embedding is built for
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layerscale_init: float = 1e-5
    drop_path_rate: float = 0.2
    # Sliced projection: torch (slice + matmul) | triton (kernels reading the weight in place)
    # | auto (Triton on CUDA, torch elsewhere).  torch stays the default until the Triton
    # kernels have been measured on a GPU.
    elastic_linear: str = "torch"
    attention: str = "sdpa"  # sdpa (torch picks flash/efficient/cuDNN) | xformers | math (reference)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)


@dataclass
class HeadConfig:
    prototypes: List[int] = field(default_factory=lambda: [8192, 16384, 32768, 65536])
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3


@dataclass
class LossConfig:
    lam: float = 0.8  # weight of the intact terms; elastic terms get 1 - lam
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    sinkhorn_iters: int = 3
    same_view_temp: float = 0.1
    same_view_weight: float = 0.2
    koleo_weight: float = 0.1
    ibot_weight: float = 1.0
    ibot_start_epoch: int = 30
    mask_sample_probability: float = 0.5
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5


@dataclass
class DataConfig:
    dataset: str = "imagefolder"  # imagefolder | filelist | digits
    root: str = ""  # folder (ImageNet layout) or file list, unused for digits
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale_min: float = 0.32
    global_scale_max: float = 1.0
    local_scale_min: float = 0.05
    local_scale_max: float = 0.32
    # torch: torchvision/PIL in DataLoader workers | dali: nvJPEG decode + augmentations on
    # the GPU | dali_cpu: the same DALI graph on the CPU.  num_workers = DALI's CPU threads.
    loader: str = "torch"
    num_workers: int = 8
    digits_size: int = 32  # side length the 8x8 digits are upscaled to


@dataclass
class OptimConfig:
    epochs: int = 100
    iters_per_epoch: int = 0  # 0: dataset size // global batch
    batch_size: int = 64  # per process
    base_lr: float = 0.004  # for a global batch of lr_ref_batch, sqrt-scaled
    lr_ref_batch: int = 1024
    min_lr: float = 2e-5
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 0.9999
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: int = 1
    clip_grad: float = 1.5  # 0 disables
    beta1: float = 0.9
    beta2: float = 0.999
    schedule_fraction: float = 0.78  # schedules span total_iters / s, cut at total_iters


@dataclass
class TrainConfig:
    output_dir: str = "runs/poa"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on CUDA, none on CPU) | bf16 | none
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # checkpoints kept (newest by step); a resume falls back to an older readable one
    keep_every: int = 0  # > 0: also checkpoint every N steps and keep those for good (evaluation along the run)
    log_every: int = 10
    max_steps: int = 0  # 0: epochs * iters_per_epoch; otherwise stop early at this step
    tensorboard: bool = False
    progress: bool = True


@dataclass
class DistConfig:
    """How the step is distributed; the launcher (torchrun, Slurm) sets the world."""

    engine: str = "none"  # none (one process) | ddp (replicated, averaged grads) | fsdp (FSDP2) | deepspeed
    activation_checkpointing: bool = False  # fsdp: recompute each student block in backward
    compile: bool = False  # fsdp: torch.compile each block
    reshard_after_forward: bool = True  # fsdp: free gathered block params after forward (ZeRO-3 like)
    zero_stage: int = 2  # deepspeed: ZeRO stage 1, 2 or 3
    # Seconds a collective may wait for the other ranks before this rank fails (a dead or stuck
    # rank then ends the job instead of holding the allocation idle); NCCL's async error handling is on.
    timeout_s: int = 600
    # deepspeed: extra DeepSpeed config merged over the one derived from this file
    # (batch, clipping and the optimizer always come from optim.*), e.g.
    # {zero_optimization: {stage3_prefetch_bucket_size: 5e7}}
    deepspeed: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    image_size: int = 224  # resize for k-NN evaluation (digits: data.digits_size)


@dataclass
class POAConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES = {
    "model.arch": ("vit",),
    "model.elastic_linear": ("torch", "triton", "auto"),
    "model.attention": ("sdpa", "xformers", "math"),
    "model.elastic.rank_sampling": ("per_rank", "shared"),
    "data.dataset": ("imagefolder", "filelist", "digits"),
    "data.loader": ("torch", "dali", "dali_cpu"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp": ("auto", "bf16", "none"),
    "dist.engine": ("none", "ddp", "fsdp", "deepspeed"),
    "dist.zero_stage": (1, 2, 3),
}


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def _get(cfg: POAConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: POAConfig) -> POAConfig:
    """Semantic checks that types alone cannot express."""
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"key '{key}': got {value!r}, expected one of {list(allowed)}")
    m, e = cfg.model, cfg.model.elastic
    if m.embed_dim % m.num_heads:
        raise ConfigError(f"key 'model.embed_dim': {m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    head_dim = m.embed_dim // m.num_heads
    if e.width_step % head_dim or e.min_width % head_dim:
        raise ConfigError(
            f"key 'model.elastic.min_width'/'width_step': {e.min_width}/{e.width_step} must be multiples of the head dim {head_dim}"
        )
    if not (0 < e.min_width <= m.embed_dim) or (m.embed_dim - e.min_width) % e.width_step:
        raise ConfigError(
            f"key 'model.elastic.min_width': {e.min_width} must be in (0, {m.embed_dim}] and reach embed_dim in steps of {e.width_step}"
        )
    if not (1 <= e.min_depth <= m.depth):
        raise ConfigError(f"key 'model.elastic.min_depth': {e.min_depth} must be in [1, model.depth={m.depth}]")
    for size_key in ("global_size", "local_size"):
        size = getattr(cfg.data, size_key)
        if size % m.patch_size:
            raise ConfigError(f"key 'data.{size_key}': {size} is not a multiple of model.patch_size={m.patch_size}")
    if not cfg.head.prototypes or any(k <= 0 for k in cfg.head.prototypes):
        raise ConfigError(f"key 'head.prototypes': expected a non-empty list of positive ints, got {cfg.head.prototypes}")
    if not (0.0 <= cfg.loss.lam <= 1.0):
        raise ConfigError(f"key 'loss.lam': {cfg.loss.lam} must be in [0, 1]")
    if not (0 < cfg.optim.schedule_fraction <= 1.0):
        raise ConfigError(f"key 'optim.schedule_fraction': {cfg.optim.schedule_fraction} must be in (0, 1]")
    if cfg.optim.batch_size < 2:
        raise ConfigError(f"key 'optim.batch_size': {cfg.optim.batch_size} must be >= 2 (KoLeo needs neighbours)")
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), base: Optional[dict] = None) -> POAConfig:
    """Defaults <- ``base`` (e.g. saved with a model) <- YAML file <- dotted overrides, validated."""
    schema = OmegaConf.structured(POAConfig)
    layers = [OmegaConf.create(base)] if base else []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            layers.append(OmegaConf.load(p))
        except Exception as exc:  # yaml syntax errors
            raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: expected key=value (e.g. optim.base_lr=1e-3)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(schema, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        where = f" (in {path})" if path else ""
        raise ConfigError(_describe(exc) + where) from None
    assert isinstance(cfg, POAConfig)
    return validate(cfg)


def flatten(d: dict, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts as one level with dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg: POAConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: POAConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(d: dict) -> POAConfig:
    """Rebuild a config saved in a checkpoint (validated like a file)."""
    return load_config(base=d)
