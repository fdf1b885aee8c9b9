"""A checkpoint write that fails on ONE rank stops every rank at once with exit code 4, under DeepSpeed too,
whose save has barriers between its writes (the others used to wait there for dist.timeout_s).

Rank 1 alone gets a file-size limit (RLIMIT_FSIZE, set from outside with prlimit once training runs), so its
next ZeRO shard write fails with EFBIG while rank 0's writes succeed: a real write error on
one rank, as a full local disk or a quota gives.  2 processes, gloo, CPU.
"""

from __future__ import annotations

import resource
import time
import uuid
from pathlib import Path

import pytest

from test_resilience import CLEAN_ENV, finish, one_line_error, poa, train_args, wait_logged


def _rank_pid(tag: str, rank: int, timeout: float = 60) -> int:
    """The pid of the training worker of ``rank`` started with POA_TEST_TAG=tag."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in kv)
            except OSError:
                continue
            if env.get("POA_TEST_TAG") == tag and env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
                return int(d.name)
        time.sleep(0.2)
    pytest.fail(f"no worker of rank {rank}")


@pytest.mark.slow
def test_a_deepspeed_save_that_fails_on_one_rank_stops_all_ranks_with_exit_code_4_at_once(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    tag = uuid.uuid4().hex
    env = {**CLEAN_ENV, "POA_TEST_TAG": tag, "DS_ACCELERATOR": "cpu"}
    p = poa(*train_args(out, "train.checkpoint_every=5", "optim.epochs=50", "dist.timeout_s=300",
                        "dist.engine=deepspeed", "dist.zero_stage=2", nproc=2), env=env)
    wait_logged(out, 6, p, timeout=900)
    resource.prlimit(_rank_pid(tag, 1), resource.RLIMIT_FSIZE, (4096, 4096))
    t0 = time.monotonic()
    code, text = finish(p)
    took = time.monotonic() - t0
    assert code == 4, text[-3000:]
    line = one_line_error(text)
    # torch's zip writer reports EFBIG as a short write ("unexpected pos ..."), Python's writes as "File too large"
    assert ("File too large" in line or "unexpected pos" in line) and "(on rank 1)" in line, line
    assert "checkpoint of step 10 could not be written" in line and "intact (newest: step 5)" in line, line
    assert took < 60, f"{took:.0f} s: a rank waited for the failed one"  # dist.timeout_s is 300
    assert (out / "checkpoints" / "step_00000005.pt").is_file() and not (out / "checkpoints" / "step_00000010.pt").exists()
