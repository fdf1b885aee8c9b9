#!/usr/bin/env bash
# Set up (first run only), then train the embedded CPU demo, extract 3 sub-networks and k-NN them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
exec poa demo "$@"
