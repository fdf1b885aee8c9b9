#!/usr/bin/env bash
# Set up (first run only), then run the test suite (GPU tests are skipped without a GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
exec python -m pytest "$@"
