#!/usr/bin/env bash
# On a GPU machine, in one go: the `gpu`-marked tests (real sizes, bf16), then every benchmark (results
# files, plots, README tables). Set OUT to a folder to get the logs, results and README copied there
# (how the lent GPU machines hand files back); otherwise they stay in the checkout.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
set +e
cd "$ROOT"
out="${OUT:-}"
log() { if [ -n "$out" ]; then tee "$out/$1"; else cat; fi; }
python -m sphinx_kernels.info | log info.log
python -m pytest -m gpu -q -ra 2>&1 | log gpu-tests.log
tests=${PIPESTATUS[0]}
python -m benchmarks 2>&1 | log benchmarks.log
python -m benchmarks.report
if [ -n "$out" ]; then
    mkdir -p "$out/results" && cp benchmarks/results/*.json benchmarks/results/*.png "$out/results/" 2>/dev/null
    cp README.md "$out/"
fi
exit "$tests"
