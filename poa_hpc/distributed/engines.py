"""Training engines: how parameters are held, gradients reduced, steps taken and state saved.

The trainer talks to one interface and knows nothing of POA's losses here:

* ``setup(model, make_optimizer)`` wraps/shards the model's ``student`` and
  ``teacher`` branches and builds the optimizer over the student;
* ``backward(loss)``, ``clip_and_step(max_norm)``, ``update_teacher(m)``;
* ``save(ckpt_dir, step, meta)`` / ``load(ckpt_dir)`` — atomic, resumable;
  every engine also leaves ``checkpoints/last.pt`` with the full model
  weights, which is what ``poa extract`` reads.

Engines:

``none``  one process.
``ddp``   every rank holds the whole model; after both backward passes of a step
          the gradients are averaged with one flat all-reduce.  (Not
          ``torch.nn.parallel.DistributedDataParallel``: a POA step runs two
          backward passes through different sub-networks per rank, which DDP's
          bucketed hooks would have to be told about with ``no_sync`` and
          ``find_unused_parameters``.)
``fsdp``  FSDP2 ``fully_shard`` per sharding unit of the backbone family (ViT:
          each block), per head and per backbone, for the
          student and the EMA teacher alike (the EMA then runs shard by shard,
          with no gather); sharded checkpoints with torch.distributed.checkpoint,
          loadable on another world size.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from poa_hpc.config import ConfigError, flatten
from poa_hpc.distributed.env import DistContext, barrier
from poa_hpc.train.checkpoint import LAST, atomic_save, load_checkpoint
from poa_hpc.train.optim import clip_grad_norm_tensor

MakeOptimizer = Callable[[Iterable[Tuple[str, nn.Parameter]]], torch.optim.Optimizer]


class Engine:
    name = "none"

    def __init__(self, dist_cfg, ctx: DistContext, amp: str = "none", clip_grad: float = 0.0, micro_batch: int = 1):
        self.cfg = dist_cfg
        self.ctx = ctx
        self.amp = amp
        self.clip_grad = clip_grad
        self.micro_batch = micro_batch
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # ------------------------------------------------------------------ set-up
    def setup(self, model: nn.Module, make_optimizer: MakeOptimizer) -> torch.optim.Optimizer:
        self.model = model
        self.optimizer = make_optimizer(model.student.named_parameters())
        return self.optimizer

    # ------------------------------------------------------------------ step
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce_gradients(self) -> None:
        """Make gradients the average over ranks (no-op where the engine did it in backward)."""

    def clip_and_step(self, max_norm: float):
        """Clip, step, zero the gradients; returns the gradient norm before clipping (a float or a 0-d
        tensor on the device: read it only where it is logged, reading it waits for the device)."""
        self.reduce_gradients()
        norm = clip_grad_norm_tensor(self.model.student.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def update_teacher(self, momentum: float) -> None:
        self.model.update_teacher(momentum)

    # ------------------------------------------------------------------ state
    def full_model_state(self) -> dict:
        return self.model.state_dict()

    def save(self, ckpt_dir: Path, step: int, meta: dict) -> Path:
        """Full checkpoint (model, optimizer, meta) written by rank 0, atomically."""
        path = Path(ckpt_dir) / LAST
        if self.ctx.is_main:
            atomic_save({"step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         **meta}, path)
        barrier()
        return path

    def has_checkpoint(self, ckpt_dir: Path) -> bool:
        return (Path(ckpt_dir) / LAST).is_file()

    def load(self, ckpt_dir: Path, check: Callable[[dict], None] = lambda meta: None) -> dict:
        """Restore model and optimizer; ``check(meta)`` may refuse the checkpoint before anything is loaded.

        Returns the checkpoint's meta (step, config, ...)."""
        ckpt = load_checkpoint(Path(ckpt_dir) / LAST, map_location=self.ctx.device)
        if "optimizer" not in ckpt:
            raise ValueError(f"'{Path(ckpt_dir) / LAST}' holds weights only (an export); it cannot be resumed from")
        check(ckpt)
        self.model.load_state_dict(ckpt.pop("model"))
        self.optimizer.load_state_dict(ckpt.pop("optimizer"))
        return ckpt


