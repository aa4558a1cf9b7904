#!/usr/bin/env bash
# Runs the test suite: sets up .venv and the compiled extension (scripts/setup_env.sh), then pytest.
# Arguments go to pytest. Without a GPU, Triton kernels run under the interpreter and `gpu` tests skip.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
python -m pytest "$@"
