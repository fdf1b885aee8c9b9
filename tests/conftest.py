import os

# Without a GPU, Triton kernels run under Triton's interpreter; the switch is read when
# a kernel is defined, so it is set before anything imports them.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests run from the repository root (configs/ paths are relative to it).
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist (scripts/test.sh runs the suite on several workers), the Slurm tests share one
    # worker and so one local cluster: `--dist loadgroup` keeps an xdist_group on one worker.
    for item in items:
        if "slurm" in item.keywords or "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The session-wide local Slurm cluster fixture (tests/slurm_cluster.py) and the uninterrupted
# 2-rank run that killed-and-restarted runs are compared with (tests/reference_runs.py).
pytest_plugins = ["slurm_cluster", "reference_runs"]


_BUSY = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


@pytest.fixture
def cpu_load():
    """Every core busy for the test's duration: one spinning process pinned to each core (as a loaded
    cluster node is), so that the test's own processes run late and in unusual orders. Ended by PID."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _BUSY, str(cpu)]) for cpu in sorted(os.sched_getaffinity(0))]
    try:
        yield len(procs)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