class ReplicatedEngine(Engine):
    """``ddp``: whole model on every rank, gradients averaged with one flat all-reduce per step."""

    name = "ddp"

    def setup(self, model: nn.Module, make_optimizer: MakeOptimizer) -> torch.optim.Optimizer:
        if self.ctx.world_size > 1:  # every rank starts from rank 0's weights
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
        return super().setup(model, make_optimizer)

    def reduce_gradients(self) -> None:
        params = list(self.model.student.parameters())
        world = self.ctx.world_size
        if world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.ctx.device)
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [has])
        dist.all_reduce(flat)
        flat[: -len(params)] /= world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype)
            offset += n
        # A parameter no rank used keeps no gradient (AdamW then skips it, as in one process).
        for p, h in zip(params, flat[offset:].tolist()):
            if h == 0:
                p.grad = None


class FSDPEngine(Engine):
    """``fsdp``: FSDP2 ``fully_shard`` over blocks, heads and backbones of student and teacher."""

    name = "fsdp"
    DCP_DIR = "last_dcp"
    #: device mesh to shard over (None: FSDP2's default, the whole world); set by ``poa estimate memory``
    mesh = None

    def mixed_precision(self):
        """bf16 parameters with fp32 gradient reduction on CUDA under bf16 autocast, else None."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.ctx.device.type == "cuda" and self.amp in ("auto", "bf16"):
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return None

    def setup(self, model: nn.Module, make_optimizer: MakeOptimizer) -> torch.optim.Optimizer:
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise ConfigError("key 'dist.engine': fsdp needs a process group; launch with torchrun or `poa train --nproc N`")
        # The backbone returns views of its last activation ([CLS] / patch tokens); POA applies only
        # out-of-place ops to them, which is what FSDP2's warning asks for.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mp = self.mixed_precision()
        kw = {"reshard_after_forward": self.cfg.reshard_after_forward}
        if mp is not None:
            kw["mp_policy"] = mp
        if self.mesh is not None:
            kw["mesh"] = self.mesh
        student_kw = kw
        for branch in (model.student, model.teacher):
            # The teacher has no backward: its units always reshard after forward (else dist.reshard_after_forward=false
            # would leave them unsharded, and the EMA would meet whole teacher and sharded student parameters).
            kw = student_kw if branch is model.student else {**student_kw, "reshard_after_forward": True}
            bb = branch.backbone
            bb.sync_skipped_blocks = True  # per-rank sub-networks of different depth: keep collectives aligned
            # The family spec names the units (ViT: blocks; Swin: blocks and patch merges; ...).
            for unit in model.spec.sharding_units(bb):
                block = bb.get_submodule(unit)
                if branch is model.student and self.cfg.activation_checkpointing:
                    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

                    block = checkpoint_wrapper(block)
                    bb.set_submodule(unit, block)
                if self.cfg.compile:
                    block.compile()
                fully_shard(block, **kw)
            for head in branch.heads:
                fully_shard(head, **kw)
            # The backbone root owns patch embed, tokens and final norm.  It reshards after forward
            # too, so teacher and student stay sharded alike and the EMA runs shard by shard.
            fully_shard(bb, **{**kw, "reshard_after_forward": True})
        return super().setup(model, make_optimizer)

    def full_model_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.model),
                "optim": get_optimizer_state_dict(self.model.student, self.optimizer)}

    def save(self, ckpt_dir: Path, step: int, meta: dict) -> Path:
        import torch.distributed.checkpoint as dcp

        ckpt_dir = Path(ckpt_dir)
        final, tmp, old = ckpt_dir / self.DCP_DIR, ckpt_dir / (self.DCP_DIR + ".tmp"), ckpt_dir / (self.DCP_DIR + ".old")
        if self.ctx.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        dcp.save(self._state(), checkpoint_id=str(tmp))
        full = self.full_model_state()  # collective: every rank takes part
        if self.ctx.is_main:
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}))
            # Swap directories: a crash leaves either the old or the new one (load() looks at both).
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            # Weights-only export of the full model for `poa extract`.
            atomic_save({"step": step, "model": full, **meta}, ckpt_dir / LAST)
        barrier()
        return final

    def _dcp_dir(self, ckpt_dir: Path) -> Optional[Path]:
        for name in (self.DCP_DIR, self.DCP_DIR + ".old"):
            d = Path(ckpt_dir) / name
            if (d / "meta.json").is_file():
                return d
        return None

    def has_checkpoint(self, ckpt_dir: Path) -> bool:
        return self._dcp_dir(ckpt_dir) is not None

    def load(self, ckpt_dir: Path, check: Callable[[dict], None] = lambda meta: None) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        d = self._dcp_dir(ckpt_dir)
        if d is None:
            raise ValueError(f"no sharded checkpoint (checkpoints/{self.DCP_DIR}) under '{ckpt_dir}'")
        meta = json.loads((d / "meta.json").read_text())
        check(meta)
        state = self._state()  # templates; the optimizer's is filled for every parameter
        saved = set(dcp.FileSystemReader(str(d)).read_metadata().state_dict_metadata)
        # Parameters that had no optimizer state when saved (never stepped yet, e.g. the mask
        # token before iBOT starts) must have none after loading either, or AdamW's step
        # count and bias correction would differ from the uninterrupted run.
        fresh = {fqn for fqn in self._param_fqns() if not any(k.startswith(f"optim.state.{fqn}.") for k in saved)}
        missing = [k for k in flatten(state["model"], "model.") if k not in saved]
        if missing:
            raise ValueError(f"sharded checkpoint '{d}' lacks {len(missing)} entries this model needs, e.g. {missing[:3]}")
        dcp.load(state, checkpoint_id=str(d), planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model.student, self.optimizer, state["optim"])
        for fqn, p in self._named_student_params():
            if fqn in fresh:
                self.optimizer.state.pop(p, None)
        return meta

    def _named_student_params(self):
        for name, p in self.model.student.named_parameters():
            yield name.replace("_checkpoint_wrapped_module.", ""), p

    def _param_fqns(self):
        return [n for n, _ in self._named_student_params()]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedEngine(Engine):
    """``deepspeed``: ZeRO stage 1, 2 or 3 (``dist.zero_stage``) for the student.

    Every student branch forward runs through the DeepSpeed engine (its per-forward
    bookkeeping is what makes two backward passes per step accumulate, and what
    ZeRO-3's parameter gathering hangs on); the intact backward is marked as not an
    accumulation boundary, the elastic one as the boundary.  The teacher is a plain
    replica under ZeRO-1/2 (parameters are whole on every rank) and a second ZeRO-3
    engine without optimizer under ZeRO-3, updated shard by shard.  Checkpoints are
    DeepSpeed's own (one tag per step; ``latest`` moves only after a complete
    save), plus ``last.pt`` with the full weights for ``poa extract``.  A ZeRO-3
    teacher is saved as per-rank shards: resume it on the same world size.
    """

    name = "deepspeed"
    DS_DIR = "deepspeed"

    def _ds_config(self) -> dict:
        base = {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.clip_grad,
            "zero_allow_untested_optimizer": True,  # POA's AdamW with layer-decay groups
            "zero_optimization": {"stage": int(self.cfg.zero_stage)},
            "steps_per_print": 10**9,
        }
        return _merge(base, dict(self.cfg.deepspeed))

    def setup(self, model: nn.Module, make_optimizer: MakeOptimizer) -> torch.optim.Optimizer:
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("key 'dist.engine': deepspeed is not installed (pip install 'poa_hpc[dev]' or deepspeed)") from None
        if not dist.is_initialized():
            raise ConfigError("key 'dist.engine': deepspeed needs a process group; launch with torchrun or `poa train --nproc N`")
        self.model = model
        self.stage = int(self.cfg.zero_stage)
        model.student.backbone.sync_skipped_blocks = True
        model.teacher.backbone.sync_skipped_blocks = True
        optimizer = make_optimizer(model.student.named_parameters())
        ds_cfg = self._ds_config()
        self.ds, self.optimizer_wrapper, _, _ = deepspeed.initialize(model=model.student, optimizer=optimizer, config=ds_cfg)
        self.optimizer = optimizer  # POA's schedules set lr/wd on its groups; DeepSpeed steps through it
        model.student_call = self.ds.__call__  # a bound method: not registered as a sub-module
        self.teacher_ds = None
        if self.stage == 3:
            t_cfg = {k: v for k, v in ds_cfg.items() if k not in ("gradient_clipping", "zero_allow_untested_optimizer")}
            self.teacher_ds, _, _, _ = deepspeed.initialize(model=model.teacher, config=t_cfg)
            model.teacher_call = self.teacher_ds.__call__
        self._backwards = 0
        return optimizer

    def backward(self, loss: torch.Tensor) -> None:
        # The intact branch's backward only accumulates; the elastic one closes the step.
        self.ds.set_gradient_accumulation_boundary(self._backwards % 2 == 1)
        self.ds.backward(loss)
        self._backwards += 1

    def clip_and_step(self, max_norm: float) -> float:
        self.ds.step()  # clipping by the config's gradient_clipping (= optim.clip_grad)
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def update_teacher(self, momentum: float) -> None:
        if self.stage < 3:
            return self.model.update_teacher(momentum)
        # Identically shaped student and teacher are partitioned alike: EMA on the local shards.
        t = [p.ds_tensor for p in self.model.teacher.parameters()]
        s = [p.ds_tensor.detach() for p in self.model.student.parameters()]
        with torch.no_grad():
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def full_model_state(self) -> dict:
        if self.stage < 3:
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        import deepspeed

        params = list(self.model.student.parameters()) + list(self.model.teacher.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def save(self, ckpt_dir: Path, step: int, meta: dict) -> Path:
        ckpt_dir = Path(ckpt_dir)
        d = ckpt_dir / self.DS_DIR
        tag = f"step{step:08d}"
        client = {"poa_meta": {"step": step, **meta}}
        if self.stage < 3:
            client["teacher"] = self.model.teacher.state_dict()
        self.ds.save_checkpoint(str(d), tag=tag, client_state=client, save_latest=False)
        if self.stage == 3:  # client state is rank 0's only: each rank writes its teacher shard
            shard = [p.ds_tensor.detach().cpu().clone() for p in self.model.teacher.parameters()]
            torch.save(shard, d / tag / f"teacher_shard_rank{self.ctx.rank:05d}.pt")
        barrier()
        full = self.full_model_state()
        if self.ctx.is_main:
            latest = d / "latest"
            tmp = d / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, latest)  # the step is complete once every rank wrote its part
            for old in d.glob("step*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
            atomic_save({"step": step, "model": full, **meta}, ckpt_dir / LAST)
        barrier()
        return d / tag

    def has_checkpoint(self, ckpt_dir: Path) -> bool:
        return (Path(ckpt_dir) / self.DS_DIR / "latest").is_file()

    def load(self, ckpt_dir: Path, check: Callable[[dict], None] = lambda meta: None) -> dict:
        d = Path(ckpt_dir) / self.DS_DIR
        tag = (d / "latest").read_text().strip()
        _, client = self.ds.load_checkpoint(str(d), tag=tag)
        if client is None:
            raise ValueError(f"DeepSpeed checkpoint '{d / tag}' could not be loaded")
        meta = client["poa_meta"]
        check(meta)  # (DeepSpeed has loaded its state by now; a refused checkpoint still stops the run)
        if self.stage < 3:
            self.model.teacher.load_state_dict(client["teacher"])
        else:
            shard = torch.load(d / tag / f"teacher_shard_rank{self.ctx.rank:05d}.pt", weights_only=False)
            with torch.no_grad():
                for p, t in zip(self.model.teacher.parameters(), shard):
                    p.ds_tensor.copy_(t)
        return meta


ENGINES = {"none": Engine, "ddp": ReplicatedEngine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}


def build_engine(dist_cfg, ctx: DistContext, amp: str, clip_grad: float = 0.0, micro_batch: int = 1) -> Engine:
    if dist_cfg.engine == "none" and ctx.world_size > 1:
        raise ConfigError(f"key 'dist.engine': 'none' runs one process, but WORLD_SIZE={ctx.world_size}; "
                         f"use dist.engine=ddp or fsdp")
    return ENGINES[dist_cfg.engine](dist_cfg, ctx, amp, clip_grad, micro_batch)
