"""Measure the peak memory of one real POA step on the CPU, from the operating system's side.

Run as ``python tests/memory_probe.py OUT.json [key=value ...]`` (one process, engine none) or under
torchrun (gloo, dist.engine=fsdp).  glibc is told (``MALLOC_MMAP_THRESHOLD_``, set by the caller) to
map every allocation above 64 KiB on its own, so freed tensors go back to the system and the resident
set follows the live tensors.  After a warm-up step (optimizer state created, allocator warm), the
peak resident set of the next step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``)
minus the resident set before it, plus the bytes of the tensors alive before it (parameters,
optimizer state, batch: counted from the objects themselves), is the step's peak of live tensor
bytes as the system saw it.  Nothing here uses the estimator's tracking.
"""

import json
import os
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(out: str, overrides):
    import gc

    import torch

    from poa_hpc.config import load_config
    from poa_hpc.distributed.engines import build_engine
    from poa_hpc.distributed.env import init_distributed, shutdown
    from poa_hpc.models.subnets import Subnet
    from poa_hpc.perf.fake import synthetic_batch
    from poa_hpc.train.optim import apply_schedules, build_optimizer
    from poa_hpc.train.trainer import build_model

    torch.set_num_threads(1)
    cfg = load_config("configs/demo_cpu.yaml", overrides)
    ctx = init_distributed("cpu")
    model = build_model(cfg)
    engine = build_engine(cfg.dist, ctx, cfg.train.amp, cfg.optim.clip_grad, cfg.optim.batch_size)
    opt = engine.setup(model, lambda named: build_optimizer(named, cfg))
    apply_schedules(opt, 1e-4, 0.04, 1e-4)
    sub = Subnet.parse(os.environ["POA_PROBE_SUB"])
    n_masked = int(os.environ["POA_PROBE_MASKED"])
    batch = synthetic_batch(cfg, None, n_masked, device="cpu", generator=torch.Generator().manual_seed(ctx.rank))

    def step():
        model.forward_backward(batch, sub, 0.04, ibot=True, backward=engine.backward)
        engine.clip_and_step(cfg.optim.clip_grad)
        engine.update_teacher(0.999)

    step()  # warm-up: AdamW's state exists from now on, as in every later step
    gc.collect()
    seen, alive = set(), 0
    tensors = list(model.state_dict().values()) + list(batch.values())
    tensors += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for t in tensors:
        t = getattr(t, "_local_tensor", t)
        st = t.untyped_storage()
        if st.data_ptr() not in seen and st.nbytes():
            seen.add(st.data_ptr())
            alive += st.nbytes()
    rss0 = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step()
    peak = _status("VmHWM") - rss0 + alive
    with open(f"{out}.{ctx.rank}", "w") as f:
        json.dump({"peak": peak, "alive_before": alive, "rss_before": rss0}, f)
    if ctx.distributed:
        shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
