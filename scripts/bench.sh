#!/usr/bin/env bash
# The kernels' quick benchmarks: sets up .venv (scripts/setup_env.sh), shows what is built and which
# backend serves each op, then times every benchmark family in --quick mode. Arguments go to
# `python -m benchmarks` (e.g. --family varlen; drop --quick by passing --full).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
python -m sphinx_kernels.info
echo
if [ "${1:-}" = "--full" ]; then shift; python -m benchmarks "$@"; else python -m benchmarks --quick "$@"; fi
