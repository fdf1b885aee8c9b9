"""POA training across two Slurm nodes: the cluster of `slurm/local_cluster.sh start --nodes 2`.

Two slurmd "nodes", poa-node01 (10.233.0.11) and poa-node02 (10.233.0.12), each in its own network
namespace (a veth pair on a private bridge) and UTS namespace (its own hostname), one slurmctld on
this machine (the module fixture `slurm_two_nodes`, tests/slurm_cluster.py). Every job runs one
task per node: the node list is `poa-node[01-02]`, the master is poa-node01 (the first host of
`distributed/env.py`'s expansion, resolved inside the nodes), and gloo talks over the veth pairs.

* the same run under `slurm/train_srun.sbatch` and `slurm/train_torchrun.sbatch` (c10d rendezvous on
  poa-node01) equals one process with the same global batch (the contract of tests/test_distributed.py);
* every process of poa-node02 (slurmd, job step, rank 1) SIGKILLed mid-run under `poa submit --nodes 2`:
  the step ends, the job requeues itself, runs again once the node is back, resumes from the newest
  checkpoint and equals the same one-process run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backbones import tiny
from poa_hpc.cli import main
from poa_hpc.train.checkpoint import load_checkpoint
from runs import ENV, RUN, SAME_AS_ONE_PROCESS, assert_same_run, assert_same_weights, metrics, train_cmd

pytestmark = pytest.mark.slurm
pytest.importorskip("submitit")

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
# 12 steps of 16 images (one process) or 2 x 8 (one task per node), a checkpoint every 4 steps.
CONTRACT = [*tiny("vit"), *RUN, *SAME_AS_ONE_PROCESS, "model.vit.drop_path_rate=0.0", "model.rank_sampling=shared",
            "optim.epochs=3", "train.checkpoint_every=4", "train.device=cpu"]
PER_TASK = ["dist.engine=ddp", "optim.batch_size=8"]


@pytest.fixture(autouse=True)
def _one_thread_per_task(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # jobs inherit the submitter's environment
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run in one process (started at once; ``wait()`` for its folder and metrics)."""
    out = tmp_path_factory.mktemp("one_process")
    env = {k: v for k, v in ENV.items() if not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))}
    p = subprocess.Popen(train_cmd(out, 1, "none", CONTRACT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, cwd=REPO)

    class Run:
        def wait(self):
            text, _ = p.communicate(timeout=600)
            assert p.returncode == 0, text[-3000:]
            return out, metrics(out)

    yield Run()
    if p.poll() is None:
        p.kill()
        p.wait()


def _sbatch(cluster, script: str, tmp_path: Path, name: str, resources: list) -> tuple:
    out, log = tmp_path / name, tmp_path / f"{name}.out"
    env = {**cluster.env, "POA_PYTHON": sys.executable, "POA_PROCS_PER_NODE": "1"}
    r = cluster.run("sbatch", "--parsable", "--partition", cluster.partition, "--nodes=2", "--ntasks-per-node=1",
                    "--gpus-per-node=0", *resources, "--time=15", f"--output={log}", str(REPO / "slurm" / script),
                    "configs/demo_cpu.yaml", *CONTRACT, *PER_TASK, "train.progress=false", f"train.output_dir={out}",
                    env=env, cwd=REPO)
    return r.stdout.strip().split(";")[0], out, log


def _assert_equal_to(ref, out: Path) -> None:
    ref_dir, ref_metrics = ref
    got = metrics(out)
    assert [r["step"] for r in got] == list(range(STEPS))  # each step exactly once
    assert_same_run(ref_metrics, got)
    assert_same_weights(ref_dir, out)  # student and EMA teacher
    assert load_checkpoint(out / "checkpoints")["world_size"] == 2


def test_two_nodes_compute_the_step_of_one_process(slurm_two_nodes, one_process, tmp_path):
    cluster = slurm_two_nodes
    # Both scripts at once (each node has a CPU for each), while the one-process run trains here.
    srun = _sbatch(cluster, "train_srun.sbatch", tmp_path, "srun", ["--cpus-per-task=1"])
    trun = _sbatch(cluster, "train_torchrun.sbatch", tmp_path, "torchrun", ["--cpus-per-task=1"])
    ref = one_process.wait()
    for job, out, log in (srun, trun):
        assert cluster.wait_done(job, timeout=240) == "COMPLETED", log.read_text()[-3000:]
        assert cluster.job_info(job)["NodeList"] == "poa-node[01-02]"
        _assert_equal_to(ref, out)
    # srun: rank 0 on poa-node01 serves the store at poa-node01 (the first host of the node list);
    # torchrun: the agents met at poa-node01.
    assert re.search(r"process group: 2 ranks, master poa-node01:\d+", srun[2].read_text()), srun[2].read_text()
    assert re.search(r"2 node\(s\) x 1 workers, rendezvous poa-node01:\d+", trun[2].read_text())
