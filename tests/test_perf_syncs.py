"""Host synchronisations per training step, counted through marked ("device") tensors on a CPU run; the
achieved TFLOP/s, MFU and phase times in the same run's metrics."""

import json

import pytest

from backbones import tiny
from poa_hpc.config import load_config
from poa_hpc.perf.syncs import SyncCounter
from poa_hpc.train import trainer as trainer_mod
from poa_hpc.train.meta_arch import POA

DEVICE_KEYS = ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight")


def test_counter_sees_reads_of_device_tensors_only():
    import torch

    c = SyncCounter()
    dev, host = torch.ones(3), torch.ones(3)
    c.mark([dev])
    with c:
        y = dev * 2 + host  # derived from a device tensor: on the device
        float(host.sum()), host.tolist()  # host tensors: no synchronisation
        assert c.count == 0
        float(y.sum())
        y.tolist()
        y[y > 1]  # boolean indexing: nonzero, a data-dependent size
        bool(dev.any())
    assert c.count == 4, c.events


def test_one_host_synchronisation_per_step(tmp_path, monkeypatch):
    """A step reads the device once (the combined all-reduce of loss terms and stop flag); a logged step also
    reads the gradient norm.  (Before the loss terms stayed on the device, every step read each term and
    each Sinkhorn-Knopp row count: 9 reads per step in this configuration, 15 on logged steps.)  The same
    run's metrics carry the achieved TFLOP/s, the MFU against ``train.peak_tflops`` and the phase times."""
    counter = SyncCounter(stack=True)
    starts = []
    real = POA.forward_backward

    def forward_backward(self, batch, *args, **kwargs):
        if not starts:
            counter.mark(list(self.parameters()) + list(self.buffers()))
        counter.mark(batch[k] for k in DEVICE_KEYS if k in batch)
        starts.append(counter.count)
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(POA, "forward_backward", forward_backward)
    cfg = load_config("configs/demo_cpu.yaml", tiny() + [
        "data.n_local=2", "data.num_workers=0", "optim.batch_size=8", "optim.iters_per_epoch=8", "optim.epochs=1",
        "loss.ibot_start_epoch=0", "train.log_every=3", "train.checkpoint_every=1000", "train.progress=false",
        "train.peak_tflops=0.5", f"train.output_dir={tmp_path}"])
    with counter:
        trainer_mod.train(cfg)
    per_step = [b - a for a, b in zip(starts, starts[1:])]  # the last step's interval holds the final checkpoint
    logged = [s for s in range(len(per_step)) if s % 3 == 0]
    for step, n in enumerate(per_step):
        expect = 2 if step in logged else 1
        assert n == expect, (step, n, [e for e in counter.events[starts[step]:starts[step + 1]]])

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6, 7]
    phases = ("data", "teacher", "intact", "elastic", "optimizer", "step")
    for r in records:
        assert all(r[f"time/{p}_ms"] > 0 for p in phases), r
        assert r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 0.5)
        parts = sum(r[f"time/{p}_ms"] for p in phases[:-1])
        assert parts <= r["time/step_ms"] * 1.001  # the parts fit in the step
