#!/usr/bin/env bash
# Run the test suite (default: fast tests; pass pytest args, e.g. `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup_venv.sh dev
exec python -m pytest "$@"
