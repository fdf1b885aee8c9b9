"""One typed configuration schema for poa_hpc.

The schema is a tree of dataclasses.  YAML files in ``configs/`` are merged onto
the defaults with OmegaConf in struct mode, then dotted command-line overrides
(``optim.lr=1e-3``) are merged on top.  Unknown keys and ill-typed values are
reported as :class:`ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from poa_hpc.data.registry import dataset_names, get_dataset
from poa_hpc.distributed.registry import engine_names
from poa_hpc.errors import ConfigError
from poa_hpc.models.registry import backbone_names, get_backbone

__all__ = ["POAConfig", "ModelConfig", "load_config", "packaged_config", "from_dict", "to_dict", "to_yaml", "flatten"]


def _model_config_cls() -> type:
    """``model``: backend choices shared by every family plus one section per registered family
    (``model.vit``, ``model.swin``, ...); ``model.arch`` picks the section that is built."""
    families = [(n, get_backbone(n).config_cls, field(default_factory=get_backbone(n).config_cls))
                for n in backbone_names()]
    cls = make_dataclass("ModelConfig", [
        ("arch", str, field(default="vit")),  # a registered backbone family (model.<arch> is its section)
        # Sliced projection: torch (slice + matmul) | triton (kernels reading the weight in place)
        # | auto (Triton on CUDA, torch elsewhere).  torch stays the default until the Triton
        # kernels have been measured on a GPU.
        ("elastic_linear", str, field(default="torch")),
        ("attention", str, field(default="sdpa")),  # sdpa (flash/efficient/cuDNN) | xformers | math (reference)
        # Students' stochastic depth: mask (whole batch, dropped samples zeroed) | subset (each residual branch
        # runs on max(int(b(1-rate)),1) samples, index-added back x b/subset, as DINOv2) | auto (subset above 0.1)
        ("drop_path_mode", str, field(default="mask")),
        # per_rank (paper): each rank draws its own elastic sub-network per step | shared: one for all
        ("rank_sampling", str, field(default="per_rank")),
        # Start the intact student and the teacher from a dense checkpoint (docs/init_from.md): a path, or
        # null (or empty) for a random initialisation.  Applied before step 0 of a run that does not resume.
        ("init_from", Optional[str], field(default=None)),
        ("init_from_format", str, field(default="auto")),  # auto | poa | timm | dinov2 | authors
        ("init_heads", bool, field(default=False)),  # also load the file's heads when they match head.*
        *families,
    ], namespace={"section": property(lambda self: getattr(self, self.arch),
                                      doc="The config section of the selected family (model.<arch>).")})
    cls.__module__ = __name__
    return cls


ModelConfig = _model_config_cls()


@dataclass
class HeadConfig:
    # prototype counts K of the heads (one head per entry, multi-head as the paper)
    prototypes: List[int] = field(default_factory=lambda: [8192, 16384, 32768, 65536])
    hidden_dim: int = 2048  # hidden width of each head's MLP
    bottleneck_dim: int = 256  # width before the prototype layer
    nlayers: int = 3  # MLP layers of each head


@dataclass
class LossConfig:
    lam: float = 0.8  # weight of the intact terms; elastic terms get 1 - lam
    student_temp: float = 0.1  # softmax temperature of the students
    teacher_temp: float = 0.07  # teacher temperature after its warm-up
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0 (linear to teacher_temp)
    warmup_teacher_temp_epochs: int = 30  # epochs of the teacher-temperature warm-up
    # Steps instead of epochs (for small data sets, where an epoch is a few dozen steps): when not
    # null, each *_steps / *_step key replaces its *_epochs / *_epoch key (see train/schedules.py).
    warmup_teacher_temp_steps: Optional[int] = None
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations centring the teacher's targets
    same_view_temp: float = 0.1  # temperature of the elastic student's same-view term
    same_view_weight: float = 0.2  # weight of the same-view distillation (elastic from intact)
    koleo_weight: float = 0.1  # weight of the KoLeo regulariser
    ibot_weight: float = 1.0  # weight of the iBOT masked-patch terms
    ibot_start_epoch: int = 30  # epoch from which the iBOT terms are on
    ibot_start_step: Optional[int] = None  # replaces ibot_start_epoch when not null
    mask_sample_probability: float = 0.5  # fraction of the global crops that are masked for iBOT
    mask_ratio_min: float = 0.1  # smallest masked fraction of a masked crop
    mask_ratio_max: float = 0.5  # largest masked fraction of a masked crop
    # Heads and losses form at most this many logits (rows x prototypes) at a time, head by head
    # (poa_hpc/losses/chunked.py): 2**24 fp32 logits are 64 MiB per temporary.  0: one chunk per head.
    chunk_elements: int = 16777216


@dataclass
class _DataFields:
    dataset: str = "imagefolder"  # a registered dataset (poa_hpc/data/registry.py): folder | imagefolder | filelist | digits | shards
    root: str = ""  # folder of images, file list or shard folder (`poa data pack`); unused for digits
    # Labelled images for k-NN evaluation, as <eval_root>/{train,val}/<class>/<image>; empty: data.root
    # (for datasets that carry labels: folder, imagefolder, digits).
    eval_root: str = ""
    global_size: int = 224  # side of the two global crops (px)
    local_size: int = 96  # side of the local crops (px)
    n_local: int = 8  # local crops per image
    global_scale_min: float = 0.32  # smallest area fraction of a global crop
    global_scale_max: float = 1.0  # largest area fraction of a global crop
    local_scale_min: float = 0.05  # smallest area fraction of a local crop
    local_scale_max: float = 0.32  # largest area fraction of a local crop
    # torch: torchvision/PIL in DataLoader workers | dali: nvJPEG decode + augmentations on
    # the GPU | dali_cpu: the same DALI graph on the CPU.  num_workers = DALI's CPU threads.
    loader: str = "torch"
    num_workers: int = 8  # loader processes per rank (DALI: CPU threads)
    digits_size: int = 32  # side length the 8x8 digits are upscaled to


def _data_config_cls() -> type:
    """``data``: the shared keys plus one section per registered dataset that has options (``data.shards``)."""
    sections = [(n, get_dataset(n).config_cls, field(default_factory=get_dataset(n).config_cls))
                for n in dataset_names() if get_dataset(n).config_cls is not None]
    cls = make_dataclass("DataConfig", sections, bases=(_DataFields,))
    cls.__module__ = __name__
    return cls


DataConfig = _data_config_cls()


@dataclass
class OptimConfig:
    epochs: int = 100  # length of the run in epochs
    iters_per_epoch: int = 0  # 0: dataset size // global batch
    batch_size: int = 64  # per process
    base_lr: float = 0.004  # for a global batch of lr_ref_batch, sqrt-scaled
    lr_ref_batch: int = 1024  # global batch at which the lr is base_lr
    min_lr: float = 2e-5  # lr at the end of the cosine schedule
    warmup_epochs: int = 10  # epochs of linear lr warm-up
    warmup_steps: Optional[int] = None  # replaces warmup_epochs when not null
    weight_decay: float = 0.04  # weight decay at step 0 (cosine to weight_decay_end)
    weight_decay_end: float = 0.4  # weight decay at the end
    momentum_teacher: float = 0.992  # EMA momentum of the teacher at step 0 (cosine to final_momentum_teacher)
    final_momentum_teacher: float = 0.9999  # EMA momentum of the teacher at the end
    layer_decay: float = 0.9  # layer-wise lr decay factor
    patch_embed_lr_mult: float = 0.2  # lr multiplier of the patch embedding
    freeze_last_layer_epochs: int = 1  # epochs during which the heads' last layer is frozen
    freeze_last_layer_steps: Optional[int] = None  # replaces freeze_last_layer_epochs when not null
    clip_grad: float = 1.5  # 0 disables
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    schedule_fraction: float = 0.78  # schedules span total_iters / s, cut at total_iters


@dataclass
class WandbConfig:
    project: str = "poa_hpc"  # W&B project of the run
    entity: str = ""  # W&B team or user ("": your default entity)
    mode: str = "online"  # online | offline (files under <output_dir>/wandb, `wandb sync` later) | disabled
    tags: List[str] = field(default_factory=list)  # tags of the W&B run


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # MLflow server or store, e.g. http://host:5000, sqlite:///mlflow.db ("": MLFLOW_TRACKING_URI)
    experiment: str = "poa_hpc"  # MLflow experiment of the run (created if missing)


@dataclass
class TrainConfig:
    output_dir: str = "runs/poa"  # the run folder: config, checkpoints, metrics.jsonl, logger files, plots
    seed: int = 0  # seed of initialisation, data order, augmentations and sub-network sampling
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on CUDA, none on CPU) | bf16 | none
    checkpoint_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 3  # checkpoints kept (newest by step); a resume falls back to an older readable one
    keep_every: int = 0  # > 0: also checkpoint every N steps and keep those for good (evaluation along the run)
    log_every: int = 10  # steps between logged records and log lines
    max_steps: int = 0  # 0: epochs * iters_per_epoch; otherwise stop early at this step
    tensorboard: bool = False  # same as adding tensorboard to train.loggers
    # Metric loggers (poa_hpc/train/loggers/): jsonl (metrics.jsonl, always on) | tensorboard | wandb | mlflow;
    # one logger run across every requeue and restart (ids in <output_dir>/loggers.json)
    loggers: List[str] = field(default_factory=lambda: ["jsonl"])
    # > 0: every N steps (and at the last) weighted k-NN of the teacher's smallest, a middle and the intact
    # sub-network on the evaluation set (as poa eval knn), logged as knn/<sub-network>; 0: off
    eval_every: int = 0
    wandb: WandbConfig = field(default_factory=WandbConfig)  # used when train.loggers includes wandb
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)  # used when train.loggers includes mlflow
    progress: bool = True  # progress bar on a terminal, one line per logged step in a log file
    # Collapse watchdog (poa_hpc/train/watchdog.py): warn once when, for every head, the teacher-target
    # and student entropies of the global [CLS] have been >= (1 - collapse_tolerance) * ln K for
    # collapse_patience consecutive logged steps.  0 disables the warning (the statistics are still logged).
    collapse_tolerance: float = 0.01
    collapse_patience: int = 20  # logged steps of near-uniform entropies before the collapse warning (0: off)
    # Peak TFLOP/s of one device for the logged `mfu` (achieved `tflops` / peak).  0: the dense bf16 peak of the
    # GPU by name (A100 312, H100/H200 989; poa_hpc/perf/flops.py), and no `mfu` on the CPU.
    peak_tflops: float = 0.0


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
    knn_k: int = 20  # neighbours of the weighted k-NN
    knn_temperature: float = 0.07  # temperature of the k-NN vote weights
    image_size: int = 224  # resize for k-NN evaluation (digits: data.digits_size)


@dataclass
class POAConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the backbone: family, backends and one section per family
    head: HeadConfig = field(default_factory=HeadConfig)  # the DINO/iBOT projection heads (one per prototype count)
    loss: LossConfig = field(default_factory=LossConfig)  # the POA loss terms and their schedules
    data: DataConfig = field(default_factory=DataConfig)  # the training images and their multi-crop augmentation
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW, the schedules and the batch
    train: TrainConfig = field(default_factory=TrainConfig)  # the run: output folder, checkpoints, logging, loggers
    dist: DistConfig = field(default_factory=DistConfig)  # the engine that distributes the step
    eval: EvalConfig = field(default_factory=EvalConfig)  # k-NN evaluation (poa eval, poa demo)


_CHOICES = {
    "model.arch": backbone_names(),
    "model.elastic_linear": ("torch", "triton", "auto"),
    "model.attention": ("sdpa", "xformers", "math"),
    "model.drop_path_mode": ("auto", "mask", "subset"),
    "model.rank_sampling": ("per_rank", "shared"),
    "data.dataset": dataset_names(),
    "data.loader": ("torch", "dali", "dali_cpu"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp": ("auto", "bf16", "none"),
    "dist.engine": engine_names(),
    "dist.zero_stage": (1, 2, 3),
    "train.wandb.mode": ("online", "offline", "disabled"),
}


_LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")  # registered in poa_hpc/train/loggers/

# Lengths of schedule phases, in epochs or (when not null) in steps.
_SCHEDULE_LENGTHS = (
    "optim.warmup_epochs", "optim.warmup_steps", "optim.freeze_last_layer_epochs", "optim.freeze_last_layer_steps",
    "loss.warmup_teacher_temp_epochs", "loss.warmup_teacher_temp_steps", "loss.ibot_start_epoch",
    "loss.ibot_start_step",
)


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
    get_backbone(cfg.model.arch).validate(cfg.model.section, cfg)
    if not cfg.head.prototypes or any(k <= 0 for k in cfg.head.prototypes):
        raise ConfigError(f"key 'head.prototypes': expected a non-empty list of positive ints, got {cfg.head.prototypes}")
    if not (0.0 <= cfg.loss.lam <= 1.0):
        raise ConfigError(f"key 'loss.lam': {cfg.loss.lam} must be in [0, 1]")
    if not (0 < cfg.optim.schedule_fraction <= 1.0):
        raise ConfigError(f"key 'optim.schedule_fraction': {cfg.optim.schedule_fraction} must be in (0, 1]")
    if not (0.0 <= cfg.train.collapse_tolerance < 1.0):
        raise ConfigError(f"key 'train.collapse_tolerance': {cfg.train.collapse_tolerance} must be in [0, 1)")
    if cfg.train.collapse_patience < 0:
        raise ConfigError(f"key 'train.collapse_patience': {cfg.train.collapse_patience} must be >= 0 (0 disables)")
    if cfg.train.peak_tflops < 0:
        raise ConfigError(f"key 'train.peak_tflops': {cfg.train.peak_tflops} must be >= 0 (0: the GPU's table value)")
    if cfg.loss.chunk_elements < 0:
        raise ConfigError(f"key 'loss.chunk_elements': {cfg.loss.chunk_elements} must be >= 0 (0: one chunk per head)")
    for key in _SCHEDULE_LENGTHS:
        value = _get(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(f"key '{key}': {value} must be >= 0" + (" (or null)" if key.endswith(("_steps", "_step"))
                                                                      else ""))
    bad = [n for n in cfg.train.loggers if n not in _LOGGERS]
    if bad:
        raise ConfigError(f"key 'train.loggers': unknown logger {bad[0]!r}, expected some of {list(_LOGGERS)}")
    if cfg.train.eval_every < 0:
        raise ConfigError(f"key 'train.eval_every': {cfg.train.eval_every} must be >= 0 (0: off)")
    if cfg.optim.batch_size < 2:
        raise ConfigError(f"key 'optim.batch_size': {cfg.optim.batch_size} must be >= 2 (KoLeo needs neighbours)")
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), base: Optional[dict] = None) -> POAConfig:
    """Defaults <- ``base`` (e.g. saved with a model) <- YAML file <- dotted overrides, validated."""
    schema = OmegaConf.structured(POAConfig)
    layers = [OmegaConf.create(base)] if base else []
    if path is not None:
        p = resolve_config(path)
        try:
            layer = OmegaConf.load(p)
        except Exception as exc:  # yaml syntax errors
            raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from None
        if not isinstance(layer, DictConfig):  # a list or a scalar: nothing to merge into the schema
            raise ConfigError(f"config file '{p}' must be a mapping of sections (model:, optim:, ...), "
                              f"not a {type(OmegaConf.to_container(layer)).__name__}")
        layers.append(layer)
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


def packaged_configs() -> List[str]:
    """Names of the YAML configs shipped with the package (``configs/``, installed as ``poa_hpc.configs``)."""
    from importlib import resources

    return sorted(f.name[:-5] for f in resources.files("poa_hpc.configs").iterdir() if f.name.endswith(".yaml"))


def resolve_config(path: str | Path) -> Path:
    """A config file: ``path`` if it is one, else the packaged config of that name (``vit_l_poa``,
    ``demo_cpu.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.parent == Path("."):
        try:
            return packaged_config(p.name)
        except ConfigError:
            pass
    raise ConfigError(f"config file '{p}' does not exist (nor is it a packaged config: "
                      f"{', '.join(packaged_configs())})")


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


def packaged_config(name: str) -> Path:
    """Path of a YAML shipped in ``configs/`` (installed as ``poa_hpc.configs``), by name with or without
    ``.yaml``."""
    from importlib import resources

    stem = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    p = resources.files("poa_hpc.configs") / stem
    if not p.is_file():
        raise ConfigError(f"packaged config '{name}' not found (packaged: {', '.join(packaged_configs())})")
    return Path(str(p))
