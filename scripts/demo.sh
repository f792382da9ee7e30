#!/usr/bin/env bash
# Run the whole pipeline on the embedded default (synthetic data, micro-SAM). No downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup_venv.sh ""  # (no extra; not this script's arguments)
exec alignsam demo "$@"
