"""Counting host synchronisations of device tensors, also where there is no device.

On a GPU every read of a device value by the host (``.item()``, ``float()``, ``bool()``, ``.tolist()``,
``.cpu()``, an op whose output size depends on the data such as ``nonzero``) waits for the device
to drain its queue; ``torch.cuda.set_sync_debug_mode`` reports them there.  On a CPU run every tensor
is a host tensor, so :class:`SyncCounter` follows which tensors *would* live on the device: those
:meth:`~SyncCounter.mark`-ed (the model's parameters, the batch moved to the device) and every tensor
an op computes from a marked one; a read of a marked tensor counts as a synchronisation.  (Optimizer
step counters, made from Python numbers, stay unmarked, as they stay on the host on a GPU.)
"""

from __future__ import annotations

import traceback
import weakref
from typing import Iterable, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["SyncCounter"]

# ops that read device values on the host, or whose output size depends on them
_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal",
             "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.nonzero_static",
             "aten.masked_scatter"}
# indexing with a boolean mask: the number of selected elements is read first
_INDEX_OPS = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
_READS = ("tolist", "numpy", "cpu")  # Tensor methods that copy to the host without dispatching on a CPU tensor


def _storage(t: torch.Tensor):
    t = getattr(t, "_local_tensor", t)
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class SyncCounter(TorchDispatchMode):
    """``count`` host reads of marked ("device") tensors while active; ``events`` holds (what, where) of each."""

    def __init__(self, stack: bool = False):
        super().__init__()
        self.marked = set()
        self.count = 0
        self.events: List[Tuple[str, str]] = []
        self.stack = stack
        self._saved = {}

    def mark(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            st = _storage(t) if isinstance(t, torch.Tensor) else None
            if st is not None and st._cdata not in self.marked:
                self.marked.add(st._cdata)
                weakref.finalize(st, self.marked.discard, st._cdata)  # the address may be reused once freed

    def is_marked(self, t: torch.Tensor) -> bool:
        st = _storage(t) if isinstance(t, torch.Tensor) else None
        return st is not None and st._cdata in self.marked

    def _record(self, what: str) -> None:
        self.count += 1
        where = "".join(traceback.format_stack(limit=8)[:-2]) if self.stack else ""
        self.events.append((what, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        device = any(self.is_marked(t) for t in flat if isinstance(t, torch.Tensor))
        packet = str(func.overloadpacket)
        if device and (packet in _SYNC_OPS or (packet in _INDEX_OPS and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in flat[1:]))):
            self._record(str(func))
        out = func(*args, **(kwargs or {}))
        if device:
            self.mark(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out

    def __enter__(self):
        counter = self
        for name in _READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def read(t, *a, _name=name, _original=original, **k):
                if counter.is_marked(t):
                    counter._record(f"Tensor.{_name}")
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)
