# Sourced by demo.sh and test.sh: create .venv if missing and install the project into it.
# Usage: source scripts/_setup_venv.sh [EXTRA]   (EXTRA e.g. "dev")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
EXTRA="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
SPEC="$ROOT"
[ -n "$EXTRA" ] && SPEC="$ROOT[$EXTRA]"
# Re-install only when pyproject.toml changed since the last successful install.
STAMP="$VENV/.alignsam_installed_${EXTRA:-base}"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    echo "[setup] installing alignsam_ray${EXTRA:+[$EXTRA]} into .venv (first time: a few minutes)"
    "$PY" -m pip install -q --upgrade pip
    # torch/torchvision first, as a pair pip resolves together (see README: Install).
    "$PY" -m pip install -q torch torchvision
    "$PY" -m pip install -q -e "$SPEC"
    touch "$STAMP"
fi
# SAM 2.1 backends: the official sam2 package, built against the torch above, without its optional CUDA
# extension (with build isolation its sdist would fetch a second torch into a throwaway environment)
if ! "$PY" -c "import sam2" 2>/dev/null; then
    echo "[setup] installing sam2 (SAM 2.1 backends) into .venv"
    "$PY" -m pip install -q setuptools wheel
    SAM2_BUILD_CUDA=0 "$PY" -m pip install -q --no-build-isolation "sam2==1.1.0"
fi
# SAM 3 (--sam sam3): the modules sam3 imports (the [sam3] extra), then sam3 itself without its pins (they would
# downgrade tqdm, typing_extensions and huggingface-hub); tests that need it are skipped without it
if ! "$PY" -c "import sam3" 2>/dev/null; then
    echo "[setup] installing sam3 (SAM 3 backend) into .venv"
    "$PY" -m pip install -q -e "$ROOT[sam3]"
    "$PY" -m pip install -q --no-deps "sam3==0.1.4"
fi
export PATH="$VENV/bin:$PATH"
