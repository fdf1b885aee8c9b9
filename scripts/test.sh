#!/usr/bin/env bash
# Set up (first run only), then run the test suite (GPU tests are skipped without a GPU).
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --quick    without the slow and Slurm tests (a few minutes; for contributors)
# Other arguments go to pytest.
#
# The suite runs on POA_TEST_WORKERS pytest-xdist workers (default: one per core plus one, at least 3),
# each test process on one thread: the Slurm tests share one worker (and one local cluster) and spend
# most of their time waiting on the scheduler, so the other workers keep the cores busy meanwhile.
# POA_TEST_WORKERS=0 runs everything in this process (as `python -m pytest` does).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
cores=$(python -c 'import os; print(len(os.sched_getaffinity(0)))')
workers="${POA_TEST_WORKERS:-$(( cores + 1 > 3 ? cores + 1 : 3 ))}"
parallel=()
if [ "$workers" != "0" ]; then
  parallel=(-n "$workers" --dist loadgroup)
fi
if [ "${1:-}" = "--quick" ]; then
  shift
  exec python -m pytest "${parallel[@]}" -m "not slow and not slurm" "$@"
fi
exec python -m pytest "${parallel[@]}" "$@"
