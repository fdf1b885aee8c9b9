"""Training engines: how parameters are held, gradients reduced, steps taken and state saved.

The trainer talks to one interface and knows nothing of POA's losses here:

* ``setup(model, make_optimizer)`` wraps/shards the model's ``student`` and
  ``teacher`` branches and builds the optimizer over the student;
* ``backward(loss)``, ``clip_and_step(max_norm)``, ``update_teacher(m)``;
* ``save(ckpt_dir, step, meta, keep_last, keep_every)`` / ``verify(ckpt_dir, step)`` /
  ``load(ckpt_dir, check, step)`` — a history of atomic, resumable checkpoints
  (layout in :mod:`poa_hpc.checkpoint.layout`); every engine's
  ``checkpoints/step_XXXXXXXX.pt`` holds the full model weights (``last.pt``
  points to the newest), which is what ``poa extract`` reads.

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
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from poa_hpc.checkpoint.layout import (
    atomic_save,
    committed_steps,
    describe_write_error,
    last_step,
    point_last,
    remove_path,
    retained,
    step_file,
)
from poa_hpc.checkpoint.manifest import manifest_path, write_manifest
from poa_hpc.config import flatten
from poa_hpc.distributed.env import DistContext, barrier, gather_objects
from poa_hpc.distributed.registry import engine_class
from poa_hpc.errors import ConfigError, OutputWriteError
from poa_hpc.files import atomic_write_text

MakeOptimizer = Callable[[Iterable[Tuple[str, nn.Parameter]]], torch.optim.Optimizer]
log = logging.getLogger("poa_hpc.train")


def _read_error(path: Path, exc: BaseException) -> str:
    """``'path' could not be read (Type: first sentence of the message; N bytes)``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    try:
        size = f"; {path.stat().st_size} bytes"
    except OSError:
        size = ""
    return f"'{path}' could not be read ({type(exc).__name__}: {text}{size})"


def _check_step_file(path: Path) -> Optional[str]:
    """Cheap readability check of a committed step file: its zip index and pickles (tensors memory-mapped)."""
    if not path.is_file():
        return f"'{path}' is missing"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:
        return _read_error(path, exc)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
        return f"'{path}' is not a poa_hpc training checkpoint"
    return None


