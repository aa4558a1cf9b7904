#!/usr/bin/env bash
# On a GPU machine, in one go: the `gpu`-marked tests (real sizes, bf16), then every benchmark (results
# files, plots, the tables of docs/benchmarks.md). Set OUT to a folder to get the logs, results and
# tables there (how the lent GPU machines hand files back); otherwise they stay in the checkout. Each
# family's results are written to OUT as soon as it finishes, so a run cut short by a time limit
# still returns them.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
set +e
cd "$ROOT"
out="${OUT:-}"
log() { if [ -n "$out" ]; then tee "$out/$1"; else cat; fi; }
python -m sphinx_kernels.info | log info.log
python -m pytest -m gpu -q -ra 2>&1 | log gpu-tests.log
tests=${PIPESTATUS[0]}
results="benchmarks/results"
[ -n "$out" ] && results="$out/results" && mkdir -p "$results"
python -m benchmarks --results-dir "$results" 2>&1 | log benchmarks.log
[ -n "$out" ] && cp "$results"/*.json "$results"/*.png benchmarks/results/ 2>/dev/null
python -m benchmarks.report
[ -n "$out" ] && cp docs/benchmarks.md "$out/"
exit "$tests"
