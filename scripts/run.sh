#!/usr/bin/env bash
# The main job: sets up .venv and the compiled extension (scripts/setup_env.sh), shows what is built,
# demonstrates the ops and runs the quick benchmarks.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
python -m sphinx_kernels.info
echo
python examples/packed_training_step.py
echo
python -m benchmarks --quick
