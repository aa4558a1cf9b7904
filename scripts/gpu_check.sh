#!/usr/bin/env bash
# On a GPU machine, in one go: the `gpu`-marked tests (real sizes, bf16), then every benchmark (results
# files, plots, the tables of docs/benchmarks.md), then the fuzz suite (small sizes) under
# compute-sanitizer's memcheck (issue 13: zero errors from the CUDA and Triton kernels). Set OUT to a folder to get the logs, results and
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
# memcheck sees out-of-bounds accesses only at the edges of allocations: torch's caching allocator
# is switched off so that every tensor is one. The fuzz suite runs every op on every backend here
# (CUDA, Triton compiled, reference) at small sizes; its risky cases run in a child process, which
# --target-processes all follows.
sanitizer="$(command -v compute-sanitizer || true)"
[ -z "$sanitizer" ] && [ -n "${CUDA_HOME:-}" ] && sanitizer="$CUDA_HOME/bin/compute-sanitizer"
if [ -x "${sanitizer:-}" ]; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 97 \
        --target-processes all python -m pytest tests/fuzz -q -p no:cacheprovider 2>&1 \
        | log sanitizer.log
    sanitized=${PIPESTATUS[0]}
else
    echo "compute-sanitizer not found: memcheck not run" | log sanitizer.log
    sanitized=1
fi
[ "$tests" -ne 0 ] && exit "$tests"
exit "$sanitized"
