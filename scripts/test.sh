#!/usr/bin/env bash
# Set up (first run only), then run the test suite (GPU tests are skipped without a GPU).
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --quick    without the slow and Slurm tests (a few minutes; for contributors)
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
if [ "${1:-}" = "--quick" ]; then
  shift
  exec python -m pytest -m "not slow and not slurm" "$@"
fi
exec python -m pytest "$@"