def clip_grad_norm_tensor(params: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> torch.Tensor:
    """Total L2 norm of the gradients (before clipping) as a 0-d tensor on their device (no host
    synchronisation); clips if ``max_norm > 0``.

    Uses the foreach kernels where torch supports them for the device (``foreach=None``:
    CUDA uses them, other devices silently fall back).  Parameters without grad are ignored.
    """
    if isinstance(params, torch.Tensor):
        params = [params]
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm is not None and max_norm > 0 and math.isfinite(max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=None)


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

    # A step's checkpoint: the engine's resume state of that step (``_save_state``: nothing more for
    # none/ddp, a DCP folder for fsdp, a DeepSpeed tag), then the step file written by rank 0 last,
    # which commits the step; then ``last.pt`` moves to it and older steps are pruned.

    def _step_payload(self, step: int, meta: dict) -> Optional[dict]:
        """The step file's content (on rank 0; collective for engines that gather the full state)."""
        if not self.ctx.is_main:
            return None
        return {"step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **meta}

    def _save_state(self, ckpt_dir: Path, step: int, meta: dict) -> None:
        """Write this step's resume state beyond the step file (sharded engines, every rank)."""

    def _state_paths(self, ckpt_dir: Path, step: int) -> List[Path]:
        """Where this engine keeps the resume state of ``step`` beyond the step file."""
        return []

    def _states_on_disk(self, ckpt_dir: Path) -> List[Tuple[Optional[int], Path]]:
        """(step, path) of every resume state folder present (``None``: a folder of no step)."""
        return []

    def _write_phase(self, ckpt_dir: Path, step: int, fn: Optional[Callable[[], object]]) -> None:
        """Run one write phase of a save (``fn`` on the ranks that have one) and agree on its outcome:
        if it failed on any rank, every rank raises :class:`OutputWriteError`, naming folder and cause."""
        err = None
        if fn is not None:
            try:
                fn()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: B036 - DCP's CheckpointException is a BaseException
                err = describe_write_error(exc)
        errors = gather_objects(err)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, cause = failed[0]
            kept = [s for s in committed_steps(ckpt_dir) if s != step]
            raise OutputWriteError(
                f"the checkpoint of step {step} could not be written to '{ckpt_dir}': {cause}"
                + (f" (on rank {rank})" if len(errors) > 1 else "")
                + (f"; the previous checkpoints are intact (newest: step {kept[0]})" if kept and kept[0] >= 0 else "")
                + "; free space or fix the folder, then continue with --resume")

    def save(self, ckpt_dir: Path, step: int, meta: dict, keep_last: int = 3, keep_every: int = 0) -> Path:
        """Checkpoint ``step`` (collective): resume state, then the step file (rank 0, atomically),
        then ``last.pt`` -> it, then pruning to the newest ``keep_last`` steps plus every
        ``keep_every``-th.  A write failure on any rank raises :class:`OutputWriteError` on every
        rank and leaves the committed checkpoints as they were."""
        ckpt_dir = Path(ckpt_dir)
        path = step_file(ckpt_dir, step)
        main = self.ctx.is_main

        def prepare() -> None:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if path.exists():  # saving a step again (after a fallback): uncommit it before rewriting its state
                path.unlink()
            remove_path(manifest_path(ckpt_dir, step))

        self._write_phase(ckpt_dir, step, prepare if main else None)
        self._save_state(ckpt_dir, step, meta)
        payload = self._step_payload(step, meta)

        def commit() -> None:
            atomic_save(payload, path)  # noqa: F821 (deleted after the write phase, not before)
            self._committed(ckpt_dir, step)
            point_last(ckpt_dir, step)
            # last: every file's hash, so resume detects bytes changed after writing
            write_manifest(ckpt_dir, step, [path, *self._state_paths(ckpt_dir, step)])

        self._write_phase(ckpt_dir, step, commit if main else None)
        del payload
        if main:
            try:
                self.prune(ckpt_dir, keep_last, keep_every)
            except OSError as exc:  # a checkpoint that could not be deleted costs space, not correctness
                log.warning("pruning old checkpoints in %s failed: %s", ckpt_dir, describe_write_error(exc))
        barrier()
        return path

    def _committed(self, ckpt_dir: Path, step: int) -> None:
        """Hook run on rank 0 right after the step file is written (DeepSpeed moves its ``latest``)."""

    def prune(self, ckpt_dir: Path, keep_last: int, keep_every: int = 0) -> List[int]:
        """Delete the committed steps :func:`retained` does not keep (step file first: uncommit, then
        the state) and leftovers of interrupted saves; returns the deleted steps."""
        ckpt_dir = Path(ckpt_dir)
        steps = committed_steps(ckpt_dir)
        if not steps:
            return []
        keep = retained(steps, keep_last, keep_every, protect=[last_step(ckpt_dir)])
        dropped = [s for s in steps if s not in keep]
        for s in dropped:
            remove_path(step_file(ckpt_dir, s))
            remove_path(manifest_path(ckpt_dir, s))
            for p in self._state_paths(ckpt_dir, s):
                remove_path(p)
        for s, p in self._states_on_disk(ckpt_dir):
            if s not in keep:  # not committed (an interrupted save)
                remove_path(p)
        for p in ckpt_dir.glob("*.tmp"):
            remove_path(p)
        return dropped

    def checkpoint_steps(self, ckpt_dir: Path) -> List[int]:
        """Committed checkpoints, newest first."""
        return committed_steps(ckpt_dir)

    def checkpoint_path(self, ckpt_dir: Path, step: int) -> Path:
        """What to name in messages about the checkpoint of ``step``."""
        return step_file(ckpt_dir, step)

    def verify(self, ckpt_dir: Path, step: int) -> Optional[str]:
        """Why the checkpoint of ``step`` cannot be resumed from on this rank (``None``: it can).

        Here the whole file is read (it is loaded next anyway and kept for :meth:`load`)."""
        path = step_file(ckpt_dir, step)
        self._verified = None
        try:
            ckpt = torch.load(path, map_location=self.ctx.device, weights_only=False)
        except Exception as exc:
            return _read_error(path, exc)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt or "step" not in ckpt:
            return f"'{path}' is not a poa_hpc training checkpoint"
        if "optimizer" not in ckpt:
            return f"'{path}' holds weights only (an export of a sharded engine's run); it cannot be resumed from"
        self._verified = (path, ckpt)
        return None

    def _pick(self, ckpt_dir: Path, step: Optional[int]) -> int:
        if step is not None:
            return step
        steps = self.checkpoint_steps(ckpt_dir)
        if not steps:
            raise ValueError(f"no checkpoint in '{ckpt_dir}'")
        return steps[0]

    def load(self, ckpt_dir: Path, check: Callable[[dict], None] = lambda meta: None,
             step: Optional[int] = None) -> dict:
        """Restore model and optimizer from the checkpoint of ``step`` (default: the newest);
        ``check(meta)`` may refuse it before anything is loaded.  Returns the checkpoint's meta."""
        step = self._pick(ckpt_dir, step)
        verified = getattr(self, "_verified", None)
        if verified is None or verified[0] != step_file(ckpt_dir, step):
            problem = self.verify(ckpt_dir, step)
            if problem:
                raise ValueError(problem)
        ckpt = self._verified[1]
        self._verified = None
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

    def _step_payload(self, step: int, meta: dict) -> Optional[dict]:
        full = self.full_model_state()  # collective: every rank takes part
        # Weights-only export of the full model (for `poa extract`); resuming reads the DCP folder.
        return {"step": step, "model": full, **meta} if self.ctx.is_main else None

    def _dcp_dir(self, ckpt_dir: Path, step: int) -> Path:
        return Path(ckpt_dir) / f"step_{step:08d}_dcp"

    def _save_state(self, ckpt_dir: Path, step: int, meta: dict) -> None:
        import torch.distributed.checkpoint as dcp

        final = self._dcp_dir(ckpt_dir, step)
        tmp = final.with_name(final.name + ".tmp")
        self._write_phase(ckpt_dir, step, (lambda: remove_path(tmp)) if self.ctx.is_main else None)
        # Every rank writes its shards into the temporary folder; DCP reports a failed write on all ranks.
        self._write_phase(ckpt_dir, step, lambda: dcp.save(self._state(), checkpoint_id=str(tmp)))

        def finish() -> None:  # the folder is complete: meta.json, then its final name
            with open(tmp / "meta.json", "w") as f:
                f.write(json.dumps({"step": step, **meta}))
                f.flush()
                os.fsync(f.fileno())
            remove_path(final)  # a state of this step from an interrupted or unreadable save
            os.replace(tmp, final)

        self._write_phase(ckpt_dir, step, finish if self.ctx.is_main else None)

    def _state_paths(self, ckpt_dir: Path, step: int) -> List[Path]:
        return [self._dcp_dir(ckpt_dir, step)]

    def _states_on_disk(self, ckpt_dir: Path) -> List[Tuple[Optional[int], Path]]:
        out: List[Tuple[Optional[int], Path]] = []
        if Path(ckpt_dir).is_dir():
            for p in Path(ckpt_dir).iterdir():
                m = re.match(r"^step_(\d{8,})_dcp$", p.name)
                if m:
                    out.append((int(m.group(1)), p))
        return out

    def checkpoint_path(self, ckpt_dir: Path, step: int) -> Path:
        return self._dcp_dir(ckpt_dir, step)

    def verify(self, ckpt_dir: Path, step: int) -> Optional[str]:
        """meta.json, DCP's metadata, and every shard file at least as long as the metadata says;
        plus the step file's index (its tensors are not read)."""
        import torch.distributed.checkpoint as dcp

        d = self._dcp_dir(ckpt_dir, step)
        try:
            json.loads((d / "meta.json").read_text())
            md = dcp.FileSystemReader(str(d)).read_metadata()
        except Exception as exc:
            return f"sharded checkpoint '{d}' is incomplete or unreadable ({type(exc).__name__}: {exc})"
        need = {}
        for info in (md.storage_data or {}).values():
            rel, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
            if rel is not None:
                need[rel] = max(need.get(rel, 0), end)
        for rel, end in sorted(need.items()):
            f = d / rel
            size = f.stat().st_size if f.is_file() else -1
            if size < end:
                return (f"sharded checkpoint '{d}' is incomplete: '{rel}' is "
                        + ("missing" if size < 0 else f"{size} bytes, its metadata needs {end}"))
        return _check_step_file(step_file(ckpt_dir, step))

    def load(self, ckpt_dir: Path, check: Callable[[dict], None] = lambda meta: None,
             step: Optional[int] = None) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        d = self._dcp_dir(ckpt_dir, self._pick(ckpt_dir, step))
        if not (d / "meta.json").is_file():
            raise ValueError(f"no sharded checkpoint '{d}'")
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


class _DeferredWrites:
    """A DeepSpeed checkpoint engine whose writes (save, makedirs, create, commit) record their first
    error instead of raising it in the middle of DeepSpeed's collectives; ``raise_first`` raises it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.error: Optional[BaseException] = None

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in ("save", "makedirs", "create", "commit") or not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.error is not None:
                return None  # the save failed already: write nothing more
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                self.error = exc
                return None

        return call

    def raise_first(self) -> None:
        if self.error is not None:
            raise self.error


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

    def _tag_dir(self, ckpt_dir: Path, step: int) -> Path:
        d = Path(ckpt_dir) / self.DS_DIR
        return d / f"step{step:08d}"

    def _save_state(self, ckpt_dir: Path, step: int, meta: dict) -> None:
        tag_dir = self._tag_dir(ckpt_dir, step)
        client = {"poa_meta": {"step": step, **meta}}
        if self.stage < 3:
            client["teacher"] = self.model.teacher.state_dict()
        self._write_phase(ckpt_dir, step, (lambda: remove_path(tag_dir)) if self.ctx.is_main else None)

        def write() -> None:
            # DeepSpeed's save has barriers between its writes: a write that raised on one rank would
            # leave the others in the next barrier until dist.timeout_s.  Its file writes are deferred
            # instead (the first error is raised once save_checkpoint has returned on every rank), so
            # every rank reaches this phase's agreement and all stop at once with exit code 4.
            deferred = _DeferredWrites(self.ds.checkpoint_engine)
            self.ds.checkpoint_engine = deferred
            try:
                self.ds.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name, client_state=client, save_latest=False)
            finally:
                self.ds.checkpoint_engine = deferred.inner
            deferred.raise_first()
            if self.stage == 3:  # client state is rank 0's only: each rank writes its teacher shard
                shard = [p.ds_tensor.detach().cpu().clone() for p in self.model.teacher.parameters()]
                torch.save(shard, tag_dir / f"teacher_shard_rank{self.ctx.rank:05d}.pt")

        self._write_phase(ckpt_dir, step, write)  # the tag is complete once every rank wrote its part

    def _step_payload(self, step: int, meta: dict) -> Optional[dict]:
        full = self.full_model_state()  # collective under ZeRO-3
        return {"step": step, "model": full, **meta} if self.ctx.is_main else None

    def _committed(self, ckpt_dir: Path, step: int) -> None:
        d = Path(ckpt_dir) / self.DS_DIR  # DeepSpeed's own pointer (zero_to_fp32.py reads it)
        atomic_write_text(d / "latest", self._tag_dir(ckpt_dir, step).name)

    def _state_paths(self, ckpt_dir: Path, step: int) -> List[Path]:
        return [self._tag_dir(ckpt_dir, step)]

    def _states_on_disk(self, ckpt_dir: Path) -> List[Tuple[Optional[int], Path]]:
        d = Path(ckpt_dir) / self.DS_DIR
        if not d.is_dir():
            return []
        return [(int(p.name[4:]), p) for p in d.iterdir() if re.match(r"^step\d{8,}$", p.name) and p.is_dir()]

    def checkpoint_path(self, ckpt_dir: Path, step: int) -> Path:
        return self._tag_dir(ckpt_dir, step)

    def verify(self, ckpt_dir: Path, step: int) -> Optional[str]:
        """The tag folder holds the model states and every file's index reads (tensors are not read)."""
        t = self._tag_dir(ckpt_dir, step)
        files = sorted(t.glob("*.pt")) if t.is_dir() else []
        if not any(f.name.endswith("model_states.pt") for f in files):
            return f"DeepSpeed checkpoint '{t}' is incomplete (no model states)"
        for f in files:
            try:
                torch.load(f, map_location="cpu", weights_only=False, mmap=True)
            except Exception as exc:
                return f"DeepSpeed checkpoint file {_read_error(f, exc)}"
        return _check_step_file(step_file(ckpt_dir, step))

    def load(self, ckpt_dir: Path, check: Callable[[dict], None] = lambda meta: None,
             step: Optional[int] = None) -> dict:
        t = self._tag_dir(ckpt_dir, self._pick(ckpt_dir, step))
        _, client = self.ds.load_checkpoint(str(t.parent), tag=t.name)
        if client is None:
            raise ValueError(f"DeepSpeed checkpoint '{t}' could not be loaded")
        meta = client["poa_meta"]
        check(meta)  # (DeepSpeed has loaded its state by now; a refused checkpoint still stops the run)
        if self.stage < 3:
            self.model.teacher.load_state_dict(client["teacher"])
        else:
            shard = torch.load(t / f"teacher_shard_rank{self.ctx.rank:05d}.pt", weights_only=False)
            with torch.no_grad():
                for p, v in zip(self.model.teacher.parameters(), shard):
                    p.ds_tensor.copy_(v)
        return meta


def build_engine(dist_cfg, ctx: DistContext, amp: str, clip_grad: float = 0.0, micro_batch: int = 1) -> Engine:
    if dist_cfg.engine == "none" and ctx.world_size > 1:
        raise ConfigError(f"key 'dist.engine': 'none' runs one process, but WORLD_SIZE={ctx.world_size}; "
                         f"use dist.engine=ddp or fsdp")
    return engine_class(dist_cfg.engine)(dist_cfg, ctx, amp, clip_grad, micro_batch)
