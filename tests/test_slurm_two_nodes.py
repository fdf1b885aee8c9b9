"""POA training across two Slurm nodes of the cluster of `slurm/local_cluster.sh start --nodes N`.

Each node (poa-node01, poa-node02, ... at 10.233.0.11, .12, ...) is a slurmd in its own network
namespace (a veth pair on a private bridge) and UTS namespace (its own hostname); one slurmctld runs
on this machine (the module fixture `slurm_nodes`: three nodes, tests/slurm_cluster.py). Every job
here runs one task per node on two nodes: Slurm's node list (`poa-node[01-02]`, `poa-node[01,03]`) is
expanded by `distributed/env.py`, the master is its first host, resolved inside the nodes, and gloo
talks over the veth pairs.

* the same run under `slurm/train_srun.sbatch` and `slurm/train_torchrun.sbatch` (c10d rendezvous on the
  first node) equals one process with the same global batch (the contract of tests/test_distributed.py);
* every process of the second node (its slurmd, the job step, rank 1) SIGKILLed mid-run under
  `poa submit --nodes 2`, as if it lost power: the step ends, Slurm marks the node DOWN and requeues the
  job, which runs again on the two nodes left, resumes from the newest checkpoint and equals the same
  one-process run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backbones import tiny
from poa_hpc.checkpoint.layout import load_checkpoint
from poa_hpc.cli import main
from poa_hpc.distributed.env import expand_nodelist
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
    """The same run in one process, started at once (it trains while the jobs do); ``wait()`` gives
    its folder and metrics."""
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


def _sbatch(cluster, script: str, tmp_path: Path, name: str) -> tuple:
    out, log = tmp_path / name, tmp_path / f"{name}.out"
    env = {**cluster.env, "POA_PYTHON": sys.executable, "POA_PROCS_PER_NODE": "1"}
    r = cluster.run("sbatch", "--parsable", "--partition", cluster.partition, "--nodes=2", "--ntasks-per-node=1",
                    "--cpus-per-task=1", "--gpus-per-node=0", "--time=15", f"--output={log}",
                    str(REPO / "slurm" / script), "configs/demo_cpu.yaml", *CONTRACT, *PER_TASK,
                    "train.progress=false", f"train.output_dir={out}", env=env, cwd=REPO)
    return r.stdout.strip().split(";")[0], out, log


def _hosts(out: Path) -> list:
    """The host each rank of the last run reported from (status/rank_*.json), in rank order."""
    return [json.loads((out / "status" / f"rank_{r:05d}.json").read_text())["host"] for r in range(2)]


def _assert_equal_to(ref, out: Path) -> None:
    ref_dir, ref_metrics = ref
    got = metrics(out)
    assert [r["step"] for r in got] == list(range(STEPS))  # each step exactly once
    assert_same_run(ref_metrics, got)
    assert_same_weights(ref_dir, out)  # student and EMA teacher
    assert load_checkpoint(out / "checkpoints")["world_size"] == 2


@pytest.mark.slow
def test_two_nodes_compute_the_step_of_one_process(slurm_nodes, one_process, tmp_path):
    cluster = slurm_nodes
    # Both scripts at once (each node has a CPU for each), while the one-process run trains here.
    srun = _sbatch(cluster, "train_srun.sbatch", tmp_path, "srun")
    trun = _sbatch(cluster, "train_torchrun.sbatch", tmp_path, "torchrun")
    ref = one_process.wait()
    for job, out, log in (srun, trun):
        assert cluster.wait_done(job, timeout=240) == "COMPLETED", log.read_text()[-3000:]
        _assert_equal_to(ref, out)
        # One rank per node, on the nodes Slurm gave the job, in the order of its node list.
        nodes = expand_nodelist(cluster.job_info(job)["NodeList"])
        assert len(nodes) == 2 and set(nodes) <= set(cluster.nodes)
        assert _hosts(out) == nodes
        text = log.read_text()
        # srun: rank 0 serves the process group's store on the first node, which the other rank reaches
        # by that name; torchrun: the agents met at the first node (c10d rendezvous).
        master = "process group: 2 ranks, master" if job == srun[0] else "2 node(s) x 1 workers, rendezvous"
        assert re.search(rf"{re.escape(master)} {nodes[0]}:\d+", text), text[-3000:]


def _wait_step(cluster, job: str, out: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in (metrics(out) if (out / "metrics.jsonl").exists() else [])):
        state = cluster.job_state(job)
        if time.monotonic() > deadline or state not in (None, "PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job} ({state}) did not reach step {step}:\n{_logs(out, job)}\n{cluster.log_tail()}")
        time.sleep(0.05)


def _logs(out: Path, job: str) -> str:
    folder = out / "slurm" / job
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(folder.glob("*_log.*"))) if folder.exists() else "(no logs)"


@pytest.mark.slow
def test_a_dead_node_ends_the_step_then_the_job_requeues_and_resumes_exactly(slurm_nodes, one_process, tmp_path,
                                                                              capsys):
    cluster, out = slurm_nodes, tmp_path / "run"
    assert main(["submit", "--config", "configs/demo_cpu.yaml", "--nodes", "2", "--tasks-per-node", "1",
                 "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "15", "--max-restarts", "2",
                 "--partition", cluster.partition, *CONTRACT, *PER_TASK, f"train.output_dir={out}"]) == 0
    job = re.search(r"submitted Slurm job (\d+)", capsys.readouterr().out).group(1)
    _wait_step(cluster, job, out, 5)  # past the checkpoint of step 4
    first = expand_nodelist(cluster.job_info(job)["NodeList"])
    dead = first[1]  # the node of rank 1 (the batch script runs on the first)
    try:
        killed = cluster.kill_node(dead)  # its slurmd, the job step's slurmstepd, rank 1, all at once
        assert len(killed) >= 3, killed
        assert cluster.wait_done(job, timeout=240) == "COMPLETED", _logs(out, job) + cluster.log_tail()
    finally:
        cluster.start_nodes()  # the node comes back (for the tests after this one)
    info = cluster.job_info(job)
    assert info["Restarts"] == "1", info
    second = expand_nodelist(info["NodeList"])  # the run after the requeue: on the nodes left
    assert dead not in second and len(second) == 2, (first, second)
    assert _hosts(out) == second
    log = (out / "slurm" / job / f"{job}_0_log.err").read_text()
    ctld = (cluster.state_dir / "slurmctld.log").read_text()
    # rank 0 saw the lost connection at once, Slurm declared the node dead and requeued the job (its
    # --requeue), the second run resumed from the newest checkpoint (step 4, or 8 if it was written)
    assert f"requeue job JobId={job} due to failure of node {dead}" in ctld, ctld[-3000:]
    assert "lost the connection to another rank" in log and f"Node failure on {dead}" in log, log[-3000:]
    resumed = re.search(r"resumed from .* at step (\d+)", log)
    assert resumed and int(resumed.group(1)) in (4, 8), log[-3000:]
    _assert_equal_to(one_process.wait(), out)  # every step once, the same losses and weights
