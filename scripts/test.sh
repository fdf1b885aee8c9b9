#!/usr/bin/env bash
# Set up (first run only), then run the test suite (GPU tests are skipped without a GPU).
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --quick    without the slow and Slurm tests (a few minutes; for contributors)
# Other arguments go to pytest.
#
# POA_TEST_WORKERS=N runs the suite on N pytest-xdist workers, each test process on one thread; the
# Slurm tests share one worker (and one local cluster) and mostly wait on the scheduler meanwhile.
# Default 0: one process, as CI runs it (on 3 workers two 2-rank runs aborted at exit under the load;
# see docs/reliability.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
workers="${POA_TEST_WORKERS:-0}"
parallel=()
if [ "$workers" != "0" ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
  parallel=(-n "$workers" --dist loadgroup)
fi
if [ "${1:-}" = "--quick" ]; then
  shift
  exec python -m pytest "${parallel[@]}" -m "not slow and not slurm" "$@"
fi
exec python -m pytest "${parallel[@]}" "$@"
